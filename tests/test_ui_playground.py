"""The Playground tab's handlers: runs and adapters to pick, side by side streaming, chat, messages."""

from __future__ import annotations

import html

import pytest
import torch
from peft import LoraConfig, get_peft_model

from studio.config import RunConfig
from studio.models import load_model
from studio.playground import Playground
from studio.runs.manager import create_run
from studio.runs.rundir import RunDir
from studio.ui.tabs import playground as tab


def _run(root, run_id: str, seed: int, state: str, created: float, ref: str = "tiny-llama", r: int = 4,
         targets=("q_proj", "v_proj")):
    run = create_run(RunConfig.from_dict({"model": {"name_or_path": ref}, "data": {"format": "alpaca"},
                                          "lora": {"r": r, "target_modules": list(targets)}}), root, run_id=run_id)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(load_model(ref), cfg).save_pretrained(str(RunDir(run).adapter))
    RunDir(run).update_status(state=state, created_at=created)
    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pgui") / "runs"
    _run(root, "alpha", 1, "completed", 100.0)
    _run(root, "beta", 2, "completed", 200.0)
    _run(root, "gamma", 3, "stopped", 300.0)  # the newest, but not completed
    _run(root, "gpt", 4, "completed", 50.0, ref="tiny-gpt2", targets=("c_attn",))
    return root


def _values(**kw):
    v = {"playground.run": "alpha", "playground.adapters": [], "playground.prompt": "", "playground.template": "none",
         "playground.max_new_tokens": 8, "playground.temperature": 0.0, "playground.top_p": 1.0, "playground.seed": 0,
         "playground.chat_input": "", "playground.system": "", "playground.chat_state": {}}
    return {**v, **{f"playground.{k}": x for k, x in kw.items()}}


def test_without_runs_the_tab_says_what_to_do_first(tmp_path):
    out = tab.refresh(tmp_path, {"playground.run": None, "playground.adapters": []})
    assert out["playground.notice"] == tab.NO_RUNS and "Train" in tab.NO_RUNS
    assert out["playground.run"]["choices"] == [] and out["playground.run"]["value"] is None
    (last,) = list(tab.generate(tmp_path, _values(run=None, prompt="Hi")))
    assert "pick a run" in last["playground.message"]


def test_the_newest_completed_run_is_preselected_and_kept_once_picked(root):
    assert tab.usable_runs(root)[0] == "gamma"
    assert tab.default_run(root) == "beta"
    out = tab.refresh(root, {"playground.run": None, "playground.adapters": []})
    assert out["playground.run"]["value"] == "beta" and out["playground.notice"] == ""
    out = tab.refresh(root, {"playground.run": "gamma", "playground.adapters": ["alpha"]})
    assert out["playground.run"]["value"] == "gamma" and out["playground.adapters"]["value"] == ["alpha"]
    assert "playground.chat_state" not in out  # opening the tab again keeps the chat


def test_only_adapters_of_the_same_base_and_not_the_runs_own_are_offered(root):
    assert sorted(tab.adapter_choices(root, "alpha")) == ["beta", "gamma"]
    assert tab.adapter_choices(root, "gpt") == {}
    out = tab.run_changed(root, {"playground.run": "alpha", "playground.adapters": ["beta", "gpt"]})
    assert out["playground.adapters"]["value"] == ["beta"]
    assert out["playground.extra_1"]["visible"] and out["playground.extra_1"]["label"] == "Base + beta"
    assert not out["playground.extra_2"]["visible"] and out["playground.tuned"]["label"] == "Base + alpha"
    assert out["playground.chat_state"] == {}
    assert out["playground.chat_extra_1"]["label"] == "Base + beta" and out["playground.chat_extra_1"]["value"] == []
    assert not out["playground.chat_extra_2"]["visible"]


def test_side_by_side_streams_the_base_and_each_adapter_from_one_loaded_base(root):
    Playground.for_run(root / "alpha")  # the tab's cached one, loaded before counting
    updates = list(tab.generate(root, _values(prompt="Spell it.", adapters=["beta", "gamma"], max_new_tokens=12)))
    final = {}
    for u in updates:
        final.update(u)
    pg = Playground.for_run(root / "alpha")
    assert set(pg.adapters) == {"default", "extra-1", "extra-2"}
    want = {"base": False, "tuned": True, "extra_1": "extra-1", "extra_2": "extra-2"}
    for col, adapter in want.items():
        assert final[f"playground.{col}"] == pg.generate("Spell it.", adapter=adapter, max_new_tokens=12,
                                                         temperature=0.0, template="none"), col
    assert len({final[f"playground.{c}"] for c in want}) > 1
    # streaming: each column grew over several updates before its last text
    for col in want:
        seen = [u[f"playground.{col}"] for u in updates if f"playground.{col}" in u and u[f"playground.{col}"]]
        assert len(seen) >= 2 and all(final[f"playground.{col}"].startswith(s) for s in seen), col
    # an adapter already loaded is not loaded again, and no second base is made
    ids = id(pg.model)
    list(tab.generate(root, _values(prompt="Hi", adapters=["gamma"])))
    assert id(Playground.for_run(root / "alpha").model) == ids


def test_chat_keeps_each_columns_history_two_turns_then_clear(root):
    v = _values(chat_input="Hello there", system="Answer briefly.", adapters=["beta"], max_new_tokens=6)
    updates = list(tab.send(root, v))
    assert updates[0]["playground.chat_input"] == ""
    state = updates[-1]["playground.chat_state"]
    hist = state["history"]
    assert set(hist) == {"base", "tuned", "extra_1"}
    assert all([m["role"] for m in h] == ["user", "assistant"] for h in hist.values())
    updates = list(tab.send(root, {**v, "playground.chat_input": "And then?", "playground.chat_state": state}))
    hist2 = updates[-1]["playground.chat_state"]["history"]
    pg = Playground.for_run(root / "alpha")
    for col, adapter in {"base": False, "tuned": True, "extra_1": "extra-1"}.items():
        h = hist2[col]
        assert [m["content"] for m in h[:3]] == [hist[col][0]["content"], hist[col][1]["content"], "And then?"]
        # the second reply answers this column's own conversation, system prompt first
        text = pg.format_chat(h[:3], "Answer briefly.")
        assert text.index("Answer briefly.") < text.index("Hello there") < text.index("And then?")
        assert h[3]["content"] == pg.generate(text, adapter=adapter, max_new_tokens=6, temperature=0.0,
                                              template="none")
        shown = updates[-2][f"playground.chat_{col}"]
        assert shown == h
    cleared = tab.empty_chat()
    assert cleared["playground.chat_state"] == {} and cleared["playground.chat_base"] == []


def test_bad_input_is_a_message_next_to_the_button(root):
    (out,) = list(tab.generate(root, _values(prompt="   ")))
    assert "type a prompt first" in out["playground.message"]
    (out,) = list(tab.send(root, _values(chat_input="")))
    assert "type a message first" in out["playground.chat_message"]
    (out,) = list(tab.generate(root, _values(prompt="Hi", adapters=["gpt"])))
    text = html.unescape(out["playground.message"])
    assert "'gpt' is not an adapter of this run's base" in text and "pick from: gamma, beta" in text
    (out,) = list(tab.generate(root, _values(prompt="Hi", run="../etc")))
    assert "no run '../etc'" in html.unescape(out["playground.message"])
