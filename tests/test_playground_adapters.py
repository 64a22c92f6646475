"""Several adapters on one loaded base: loaded once, switched per generation, never re-read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import studio.playground as pgm
from studio.config import RunConfig
from studio.errors import PlaygroundError
from studio.models import load_model
from studio.runs.manager import create_run
from studio.runs.rundir import RunDir


def _adapter(folder: Path, seed: int, ref: str = "tiny-llama", targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(ref), cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg")
    run = create_run(RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"}, "data": {"format": "alpaca"}}),
                     d / "runs")
    _adapter(RunDir(run).adapter, seed=1)
    others = {"two": _adapter(d / "two", seed=2), "three": _adapter(d / "three", seed=3),
              "gpt2": _adapter(d / "gpt2", seed=4, ref="tiny-gpt2", targets=("c_attn",))}
    pg = pgm.Playground.for_run(run, cache=False)
    return pg, run, others


def _alone(path: Path, text_ids: torch.Tensor) -> torch.Tensor:
    pm = PeftModel.from_pretrained(load_model("tiny-llama"), str(path)).eval()
    with torch.no_grad():
        return pm(input_ids=text_ids).logits[0].float()


def test_each_loaded_adapter_gives_its_own_logits_and_switching_reads_nothing(setup, monkeypatch):
    pg, run, others = setup
    assert pg.add_adapter(str(others["two"])) == "two"
    assert pg.add_adapter(str(others["three"]), name="three") == "three"
    assert pg.add_adapter(str(others["two"])) == "two"  # already loaded: nothing happens
    text = "Spell the word backwards."
    ids = torch.tensor([pg.encode(pg.format_prompt(text, "none"))])
    reads = []
    import peft.utils.save_and_load as sl

    real = sl.load_peft_weights
    monkeypatch.setattr(sl, "load_peft_weights", lambda *a, **k: reads.append(a) or real(*a, **k))
    want = {"two": _alone(others["two"], ids), "three": _alone(others["three"], ids),
            "default": _alone(RunDir(run).adapter, ids)}
    reads.clear()  # the references above read their files; the playground must not
    for name in ("two", "default", "three", "two", False, "three"):
        got = pg.logits(text, adapter=name)
        if name is False:
            with torch.no_grad():
                base = load_model("tiny-llama")(input_ids=ids).logits[0].float()
            assert torch.allclose(got, base, atol=1e-5)
        else:
            assert torch.allclose(got, want[name], atol=1e-5), name
    assert reads == []


def test_a_switch_leaves_the_state_pefts_own_set_adapter_leaves_with_nothing_trainable(setup, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pg, run, others = setup
    pg.add_adapter(str(others["two"]))
    # an adapter with other targets adds LoRA layers: the switch finds them after the load
    wide = pg.add_adapter(str(_adapter(tmp_path / "wide", seed=5, targets=("k_proj", "o_proj"))), name="wide")
    text = "Name a colour."
    ids = torch.tensor([pg.encode(pg.format_prompt(text, "none"))])

    def state():
        return [(type(m).__name__, tuple(m.active_adapters)) for m in pg.model.modules() if isinstance(m, BaseTunerLayer)]
    try:
        for name in ("two", wide, "default", wide):
            got = pg.logits(text, adapter=name)
            ours = state()
            pg.model.set_adapter(pgm._peft_name(name), inference_mode=True)
            assert state() == ours and pg.model.active_adapter == pgm._peft_name(name)
            assert len({m for m, _ in ours}) and any(a == (pgm._peft_name(name),) for _, a in ours)
            assert not any(p.requires_grad for p in pg.model.parameters())
            with torch.no_grad():
                assert torch.allclose(got, pg.model(input_ids=ids).logits[0].float(), atol=1e-6)
        assert torch.allclose(pg.logits(text, adapter=wide), _alone(tmp_path / "wide", ids), atol=1e-5)
    finally:
        pg.remove_adapter(wide)


def test_compare_streams_the_base_and_every_adapter_side_by_side(setup):
    pg, _, others = setup
    pg.add_adapter(str(others["two"]))
    rows = list(pg.compare("Hi", ["default", "two"], max_new_tokens=6, temperature=0.0))
    last = rows[-1]
    assert set(last) == {"base", "default", "two"}
    for name, adapter in (("base", False), ("default", True), ("two", "two")):
        assert last[name] == pg.generate("Hi", adapter=adapter, max_new_tokens=6, temperature=0.0)


def test_adapters_of_another_base_or_unknown_names_are_refused(setup):
    pg, _, others = setup
    with pytest.raises(PlaygroundError, match="trained on .*tiny-gpt2.*not on tiny-llama"):
        pg.add_adapter(str(others["gpt2"]))
    with pytest.raises(PlaygroundError, match="adapter 'nope' is not loaded; loaded: default"):
        pg.generate("Hi", adapter="nope", max_new_tokens=2)


def test_load_adapters_reuses_what_is_loaded_and_drops_unasked_ones_only_for_room(setup, tmp_path, monkeypatch):
    pg, run, others = setup
    two, three = pg.load_adapters([str(others["two"]), str(others["three"])])
    assert pg.adapters[two] == str(others["two"]) and pg.adapters[three] == str(others["three"])
    assert pg.load_adapters([str(run)]) == ["default"]  # the run's own adapter is not loaded twice
    four, five = _adapter(tmp_path / "four", seed=7), _adapter(tmp_path / "five", seed=8)
    loads = []
    real = pg.model.load_adapter
    monkeypatch.setattr(pg.model, "load_adapter", lambda *a, **k: loads.append(a) or real(*a, **k))
    names = pg.load_adapters([str(four), str(five), str(others["two"])])
    assert len(loads) == 2 and names[2] == two
    assert three not in pg.adapters and len(pg.adapters) == 1 + pgm.MAX_ADAPTERS  # dropped for room, nothing more
    ids = torch.tensor([pg.encode("Hi")])
    assert torch.allclose(pg.logits("Hi", adapter=names[0]), _alone(four, ids), atol=1e-5)
    with pytest.raises(PlaygroundError, match="cannot be removed"):
        pg.remove_adapter("default")


def test_the_runs_own_adapter_named_among_the_picked_does_not_take_a_place(setup, tmp_path):
    pg, run, others = setup
    extra = [_adapter(tmp_path / f"x{k}", seed=20 + k) for k in range(pgm.MAX_ADAPTERS + 1)]
    names = pg.load_adapters([str(run), *map(str, extra[: pgm.MAX_ADAPTERS])])
    assert names[0] == "default" and len(set(names)) == 1 + pgm.MAX_ADAPTERS
    with pytest.raises(PlaygroundError, match=rf"{pgm.MAX_ADAPTERS + 1} adapters picked beside the run's own; "
                                              rf"at most {pgm.MAX_ADAPTERS}"):
        pg.load_adapters([str(run), *map(str, extra)])


def test_chat_answers_each_columns_own_conversation_with_the_system_prompt_first(setup):
    pg, _, _ = setup
    convs = {"base": [{"role": "user", "content": "Hi"}],
             "default": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "More?"}]}
    last = list(pg.chat(convs, system="Be brief.", max_new_tokens=6, temperature=0.0))[-1]
    for col, adapter in (("base", False), ("default", True)):
        text = pg.format_chat(convs[col], "Be brief.")
        assert text.index("Be brief.") < text.index("Hi")
        assert last[col] == pg.generate(text, adapter=adapter, max_new_tokens=6, temperature=0.0, template="none")
    with pytest.raises(PlaygroundError, match="message 0 must be"):
        pg.format_chat([{"role": "robot", "content": "x"}])
