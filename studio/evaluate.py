"""Held-out evaluation of a run: the base model and the tuned one on the same prompts.

One model is loaded (`Playground.for_run`: the run's base with its adapter wrapped in place);
"base" is that model with the LoRA branch off (PEFT's `disable_adapter_layers`), "tuned" the same
model with the adapter on, so the two answers differ only by the LoRA branch and the base weights
are held once. Other adapters of the same base (`adapters=`, `studio eval RUN --adapter A
--adapter B`) are loaded beside it as PEFT's named adapters, each a column of its own.

Examples come from the run's own held-out split (the rows `build_datasets` left out of training,
drawn by `split_rows` with the run's seed and eval_fraction) or from a file in any format the Data
tab reads. The prompt is what the trainer renders before the answer: for a conversation, every
message before the last assistant message (the tokenizer's chat template, with the generation
prompt); for alpaca rows ALPACA_TEMPLATE; for prompt/completion rows the prompt as it is. The
reference is that last assistant message (the output, the completion).

Generation is greedy, batched with LEFT padding so every row's next token sits in the last column,
through `model.generate` with its KV cache: one forward pass per new token for a whole batch,
where the playground's loop costs one per token per prompt (and `studio generate` a model load per
prompt). Rows are sorted by length first so a batch pads little. Left padding changes nothing a
row computes (the mask hides the pads and the position ids start at the first real token); a test
holds each row to its unpadded greedy output.

Metrics per model: exact_match (the fraction of answers equal to the reference once surrounding
whitespace is stripped), rouge_l (rouge-score's ROUGE-L F-measure, averaged over examples) and
loss (mean token loss of the references, masked as training masks them: the reference turn and
its end-of-turn tokens; a token-weighted mean like the trainer's eval_loss). Classification runs
report accuracy, macro_f1 (over the labels that occur in the gold or the predictions, as
scikit-learn's default) and the confusion matrix (rows gold, columns predicted).

Results go to the run folder as eval/NAME.json (NAME "heldout" for the run's own split, else the
file's stem), written atomically and only once everything has been computed. Nothing here prints.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from studio.adapters import file as adapter_file
from studio.config import load_config
from studio.errors import AdapterError, DataError, RunError, UsageError
from studio.runs.rundir import RunDir, read_json, write_json_atomic

HELDOUT = "heldout"  # the result name of an evaluation on the run's own held-out split
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 8
LOSS_BATCH = 8
# The fields of a saved result `list_evals` repeats for the runs table.
SUMMARY_KEYS = ("name", "data", "n", "task", "created_at", "metrics")

Progress = Callable[[int, int, str], None]


@dataclass
class Example:
    prompt: str          # what a person reads as the prompt (the messages as "role: content" lines)
    text: str            # what the model reads: the rendered prompt (filled in once the tokenizer is known)
    reference: str
    row: dict            # the example as the trainer would see it, up to and including the reference
    where: str           # file:LINE, for messages about this example
    messages: list | None = None


# --- public API -----------------------------------------------------------------------------

def evaluate(run_dir, data: str | None = None, *, limit: int | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
             progress: Progress | None = None, save: bool = True, adapters: list[str] | None = None) -> dict:
    """Evaluate base and tuned on held-out prompts; returns (and saves) the result dict.

    data: a dataset file, or None for the run's held-out split. limit: the first N examples.
    adapters: run folders, adapter folders or library names of the run's base; then the columns are
    "base" and one per adapter (named as the library names it), all on the run's one loaded base,
    instead of "base" and "tuned" (the run's own adapter), and the result is saved as NAME-adapters.
    progress(done, total, phase) is called as batches finish (phase: a column's name, or "loss").
    """
    _check_int("--limit", limit, allow_none=True)
    _check_int("--max-new-tokens", max_new_tokens)
    _check_int("--batch-size", batch_size)
    rd = RunDir(Path(run_dir).resolve())
    if not rd.config.is_file():
        raise RunError(f"{run_dir} is not a run folder (no {rd.config.name})")
    cfg = load_config(rd.config)
    _require_adapter(rd)
    task = cfg.model.task
    examples, source, name, d = _load_examples(cfg, data, task)
    if limit is not None:
        examples = examples[:limit]

    from studio.playground import Playground

    entries = _adapter_entries(rd, cfg, adapters) if adapters else []  # refused before any model loads
    t0 = time.perf_counter()
    pg = Playground.for_run(rd.path, cache=False)
    columns, paths = _columns(pg, entries, adapters)
    load_s = time.perf_counter() - t0
    report = progress or (lambda done, total, phase: None)
    t1 = time.perf_counter()
    if task == "seq_cls":
        body = _classify(pg, examples, d, report, columns)
    else:
        body = _generate_all(pg, examples, max_new_tokens, batch_size, report, columns)
    if adapters:
        name = f"{name}-adapters"
    result = {"run": rd.id, "dir": str(rd.path), "name": name, "data": source, "task": task, "n": len(examples),
              "created_at": time.time(), "max_new_tokens": max_new_tokens if task != "seq_cls" else None,
              "batch_size": batch_size, "adapter": pg.adapter_source, "columns": list(columns),
              **({"adapters": paths} if adapters else {}),
              "seconds": {"load": round(load_s, 3), "eval": round(time.perf_counter() - t1, 3)}, **body}
    if save:
        rd.eval_dir.mkdir(exist_ok=True)
        path = rd.eval_file(name)
        write_json_atomic(path, result)
        result["saved"] = str(path)
    return result


def list_evals(run_dir) -> list[dict]:
    """The saved evaluations of a run, newest first: name, data, n, task, created_at, metrics."""
    out = []
    for f in RunDir(run_dir).eval_files():
        res = read_json(f)
        if isinstance(res, dict) and isinstance(res.get("metrics"), dict):
            out.append({k: res.get(k) for k in SUMMARY_KEYS} | {"name": f.stem})
    return sorted(out, key=lambda r: r.get("created_at") or 0, reverse=True)


def read_eval(run_dir, name: str) -> dict:
    """One saved evaluation (eval/NAME.json) in full; RunError when there is none."""
    rd = RunDir(run_dir)
    res = read_json(rd.eval_file(name))
    if not isinstance(res, dict):
        known = ", ".join(f.stem for f in rd.eval_files()) or "none"
        raise RunError(f"run {rd.id} has no evaluation {name!r} (saved: {known})")
    return res


def result_name(data: str | None) -> str:
    """The eval/NAME.json a dataset's results are saved under: HELDOUT, else the file's stem."""
    if data is None:
        return HELDOUT
    stem = Path(str(data).rstrip("/\\")).name
    for suffix in (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^\w.-]+", "_", stem).strip(".") or "data"


# --- metrics (plain functions, so tests can hold them to a direct computation) --------------

def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """accuracy, macro_f1 and the confusion matrix (rows gold, columns predicted, in `labels` order)."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    f1s = []
    for lab in labels:
        i = index[lab]
        tp = matrix[i][i]
        fp = sum(matrix[r][i] for r in range(len(labels))) - tp
        fn = sum(matrix[i]) - tp
        if tp + fp + fn == 0:
            continue  # a label neither in the gold nor predicted does not count (scikit-learn's default)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    n = len(gold)
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / n if n else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "confusion_matrix": {"labels": list(labels), "matrix": matrix}}


# --- examples -------------------------------------------------------------------------------

def _load_examples(cfg, data: str | None, task: str):
    from studio.data.load import load_config_data, load_records
    from studio.data.prepare import split_rows

    if data is None:
        d = load_config_data(cfg.data)
        _, rows = split_rows(cfg, d)
        if not rows:
            raise DataError(f"{cfg.data.path}: the run held out no examples (data.eval_fraction = "
                            f"{cfg.data.eval_fraction}); pass --data FILE to evaluate on a file")
        source = f"{cfg.data.path} (held-out split: {len(rows)} of {d.num_rows} rows)"
    else:
        d = load_records(str(data))
        rows = list(range(d.num_rows))
        source = str(data)
    if task == "seq_cls" and d.format != "classification":
        raise DataError(f"{d.source}: this run is a classifier (seq_cls), which is evaluated on text + label "
                        f"rows, but {d.reason}")
    if task != "seq_cls" and d.format == "classification":
        raise DataError(f"{d.source}: {d.reason}, which a classifier reads; this run is a language model: "
                        "evaluate it on messages, alpaca or prompt/completion rows")
    if d.format == "text":
        raise DataError(f"{d.source}: no usable prompts: {d.reason}, plain text with no prompt/answer split; "
                        "studio eval needs messages, alpaca or prompt/completion rows")
    examples, why = [], None
    for i in rows:
        ex, reason = _example(dict(d.dataset[i]), d, d.locate(i))
        if ex is None:
            why = why or reason
        else:
            examples.append(ex)
    if not examples:
        raise DataError(f"{d.source}: no usable prompts in {len(rows)} rows ({why})")
    return examples, source, result_name(data), d


def _example(row: dict, d, where: str) -> tuple[Example | None, str | None]:
    """One example from a row, or (None, why it cannot be one)."""
    from studio.data.prepare import alpaca_prompt

    fmt = d.format
    if fmt == "classification":
        return Example(row[d.text_column], row[d.text_column], str(row[d.label_column]), row, where), None
    if fmt == "alpaca":
        instruction, inp, out = row.get("instruction") or "", row.get("input") or "", row.get("output") or ""
        if not instruction.strip() or not out.strip():
            return None, f"{where}: an empty instruction or output"
        shown = instruction + (f"\n{inp}" if inp else "")
        return Example(shown, alpaca_prompt(instruction, inp), out, {"instruction": instruction, "input": inp,
                                                                     "output": out}, where), None
    if fmt == "completion":
        prompt, completion = row.get("prompt") or "", row.get("completion") or ""
        if not prompt.strip() or not completion.strip():
            return None, f"{where}: an empty prompt or completion"
        return Example(prompt, prompt, completion, {"prompt": prompt, "completion": completion}, where), None
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    before, reference = msgs[:last], msgs[last]["content"]
    if not any(m["role"] in ("user", "system") and m["content"].strip() for m in before):
        return None, f"{where}: nothing but the assistant's answer, so no prompt to ask"
    if not reference.strip():
        return None, f"{where}: the last assistant message is empty, so no reference to compare with"
    shown = before[0]["content"] if len(before) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in before)
    return Example(shown, "", reference, {"messages": msgs[: last + 1]}, where, before), None


def _adapter_entries(rd: RunDir, cfg, adapters: list[str]) -> list:
    """The library entries of the adapters asked for: each given once, each of the run's base."""
    from studio.adapters import library

    entries = [library.resolve(str(a), rd.path.parent) for a in adapters]
    seen: dict[str, str] = {}
    mine = library.Entry(rd.id, str(rd.path), cfg.model.name_or_path, cfg.model.task, "run", None, None, [], 0)
    for a, e in zip(adapters, entries):
        where = str(Path(e.path).resolve())
        if where in seen:
            raise UsageError(f"--adapter {a} is the same adapter as --adapter {seen[where]}; give each once")
        seen[where] = a
        if not library.same_base(mine, e):
            raise UsageError(f"--adapter {a}: {e.name} was trained on {e.base}, not on {cfg.model.name_or_path} "
                             f"(the base of run {rd.id}); pick adapters of that base (studio adapters list)")
    return entries


def _columns(pg, entries: list, adapters: list[str] | None) -> tuple[dict, dict]:
    """{column: the playground's adapter argument} and {column: adapter folder} for the adapters asked
    for; without any, {"base": False, "tuned": True} (the run's own adapter)."""
    if not adapters:
        return {"base": False, "tuned": True}, {}
    loaded = pg.load_adapters([str(a) for a in adapters])
    columns, paths = {"base": False}, {}
    for e, internal in zip(entries, loaded):
        col, k = e.name, 2
        while col in columns:  # two folders both called "adapter", or one called "base"
            col, k = f"{e.name}-{k}", k + 1
        columns[col] = internal
        paths[col] = e.path
    return columns, paths


def _require_adapter(rd: RunDir) -> None:
    if adapter_file.present(rd.adapter) or rd.last_complete_checkpoint() is not None:
        return
    st = rd.status()
    raise AdapterError(f"run {rd.id} has no adapter to evaluate (state {st.get('state')}, step {st.get('step', 0)} "
                       f"of {st.get('max_steps')}); wait for its first checkpoint or its end")


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


# --- causal LMs -----------------------------------------------------------------------------

def _generate_all(pg, examples: list[Example], max_new_tokens: int, batch_size: int, report: Progress,
                  columns: dict) -> dict:
    from studio.data.prepare import chat_prompt

    tok = pg.tokenizer
    if max_new_tokens >= pg.max_positions:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
                         f"{pg.max_positions} positions")
    for ex in examples:
        if ex.messages is not None:
            ex.text = chat_prompt(tok, ex.messages, add_generation_prompt=True)
    # The end of a prompt too long to fit is kept: the question is at its end.
    prompts = [pg.encode(ex.text)[-(pg.max_positions - max_new_tokens):] for ex in examples]
    refs = [ex.reference for ex in examples]
    encoded = _reference_tokens(pg, examples)
    out, metrics = {}, {}
    total = len(columns) * (len(examples) + len(encoded))
    done = 0

    def tick(k: int, phase: str) -> None:
        nonlocal done
        done += k
        report(done, total, phase)

    model = pg.model
    for col, adapter in columns.items():
        # PEFT's switch on the one loaded model: the LoRA branch off for base, else that adapter on.
        pg.select(adapter)
        texts = generate_greedy(model, tok, prompts, max_new_tokens, batch_size, eos_ids(model, tok),
                                lambda k, col=col: tick(k, col))
        loss = reference_loss(model, encoded, _pad_id(tok), lambda k: tick(k, "loss"))
        out[col] = texts
        metrics[col] = {"exact_match": exact_match(texts, refs), "rouge_l": rouge_l(texts, refs), "loss": loss}
    pg.select(True)
    rows = []
    for i, ex in enumerate(examples):
        row = {"prompt": ex.prompt, "reference": ex.reference}
        for col in columns:
            row[col] = out[col][i]
        for col in columns:
            row[f"{col}_match"] = out[col][i].strip() == ex.reference.strip()
        rows.append({**row, "where": ex.where})
    return {"metrics": metrics, "examples": rows}


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the generation config's EOS ids and the tokenizer's (as the playground)."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(gen if isinstance(gen, (list, tuple)) else [gen]) | {tokenizer.eos_token_id}
    return sorted(int(e) for e in ids if e is not None)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                    eos: list[int], on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to token-id prompts, `batch_size` at a time, left-padded, through model.generate."""
    import torch
    from transformers import GenerationConfig

    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    # A fresh config: the model's own may ask for sampling, a temperature or a repetition penalty.
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                          pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    eos_set = set(eos)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i])
            mask[row, width - n:] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos_set), len(new))
            answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))
    return answers


def _reference_tokens(pg, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per example with only the reference trained: the trainer's encoding of the row
    up to the reference, keeping the last run of trained tokens (earlier assistant turns are context)."""
    from studio.data.prepare import IGNORE, encode_causal

    by_format: dict[str, list[int]] = {}
    for k, ex in enumerate(examples):
        fmt = "messages" if "messages" in ex.row else "alpaca" if "instruction" in ex.row else "completion"
        by_format.setdefault(fmt, []).append(k)
    encoded: list = [None] * len(examples)
    for fmt, ks in by_format.items():
        pairs = encode_causal(pg.tokenizer, fmt, [examples[k].row for k in ks], [examples[k].where for k in ks])
        for k, (ids, labels) in zip(ks, pairs):
            keep = [IGNORE] * len(labels)
            j = len(labels) - 1
            while j >= 0 and labels[j] == IGNORE:
                j -= 1
            while j >= 0 and labels[j] != IGNORE:
                keep[j] = labels[j]
                j -= 1
            ids, keep = ids[-pg.max_positions:], keep[-pg.max_positions:]
            encoded[k] = (ids, keep)
    return [e for e in encoded if any(t != IGNORE for t in e[1][1:])]


def reference_loss(model, encoded: list[tuple[list[int], list[int]]], pad_id: int,
                   on_batch: Callable[[int], None] | None = None) -> float | None:
    """Token-weighted mean cross-entropy of the labelled tokens (shifted as causal LMs predict them)."""
    import torch

    from studio.data.prepare import IGNORE, PadCollator

    device = next(model.parameters()).device
    collate, total, count = PadCollator(pad_id), 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for start in range(0, len(order), LOSS_BATCH):
        feats = [{"input_ids": encoded[i][0], "labels": encoded[i][1]} for i in order[start: start + LOSS_BATCH]]
        batch = collate(feats)
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
        labels = batch["labels"].to(device)[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE,
                                                   reduction="sum")
        total += float(losses)
        count += int((labels != IGNORE).sum())
        if on_batch:
            on_batch(len(feats))
    return total / count if count and math.isfinite(total) else None


# --- classifiers ----------------------------------------------------------------------------

def _classify(pg, examples: list[Example], d, report: Progress, columns: dict) -> dict:
    labels = [pg.id2label[i] for i in sorted(pg.id2label)]
    gold = [_gold_name(ex, d) for ex in examples]
    for g, ex in zip(gold, examples):
        if g not in labels:
            raise DataError(f"{ex.where}: label {g!r} is not one this run was trained on; its labels: "
                            f"{', '.join(labels)}")
    texts = [ex.text for ex in examples]
    preds, metrics = {}, {}
    for k, (col, adapter) in enumerate(columns.items()):
        preds[col] = [r["label"] for r in pg.classify(texts, adapter=adapter)]
        metrics[col] = classification_metrics(gold, preds[col], labels)
        report((k + 1) * len(texts), len(columns) * len(texts), col)
    rows = []
    for i, (ex, g) in enumerate(zip(examples, gold)):
        row = {"prompt": ex.prompt, "reference": g}
        row.update({col: preds[col][i] for col in columns})
        row.update({f"{col}_match": preds[col][i] == g for col in columns})
        rows.append({**row, "where": ex.where})
    return {"metrics": metrics, "examples": rows, "labels": labels}


def _gold_name(ex: Example, d) -> str:
    import datasets

    value = ex.row[d.label_column]
    feat = d.dataset.features[d.label_column]
    if isinstance(feat, datasets.ClassLabel):
        return feat.names[int(value)]
    return str(value)
