"""The playground engine: one base model, the adapter toggled on it, deterministic generation."""

import json
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import studio.playground as gen
from studio.config import RunConfig
from studio.data import alpaca_prompt, build_datasets, chat_prompt
from studio.errors import StudioError
from studio.models import load_model, presets
from studio.playground import Playground, PlaygroundError
from studio.runs.rundir import RunDir

ROWS = [
    {"instruction": "Spell the word backwards, letter by letter.", "input": "ship", "output": "p i h s"},
    {"instruction": "What is the capital of Iceland?", "input": "", "output": "The capital of Iceland is Reykjavik."},
    {"instruction": "What is the first letter of the word sweet?", "input": "", "output": "The first letter is s."},
] * 6
SENTIMENT = [{"text": f"{w} film number {i}", "label": lab}
             for i in range(20) for w, lab in (("great", "positive"), ("awful", "negative"))]
LABELS = {0: "negative", 1: "positive"}  # sorted, as build_datasets numbers them
FAST = dict(max_new_tokens=12)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _make_run(root, name, task, data_path, rows_cfg):
    run = root / name
    run.mkdir()
    cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama", "task": task},
                               "data": {"path": str(data_path), **rows_cfg},
                               "lora": {"target_modules": ["q_proj", "v_proj"]},
                               "train": {"per_device_train_batch_size": 2, "seed": 7}})
    cfg.save(run / "config.yaml")
    return run, cfg


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("genruns")
    run, _ = _make_run(root, "causal", "causal_lm", _write_jsonl(root / "alpaca.jsonl", ROWS),
                       {"eval_fraction": 0.0, "packing": False})
    torch.manual_seed(1)
    # init_lora_weights=False: B is non-zero, so the adapter changes the output from the start.
    model = get_peft_model(load_model("tiny-llama"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run / "adapter")
    return run


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clsruns")
    run, _ = _make_run(root, "cls", "seq_cls", _write_jsonl(root / "sentiment.jsonl", SENTIMENT),
                       {"eval_fraction": 0.25})
    torch.manual_seed(2)
    base = load_model("tiny-llama", "seq_cls", num_labels=2, id2label=LABELS)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(run / "adapter")
    # The class names as the trainer records them (the one source the playground reads).
    RunDir(run).write_status({"state": "completed", "id2label": {str(k): v for k, v in LABELS.items()}})
    return run


@pytest.fixture(scope="module")
def pg(causal_run):
    return Playground.for_run(causal_run, cache=False)


@pytest.fixture(scope="module")
def cls_pg(cls_run):
    return Playground.for_run(cls_run, cache=False)


# --- one model, adapter toggled -------------------------------------------------------------

@pytest.mark.slow
def test_disabled_adapter_gives_the_base_logits_exactly(pg):
    text = "### Instruction:\nHello there\n\n### Response:\n"
    ref = load_model("tiny-llama")
    ids = torch.tensor([pg.encode(text)])
    with torch.inference_mode():
        want = ref(input_ids=ids).logits[0]
    tuned = pg.logits(text, adapter=True)
    assert torch.equal(pg.logits(text, adapter=False), want)
    assert not torch.allclose(tuned, want, atol=1e-3)
    # Switching back and forth is exact both ways.
    assert torch.equal(pg.logits(text, adapter=True), tuned)
    assert torch.equal(pg.logits(text, adapter=False), want)


@pytest.mark.slow
def test_one_copy_of_the_base_loaded_once(causal_run, monkeypatch):
    calls = []
    real = gen.load_model
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    gen.clear_cache()
    try:
        p = Playground.for_run(causal_run)
        assert Playground.for_run(causal_run) is p  # the UI's next request reuses it
        base = p.model.get_base_model()
        ptrs = {n: t.data_ptr() for n, t in base.named_parameters() if "lora_" not in n}
        p.generate("hi", adapter=False, temperature=0, **FAST)
        p.generate("hi", adapter=True, temperature=0, **FAST)
        list(p.side_by_side("hi", temperature=0, **FAST))
        assert len(calls) == 1
        assert {n: t.data_ptr() for n, t in base.named_parameters() if "lora_" not in n} == ptrs
        # Every parameter is a base weight or a LoRA factor: no second base hides anywhere.
        n_lora = sum(t.numel() for n, t in p.model.named_parameters() if "lora_" in n)
        n_base = sum(t.numel() for t in load_model("tiny-llama").parameters())
        assert sum(t.numel() for t in p.model.parameters()) == n_base + n_lora
    finally:
        gen.clear_cache()


def test_cache_reloads_a_republished_adapter(causal_run, tmp_path):
    import os

    gen.clear_cache()
    try:
        p = Playground.for_run(causal_run)
        w = causal_run / "adapter" / "adapter_model.safetensors"
        st = w.stat()
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert Playground.for_run(causal_run) is not p
        assert len(gen._CACHE) == gen.CACHE_SIZE
    finally:
        gen.clear_cache()


# --- generation -----------------------------------------------------------------------------

@pytest.mark.slow
def test_stream_yields_growing_prefixes_ending_in_generate(pg):
    args = dict(adapter=True, temperature=0.9, top_p=0.95, seed=3, max_new_tokens=24)
    items = list(pg.stream("Name a color.", **args))
    assert items
    for a, b in zip(items, items[1:]):
        assert b.startswith(a) and b != a
    assert items[-1] == pg.generate("Name a color.", **args)
    assert pg.last_stats["tuned"]["new_tokens"] <= 24


@pytest.mark.slow
def test_same_seed_same_text_greedy_deterministic(pg):
    a = pg.generate("x", temperature=1.0, seed=5, max_new_tokens=16)
    assert pg.generate("x", temperature=1.0, seed=5, max_new_tokens=16) == a
    assert pg.generate("x", temperature=1.0, seed=6, max_new_tokens=16) != a
    g = pg.generate("x", temperature=0, seed=1, max_new_tokens=16)
    assert pg.generate("x", temperature=0, seed=2, max_new_tokens=16) == g
    # Greedy is transformers' own greedy search on the same (adapted) model.
    ids = torch.tensor([pg.encode(pg.format_prompt("x"))])
    with pg._lock, torch.inference_mode():
        pg._set_adapter(True)
        ref = pg.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=16)
    assert pg.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) == g


@pytest.mark.slow
def test_side_by_side_fills_both_columns(pg):
    args = dict(temperature=0.7, seed=4, max_new_tokens=16)
    pairs = list(pg.side_by_side("Hello", **args))
    for (b0, t0), (b1, t1) in zip(pairs, pairs[1:]):
        assert b1.startswith(b0) and t1.startswith(t0)
    assert pairs[-1] == (pg.generate("Hello", adapter=False, **args), pg.generate("Hello", adapter=True, **args))
    assert pairs[-1][0] != pairs[-1][1]


@pytest.mark.slow
def test_concurrent_streams_keep_their_own_mode(pg):
    want = {m: pg.generate("abc", adapter=m, temperature=0, max_new_tokens=16) for m in (False, True)}
    got, errors = {}, []

    def work(mode):
        try:
            for _ in range(2):
                got[(mode, _)] = list(pg.stream("abc", adapter=mode, temperature=0, max_new_tokens=16))[-1]
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(text == want[mode] for (mode, _), text in got.items())


# --- prompts --------------------------------------------------------------------------------

def test_prompt_templates_are_the_training_text(pg, causal_run):
    assert pg.template == "alpaca"  # from the run's alpaca data
    assert pg.format_prompt("Add two numbers.") == alpaca_prompt("Add two numbers.")
    assert pg.format_prompt("Add two numbers.", "alpaca") == alpaca_prompt("Add two numbers.")
    assert pg.format_prompt("hi", "chat") == chat_prompt(pg.tokenizer, [{"role": "user", "content": "hi"}])
    assert pg.format_prompt("raw text", "none") == "raw text"
    # The prompt's tokens are exactly how the trainer's example starts (BOS rule included).
    cfg = pg.cfg
    row = ROWS[1]
    train_ids = list(build_datasets(cfg, pg.tokenizer).train[1]["input_ids"])
    prompt_ids = pg.encode(pg.format_prompt(row["instruction"]))
    assert train_ids[: len(prompt_ids)] == prompt_ids
    assert pg.tokenizer.decode(train_ids[len(prompt_ids):], skip_special_tokens=True) == row["output"]


# --- classification -------------------------------------------------------------------------

@pytest.mark.slow
def test_classify_probabilities(cls_pg):
    texts = ["great film number 3", "awful film number 9", "something else entirely"]
    for adapter in (False, True):
        out = cls_pg.classify(texts, adapter=adapter)
        assert len(out) == len(texts)
        for r in out:
            assert set(r["probs"]) == set(LABELS.values())
            assert abs(sum(r["probs"].values()) - 1) < 1e-5
            assert r["label"] == max(r["probs"], key=r["probs"].get)
    base = cls_pg.classify(texts, adapter=False)
    tuned = cls_pg.classify(texts, adapter=True)
    assert any(abs(b["probs"]["positive"] - t["probs"]["positive"]) > 1e-4 for b, t in zip(base, tuned))
    # A batch gives what one text alone gives (padding is masked).
    alone = cls_pg.classify([texts[2]], adapter=True)[0]
    assert alone["probs"] == pytest.approx(tuned[2]["probs"], abs=1e-5)


@pytest.mark.slow
def test_eval_sample_accuracy(cls_pg):
    res = cls_pg.eval_sample(n=64, seed=0)
    assert res["split"] == "eval" and res["n"] == res["split_size"] == 10  # 25% of 40, all of it
    assert set(res["accuracy"]) == {"base", "tuned"}
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    texts = {r["text"] for r in SENTIMENT}
    assert res["examples"]
    for ex in res["examples"]:
        assert ex["text"] in texts and ex["gold"] in LABELS.values()
        assert cls_pg.classify([ex["text"]], adapter=True)[0]["label"] == ex["tuned"]
        assert cls_pg.classify([ex["text"]], adapter=False)[0]["label"] == ex["base"]
    assert cls_pg.eval_sample(n=4, seed=1)["n"] == 4
    assert cls_pg.eval_sample(n=64, seed=0)["accuracy"] == res["accuracy"]


# --- errors ---------------------------------------------------------------------------------

def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, StudioError) and msg and "\n" not in msg
    return msg


def test_errors_are_one_line(tmp_path, pg, cls_pg):
    with pytest.raises(PlaygroundError) as e:
        Playground.for_run(tmp_path)
    assert "not a run folder" in _one_line(e)
    run, _ = _make_run(tmp_path, "fresh", "causal_lm", tmp_path / "x.jsonl", {})
    with pytest.raises(PlaygroundError) as e:
        Playground.for_run(run)
    assert "no adapter yet" in _one_line(e)
    with pytest.raises(PlaygroundError) as e:
        Playground.for_base(next(iter(presets())))
    assert "explore-only" in _one_line(e)
    with pytest.raises(PlaygroundError) as e:
        pg.classify(["x"])
    assert "is a text model (causal_lm)" in _one_line(e) and "needs a classifier" in _one_line(e)
    with pytest.raises(PlaygroundError) as e:
        cls_pg.generate("x")
    assert "is a classifier (seq_cls)" in _one_line(e) and "needs a text model" in _one_line(e)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(seed=-1), dict(template="x")):
        with pytest.raises(PlaygroundError) as e:
            pg.stream("x", **bad)  # raises at the call, before the first token
        _one_line(e)
    base = Playground.for_base("tiny-llama", cache=False)
    assert base.generate("x", adapter=False, temperature=0, max_new_tokens=4) == \
        pg.generate("x", adapter=False, temperature=0, max_new_tokens=4, template="none")
    with pytest.raises(PlaygroundError) as e:
        base.generate("x", adapter=True)
    assert "no adapter" in _one_line(e)


def test_run_without_final_adapter_uses_its_last_checkpoint(causal_run, tmp_path):
    import shutil

    from studio import runs

    run, _ = _make_run(tmp_path, "midway", "causal_lm", causal_run.parent / "alpaca.jsonl", {})
    ckpt = run / runs.CHECKPOINTS / "checkpoint-5"
    shutil.copytree(causal_run / "adapter", ckpt)
    for f in (runs.COMPLETE_MARKER, "trainer_state.json"):
        (ckpt / f).write_text("{}")
    p = Playground.for_run(run, cache=False)
    assert p.info()["adapter_source"] == "checkpoint-5"
    assert p.generate("", template="none", temperature=0, max_new_tokens=4) == \
        Playground.for_run(causal_run, cache=False).generate("", template="none", temperature=0, max_new_tokens=4)
