"""studio._compat: one test per private API it touches, failing with the library and its version.

Each test checks the thing the studio relies on (the attribute exists and behaves as used), so
a release that renames or changes it is named here instead of showing up as a wrong count, a
lost checkpoint or an open login wall somewhere else.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os

import pytest
import torch

from studio import _compat


@contextlib.contextmanager
def touch(lib: str, what: str):
    """Turn any failure inside into one line naming the library version and the _compat helper."""
    try:
        yield
    except Exception as e:  # AttributeError, ImportError, AssertionError, ...: all mean "it changed"
        pytest.fail(f"{lib} {importlib.metadata.version(lib)} changed {what} ({type(e).__name__}: {e}); "
                    "update studio/_compat.py", pytrace=False)


def tiny_llama_config(tie=True):
    import transformers

    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


# --- transformers ---------------------------------------------------------------------------

def test_auto_model_class_reads_model_mapping():
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    class UnknownConfig(transformers.PretrainedConfig):
        model_type = "studio-unknown"

    with touch("transformers", "_BaseAutoModelClass._model_mapping"):
        assert _compat.auto_model_class(AutoModelForCausalLM, tiny_llama_config()) is transformers.LlamaForCausalLM
        assert _compat.auto_model_class(AutoModelForSequenceClassification, transformers.BertConfig()) \
            is transformers.BertForSequenceClassification
        assert _compat.auto_model_class(AutoModel, transformers.BertConfig()) is transformers.BertModel
        with pytest.raises(KeyError):  # the registry falls back to the bare model on KeyError
            _compat.auto_model_class(AutoModelForCausalLM, UnknownConfig())


def test_model_from_config_builds_on_meta():
    import transformers

    with touch("transformers", "PreTrainedModel._from_config"), torch.device("meta"):
        m = _compat.model_from_config(transformers.LlamaForCausalLM, tiny_llama_config())
    assert type(m) is transformers.LlamaForCausalLM and all(p.is_meta for p in m.parameters())


def test_tied_weight_pairs():
    import transformers

    with touch("transformers", "all_tied_weights_keys / _tied_weights_keys"), torch.device("meta"):
        tied = _compat.tied_weight_pairs(transformers.LlamaForCausalLM(tiny_llama_config(tie=True)))
        assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert _compat.tied_weight_pairs(transformers.LlamaForCausalLM(tiny_llama_config(tie=False))) == {}


def test_trainer_save_checkpoint_rotates_by_save_total_limit():
    from transformers import Trainer

    with touch("transformers", "Trainer._save_checkpoint"):
        params = list(inspect.signature(Trainer._save_checkpoint).parameters)
        assert params == ["self", "model", "trial"], params
        src = inspect.getsource(Trainer._save_checkpoint)
        # The mixin turns rotation off by this setting for the length of the call.
        assert "rotate_checkpoints" in src and "self.args.save_total_limit" in src
        assert _compat.DeferCheckpointRotation._save_checkpoint.__name__ in vars(_compat.DeferCheckpointRotation)


def test_rotate_checkpoints_keeps_the_newest(tmp_path):
    for i, step in enumerate((5, 10, 15)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    with touch("transformers", "trainer.rotate_checkpoints"):
        _compat.rotate_checkpoints(str(tmp_path), 1, None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15"]


# --- peft -----------------------------------------------------------------------------------

def test_peft_moe_conversion_tables():
    with touch("peft", "transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN / _MOE_TARGET_MODULE_MAPPING"):
        from peft.utils.transformers_weight_conversion import (  # noqa: F401
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )

        assert _compat.peft_moe_retargets("mixtral") is True
        assert _compat.peft_moe_retargets("llama") is False


def test_excluded_module_marker():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])
    with touch("peft", "tuners_utils._ExcludedModule"):
        from peft.tuners.tuners_utils import _ExcludedModule

        hit = check_target_module_exists(cfg, "model.layers.0.self_attn.q_proj")
        assert isinstance(hit, _ExcludedModule) and _compat.is_excluded_match(hit)
        ok = check_target_module_exists(cfg, "model.layers.0.self_attn.v_proj")
        assert ok and not _compat.is_excluded_match(ok)


# --- gradio ---------------------------------------------------------------------------------

def test_gradio_launch_self_check_switch():
    import inspect

    import gradio as gr

    with touch("gradio", "Blocks.launch(_frontend=) (the start-up request to its own page)"):
        assert _compat.gradio_launch_without_self_check() == {"_frontend": False}
        source = inspect.getsource(gr.Blocks.launch)
        # the switch guards the url_ok check and nothing else
        assert source.count("_frontend") == 2 and "if _frontend and not networking.url_ok(" in source


def test_gradio_queue_idle_poll_knobs():
    import gradio as gr

    from studio.ui import app as ui_app

    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    with touch("gradio", "Blocks._queue (sleep_when_free, progress_update_sleep_when_free)"):
        q = _compat.gradio_queue(demo)
        assert q is not None
        assert isinstance(q.sleep_when_free, (int, float)) and isinstance(q.progress_update_sleep_when_free, (int, float))
        assert ui_app.calm_queue(demo) and q.sleep_when_free == ui_app.QUEUE_IDLE_POLL_S


def test_gradio_login_tokens_and_cookie():
    import gradio.routes
    from gradio.routes import App

    with touch("gradio", "App.tokens / App.cookie_id (its login sessions)"):
        src = inspect.getsource(gradio.routes)
        # gradio's own login route: the session store and cookie names gradio_logged_in reads.
        assert "app.tokens[token] = username" in src and 'f"access-token-{app.cookie_id}"' in src
        app = App()
        assert _compat.gradio_app({"app": app}) is app and _compat.gradio_app({"app": object()}) is None
        app.tokens["tok"] = "alice"
        assert _compat.gradio_logged_in(app, {f"access-token-{app.cookie_id}": "tok"})
        assert _compat.gradio_logged_in(app, {f"access-token-unsecure-{app.cookie_id}": "tok"})
        assert not _compat.gradio_logged_in(app, {f"access-token-{app.cookie_id}": "other"})
        assert not _compat.gradio_logged_in(app, {})
