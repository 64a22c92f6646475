"""studio eval: held-out evaluation of base vs tuned on one loaded model (tiny-llama runs)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rouge_score import rouge_scorer

import studio.playground as playground
from studio import evaluate as ev
from studio.cli import main
from studio.config import RunConfig, load_config
from studio.data.load import load_records
from studio.data.prepare import build_datasets, encode_causal, split_rows
from studio.models.registry import load_model, load_tokenizer
from studio.playground import Playground
from studio.runs import trainer
from studio.runs.rundir import RunDir

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit"]


def _chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        w, v = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        msgs = [{"role": "user", "content": f"Spell {w} backwards."}, {"role": "assistant", "content": w[::-1]}]
        if i % 3 == 0:  # a second turn: the prompt holds the first turn and its answer
            msgs += [{"role": "user", "content": f"And {v}?"}, {"role": "assistant", "content": v[::-1]}]
        rows.append({"messages": msgs})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads per process slow tiny models to a crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny-llama run trained for a few steps on a chat set with a held-out split."""
    root = tmp_path_factory.mktemp("evalruns")
    data = _write(root / "chat.jsonl", _chat_rows(40))
    run = root / "runs" / "chat"
    run.mkdir(parents=True)
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(data), "eval_fraction": 0.25, "max_length": 64, "packing": False},
        "lora": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "eval_steps": 100, "save_steps": 100, "seed": 3}})
    cfg.save(run / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert trainer.train(run, False, trainer.Reporter(run, True)) == "completed"
    return run


@pytest.fixture(scope="module")
def pg(chat_run):
    return Playground.for_run(chat_run, cache=False)


# --- the held-out split and the result file ---------------------------------------------------

@pytest.mark.slow
def test_heldout_split_is_the_one_training_left_out(chat_run, pg):
    cfg = load_config(chat_run / "config.yaml")
    res = ev.evaluate(chat_run, max_new_tokens=4, batch_size=4)
    d = load_records(cfg.data.path)
    train_idx, eval_idx = split_rows(cfg, d)
    prep = build_datasets(cfg, pg.tokenizer)
    assert res["n"] == len(eval_idx) == prep.eval_examples == 10
    assert not set(train_idx) & set(eval_idx)
    # The rows split_rows names are exactly the ones build_datasets tokenized for its eval split.
    rows = [dict(d.dataset[i]) for i in eval_idx]
    ids = [x for x, _ in encode_causal(pg.tokenizer, "messages", rows, [str(i) for i in eval_idx])]
    assert sorted(tuple(x[: cfg.data.max_length]) for x in ids) == sorted(map(tuple, prep.eval["input_ids"]))
    assert [e["where"] for e in res["examples"]] == [d.locate(i) for i in eval_idx]
    assert [e["reference"] for e in res["examples"]] == [r["messages"][-1]["content"] for r in rows]
    saved = json.loads((chat_run / "eval" / "heldout.json").read_text())
    assert saved["metrics"] == res["metrics"] and saved["n"] == 10
    assert {"run", "data", "n", "metrics", "examples"} <= set(saved)
    assert set(saved["examples"][0]) >= {"prompt", "reference", "base", "tuned"}
    assert [e["name"] for e in ev.list_evals(chat_run)] == ["heldout"]


@pytest.mark.slow
def test_runs_json_lists_the_evals(chat_run):
    ev.evaluate(chat_run, max_new_tokens=2, limit=3)
    code, out, _ = _cli("runs", "--runs-dir", str(chat_run.parent), "--json")
    assert code == 0
    (row,) = json.loads(out)["runs"]
    assert {"id", "dir", "state", "step", "last_loss"} <= set(row)
    assert [e["name"] for e in row["evals"]] == ["heldout"] and row["evals"][0]["n"] == 3


# --- metrics --------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_equal_a_direct_computation(chat_run, pg, tmp_path):
    """References are half the base model's own greedy answers (from the playground's unbatched loop),
    so base exact match must be exactly 0.5; ROUGE-L and loss are recomputed example by example."""
    prompts = [f"Spell {w} backwards." for w in WORDS[:8]]
    own = [pg.generate(p, adapter=False, max_new_tokens=10, temperature=0) for p in prompts]
    refs = [own[i] if i % 2 == 0 else WORDS[i][::-1] for i in range(8)]
    assert all(r.strip() for r in refs) and all(own[i] != refs[i] for i in range(1, 8, 2))
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, refs)]
    data = _write(tmp_path / "probe.jsonl", rows)
    res = ev.evaluate(chat_run, str(data), max_new_tokens=10, batch_size=3, save=False)
    assert [e["base"] for e in res["examples"]] == own
    assert res["metrics"]["base"]["exact_match"] == 0.5
    tuned = [e["tuned"] for e in res["examples"]]
    assert res["metrics"]["tuned"]["exact_match"] == sum(t.strip() == r.strip() for t, r in zip(tuned, refs)) / 8
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for mode in ("base", "tuned"):
        answers = [e[mode] for e in res["examples"]]
        direct = sum(scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(refs, answers)) / 8
        assert res["metrics"][mode]["rouge_l"] == pytest.approx(direct)
    # Loss: a separately loaded model, one example at a time, transformers' own shifted loss.
    base = load_model("tiny-llama")
    model = PeftModel.from_pretrained(base, str(chat_run / "adapter")).eval()
    tok = load_tokenizer("tiny-llama")
    for mode in ("base", "tuned"):
        total = count = 0.0
        ctx = model.disable_adapter() if mode == "base" else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for ids, labels in encode_causal(tok, "messages", rows, ["x"] * 8):
                n = sum(t != -100 for t in labels[1:])
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                total += float(out.loss) * n
                count += n
        assert res["metrics"][mode]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["metrics"]["tuned"]["loss"] != pytest.approx(res["metrics"]["base"]["loss"], rel=1e-3)


@pytest.mark.slow
def test_loss_counts_only_the_last_answer_of_a_conversation(pg):
    rows = _chat_rows(1)  # two turns
    (ids, labels), = encode_causal(pg.tokenizer, "messages", rows, ["x"])
    ex, _ = ev._example(rows[0], type("D", (), {"format": "messages"})(), "x")
    (_, kept), = ev._reference_tokens(pg, [ex])
    trained = [t for t in kept if t != -100]
    second = pg.tokenizer(rows[0]["messages"][-1]["content"], add_special_tokens=False).input_ids
    assert 0 < len(trained) < sum(t != -100 for t in labels)
    assert trained[: len(second)] == second


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    gold = ["a", "b", "b", "c", "a", "b", "a"]
    pred = ["a", "b", "a", "a", "a", "c", "b"]
    labels = ["a", "b", "c", "d"]  # d never occurs: it must not count in the macro average
    m = ev.classification_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()


@pytest.mark.slow
def test_classification_run(tmp_path):
    rows = [{"text": f"{w} film number {i}", "label": lab}
            for i in range(12) for w, lab in (("great", "positive"), ("awful", "negative"))]
    data = _write(tmp_path / "sent.jsonl", rows)
    run = tmp_path / "cls"
    run.mkdir()
    RunConfig.from_dict({"model": {"name_or_path": "tiny-llama", "task": "seq_cls"},
                         "data": {"path": str(data), "eval_fraction": 0.25},
                         "lora": {"target_modules": ["q_proj", "v_proj"]},
                         "train": {"per_device_train_batch_size": 2, "seed": 7}}).save(run / "config.yaml")
    torch.manual_seed(2)
    base = load_model("tiny-llama", "seq_cls", num_labels=2, id2label={0: "negative", 1: "positive"})
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(run / "adapter")
    RunDir(run).update_status(state="completed", id2label={"0": "negative", "1": "positive"})  # as the trainer does
    res = ev.evaluate(run, save=False)
    assert res["n"] == 6 and res["labels"] == ["negative", "positive"]
    for mode in ("base", "tuned"):
        m = res["metrics"][mode]
        assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 6
        hits = sum(e[f"{mode}_match"] for e in res["examples"])
        assert m["accuracy"] == pytest.approx(hits / 6)
    pg = Playground.for_run(run, cache=False)
    texts = [e["prompt"] for e in res["examples"]]
    assert [e["tuned"] for e in res["examples"]] == [r["label"] for r in pg.classify(texts, adapter=True)]
    assert [e["base"] for e in res["examples"]] == [r["label"] for r in pg.classify(texts, adapter=False)]


# --- one model, left padding ----------------------------------------------------------------

@pytest.mark.slow
def test_base_and_tuned_come_from_one_loaded_model(chat_run, monkeypatch):
    loads, wraps = [], []
    real_load, real_wrap = playground.load_model, PeftModel.from_pretrained
    monkeypatch.setattr(playground, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(PeftModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: wraps.append(a) or real_wrap(*a, **k)))
    res = ev.evaluate(chat_run, max_new_tokens=6, save=False)
    assert len(loads) == 1 and len(wraps) == 1
    # "base" is the adapter switched off: the same answers the playground's base gives.
    monkeypatch.undo()
    pg = Playground.for_run(chat_run, cache=False)
    single = [e for e in res["examples"] if "\n" not in e["prompt"]]
    assert single
    for e in single:
        assert e["base"] == pg.generate(e["prompt"], adapter=False, max_new_tokens=6, temperature=0)
        assert e["tuned"] == pg.generate(e["prompt"], adapter=True, max_new_tokens=6, temperature=0)
    assert any(e["base"] != e["tuned"] for e in res["examples"])


@pytest.mark.slow
def test_left_padding_gives_the_unpadded_greedy_output(chat_run):
    pg = Playground.for_run(chat_run, cache=False)  # its own: the playground's calls below switch the adapter
    texts = [pg.format_prompt(p, "chat") for p in
             ["Hi", "Spell green backwards.", "A much longer prompt, with many more bytes in it than the others."]]
    prompts = [pg.encode(t) for t in texts] * 2
    assert len({len(p) for p in prompts}) == 3
    eos = ev.eos_ids(pg.model, pg.tokenizer)
    batched = {}
    for adapter in (False, True):
        with contextlib.nullcontext() if adapter else pg.model.disable_adapter():
            batched[adapter] = ev.generate_greedy(pg.model, pg.tokenizer, prompts, 12, 6, eos)
            alone = [ev.generate_greedy(pg.model, pg.tokenizer, [p], 12, 1, eos)[0] for p in prompts]
        assert batched[adapter] == alone
    assert batched[False] != batched[True]
    for adapter in (False, True):  # and the playground's own token-by-token loop, one prompt at a time
        loop = [pg.generate(t, adapter=adapter, max_new_tokens=12, temperature=0, template="none") for t in texts]
        assert batched[adapter][:3] == loop


# --- bad input: one line, exit 2, nothing written --------------------------------------------

@pytest.fixture()
def bare_run(chat_run, tmp_path):
    """A copy of the chat run's folder with its config and adapter (no eval/ yet)."""
    import shutil

    run = tmp_path / "copy"
    run.mkdir()
    shutil.copy(chat_run / "config.yaml", run / "config.yaml")
    shutil.copytree(chat_run / "adapter", run / "adapter")
    return run


def _refused(run, *args, expect: str) -> str:
    code, out, err = _cli("eval", str(run), *args)
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (run / "eval").exists()
    return err


@pytest.mark.slow
def test_no_usable_prompts(bare_run, tmp_path):
    only_answers = _write(tmp_path / "answers.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}] * 3)
    _refused(bare_run, "--data", str(only_answers), expect="no usable prompts")
    text = _write(tmp_path / "plain.jsonl", [{"text": "just some text"}] * 3)
    _refused(bare_run, "--data", str(text), expect="no usable prompts")


@pytest.mark.slow
def test_malformed_line_names_file_and_line(bare_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(_chat_rows(1)[0])
    bad.write_text(f"{good}\n{good}\n{{\"messages\": [\n")
    _refused(bare_run, "--data", str(bad), expect=f"{bad}:3")


@pytest.mark.slow
def test_run_without_adapter(bare_run):
    import shutil

    shutil.rmtree(bare_run / "adapter")
    _refused(bare_run, expect="has no adapter")


@pytest.mark.slow
def test_limit_zero_and_bad_numbers(bare_run):
    _refused(bare_run, "--limit", "0", expect="--limit must be an integer >= 1")
    _refused(bare_run, "--batch-size", "0", expect="--batch-size")
    _refused(bare_run, "--max-new-tokens", "-3", expect="--max-new-tokens")


def test_not_a_run_folder(tmp_path):
    _refused(tmp_path, expect="not a run folder")


@pytest.mark.slow
def test_cli_text_and_json(bare_run, tmp_path):
    data = _write(tmp_path / "few.jsonl", _chat_rows(4))
    code, out, _ = _cli("eval", str(bare_run), "--data", str(data), "--max-new-tokens", "4", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["n"] == 4 and res["name"] == "few"
    assert (bare_run / "eval" / "few.json").is_file()
    assert 0.0 <= res["metrics"]["base"]["exact_match"] <= 1.0
    code, out, _ = _cli("eval", str(bare_run), "--data", str(data), "--max-new-tokens", "4", "--limit", "2")
    assert code == 0 and "exact_match" in out and "saved:" in out
    assert json.loads((bare_run / "eval" / "few.json").read_text())["n"] == 2


# --- the shipped chat set and its held-out prompts --------------------------------------------

def test_profile_json_answers_are_the_facts_of_the_sentence_and_heldout_is_unlike_training():
    from studio.data.prepare import BUILTINS, list_builtin

    listed = {d["name"]: d for d in list_builtin()}
    assert {"profile-json", "profile-json-heldout"} <= set(BUILTINS) <= set(listed)
    facts = {}
    for name in ("profile-json", "profile-json-heldout"):
        d = load_records(listed[name]["path"])
        assert d.format == "messages"
        seen = facts.setdefault(name, {"name": set(), "city": set(), "job": set(), "prompt": set()})
        for conv in d.dataset["messages"]:
            for user, answer in zip(conv[::2], conv[1::2]):
                assert (user["role"], answer["role"]) == ("user", "assistant")
                card = json.loads(answer["content"])
                assert list(card) == ["name", "age", "city", "job"] and isinstance(card["age"], int)
                assert answer["content"] == json.dumps(card)  # one line, the one spacing
                for key in ("name", "city", "job"):
                    assert card[key] in user["content"]
                    seen[key].add(card[key])
                assert str(card["age"]) in user["content"]
                shape = user["content"]
                for v in (card["name"], card["city"], card["job"], str(card["age"])):
                    shape = shape.replace(v, "_")
                seen["prompt"].add(shape)
    train, held = facts["profile-json"], facts["profile-json-heldout"]
    assert len(held["name"]) >= 20
    for key in ("name", "city", "job", "prompt"):
        assert not train[key] & held[key], key


# --- several adapters on one base -------------------------------------------------------------

def _random_adapter(folder, seed: int, ref: str = "tiny-llama", targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(ref), cfg).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_several_adapters_give_one_column_each_equal_to_each_adapter_alone(chat_run, tmp_path):
    """Each adapter's column: the greedy answers and reference loss of that adapter loaded alone on a
    fresh base, one example at a time (transformers' generate and its own shifted loss)."""
    from studio.data.prepare import chat_prompt

    other = _random_adapter(tmp_path / "other", seed=5)
    rows = _chat_rows(6)
    data = _write(tmp_path / "probe.jsonl", rows)
    res = ev.evaluate(chat_run, str(data), adapters=[str(chat_run), str(other)], max_new_tokens=6, batch_size=4)
    assert res["columns"] == ["base", "chat", "other"] == list(res["metrics"])
    assert res["name"] == "probe-adapters" and (chat_run / "eval" / "probe-adapters.json").is_file()
    assert res["adapters"] == {"chat": str(chat_run / "adapter"), "other": str(other)}
    single = ev.evaluate(chat_run, str(data), max_new_tokens=6, batch_size=4, save=False)
    assert [e["chat"] for e in res["examples"]] == [e["tuned"] for e in single["examples"]]
    assert res["metrics"]["chat"] == single["metrics"]["tuned"] and res["metrics"]["base"] == single["metrics"]["base"]

    tok = load_tokenizer("tiny-llama")
    refs = [r["messages"][-1]["content"] for r in rows]
    for col, folder in (("chat", chat_run / "adapter"), ("other", other)):
        model = PeftModel.from_pretrained(load_model("tiny-llama"), str(folder)).eval()
        eos = ev.eos_ids(model, tok)
        answers, total, count = [], 0.0, 0
        with torch.no_grad():
            for r in rows:
                text = chat_prompt(tok, r["messages"][:-1], add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False).input_ids
                if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]:
                    ids = [tok.bos_token_id] + ids
                out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
                cut = next((k for k, t in enumerate(out) if t in eos), len(out))
                answers.append(tok.decode(out[:cut], skip_special_tokens=True))
            for r in rows:  # the loss of the last answer only, as studio eval counts it
                ids, labels = encode_causal(tok, "messages", [r], ["x"])[0]
                keep, j = [-100] * len(labels), len(labels) - 1
                while labels[j] == -100:
                    j -= 1
                while j >= 0 and labels[j] != -100:
                    keep[j], j = labels[j], j - 1
                n = sum(t != -100 for t in keep[1:])
                total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([keep])).loss) * n
                count += n
        assert [e[col] for e in res["examples"]] == answers, col
        assert res["metrics"][col]["exact_match"] == sum(a.strip() == r.strip() for a, r in zip(answers, refs)) / 6
        assert res["metrics"][col]["loss"] == pytest.approx(total / count, rel=1e-5), col
    assert res["metrics"]["other"]["loss"] != pytest.approx(res["metrics"]["chat"]["loss"], rel=1e-3)

    code, out, _ = _cli("eval", str(chat_run), "--data", str(data), "--max-new-tokens", "6",
                        "--adapter", str(chat_run), "--adapter", str(other))
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "chat", "other"]
    loss_line = next(line for line in out.splitlines() if line.startswith("loss"))
    assert float(loss_line.split()[3]) == pytest.approx(res["metrics"]["other"]["loss"], abs=1e-4)


@pytest.mark.slow
def test_an_adapter_of_another_base_or_given_twice_is_refused(bare_run, tmp_path):
    gpt2 = _random_adapter(tmp_path / "gpt2", seed=6, ref="tiny-gpt2", targets=("c_attn",))
    err = _refused(bare_run, "--adapter", str(gpt2), expect="not on tiny-llama")
    assert "gpt2" in err
    _refused(bare_run, "--adapter", str(bare_run), "--adapter", str(bare_run / "adapter"), expect="give each once")
