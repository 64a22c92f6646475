"""Test setup: offline, a private cache for built-in models, quiet libraries."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Built-in models are written once per test session into a private cache, so tests never
# depend on (or disturb) a user's ~/.cache.
os.environ.setdefault("STUDIO_CACHE_DIR", tempfile.mkdtemp(prefix="studio-test-cache-"))
# Servers launched by tests open on the tiny model: the real default (SmolLM2) is converted once on
# first use, which belongs to the tests that check it (test_models_gguf.py), not to every launch.
os.environ.setdefault("STUDIO_UI_MODEL", "tiny-llama")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def free_port():
    """Returns a function that gives a free TCP port on 127.0.0.1, where test servers bind."""
    return free_port_number


# The browser tests' server and page, shared by every tests/test_ui_browser*.py file.
from browser import free_port_number, no_run_left_behind, page, server  # noqa: E402,F401
