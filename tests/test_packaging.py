"""The package works outside the checkout: a built wheel carries its presets and datasets.

The wheel is built from this checkout, unpacked into an empty folder and run from another empty
folder, with that folder first on the path: nothing of the source tree can be found, only what
the wheel holds (its dependencies come from the test environment).
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("lora_studio-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names


def _studio(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "studio", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_wheel_holds_presets_and_datasets(unpacked_wheel):
    _, names = unpacked_wheel
    assert "studio/assets/model-configs/llama-3.1-8b.json" in names
    assert "studio/assets/datasets/instructions.jsonl" in names
    assert "studio/assets/datasets/sentiment.jsonl" in names
    assert not any(n.startswith(("tests/", "bench/", "assets/")) for n in names)


def test_wheel_runs_count_and_tree_from_any_folder(unpacked_wheel, tmp_path):
    site, _ = unpacked_wheel
    probe = subprocess.run([sys.executable, "-c", "import studio; print(studio.__file__)"], cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert Path(probe.stdout.strip()).is_relative_to(site), probe.stdout + probe.stderr  # not the checkout

    count = _studio(site, tmp_path, "count", "--model", "llama-3.1-8b", "--targets", "q_proj,v_proj",
                    "--r", "16", "--json")
    assert count.returncode == 0, count.stderr
    assert json.loads(count.stdout)["trainable"] == 6_815_744  # 32 layers x (4096+4096 + 4096+1024) x 16

    tree = _studio(site, tmp_path, "tree", "--model", "tiny-llama")
    assert tree.returncode == 0, tree.stderr
    assert tree.stdout.startswith("LlamaForCausalLM")


def test_wheel_finds_the_builtin_datasets_by_their_config_path(unpacked_wheel, tmp_path):
    site, _ = unpacked_wheel
    code = ("from studio.data import load_records, list_builtin;"
            "d = load_records('assets/datasets/instructions.jsonl');"
            "print(d.format, len(list_builtin()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fmt, n = out.stdout.split()
    assert fmt == "alpaca" and int(n) >= 2
