"""Datasets for training: formats, prompts, tokenization, packing, splits and the preview.

Reading and checking files (JSONL, JSON, CSV, TSV, Parquet, TXT, save_to_disk folders, Hub ids,
with `file:LINE` errors) lives in load.py; `load_records` and `DataError` are used from here.

Formats (detected from the columns, or forced with data.format; data.columns renames a file's
own columns onto these fields):
  alpaca          instruction, optional input, output
  messages        messages: [{role, content}, ...]; rendered with the tokenizer's chat template,
                  or without one with the plain template "<|role|>\\ncontent\\n" per turn.
                  ShareGPT files (conversations: [{from: human|gpt|system, value}]) and TRL's
                  conversational prompt/completion (both lists of messages) load as messages; in
                  the latter only the completion's assistant turns carry loss
  completion      prompt, completion (TRL's standard prompt/completion): the prompt verbatim,
                  loss on the completion
  text            text (or sentence): raw text for causal LM
  classification  text (or sentence) + label (or labels): ints or strings, mapped to ids in
                  sorted order (a ClassLabel keeps its own names and ids)
Alpaca examples always use ALPACA_TEMPLATE (a chat template is for conversations); the
playground builds its prompts with `alpaca_prompt` / `chat_prompt` so training and generation
see the same text.

Masking: for alpaca and messages only response tokens carry labels; prompt tokens get -100
unless data.train_on_prompt. The full example is tokenized once (offsets tell which tokens
hold response characters), so tokenizers that add a prefix space to each call do not change
the text. Every causal example ends with EOS, trained, so the model learns to stop.

Packing (causal LM, data.packing): examples are concatenated and cut into blocks of exactly
max_length; the last block is padded (labels -100), so no token is lost. Each block carries
position_ids that restart at 0 at every example start and at every block start, and the
packed collator leaves attention_mask out: transformers then builds a block-diagonal causal
mask from the position_ids (sdpa, eager and flash-attention alike), so an example never
attends to its neighbours and sees the same positions it would alone. The first token of each
piece gets label -100, since the token before it belongs to another example. A model whose
attention ignores position_ids would attend across examples inside a block: the usual
pretraining trade-off, harmless for the loss masks above, never for padding. Without packing,
examples are truncated to max_length and padded per batch to the longest one (PadCollator);
a `length` column lets the Trainer group similar lengths (train_sampling_strategy
"group_by_length").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from studio.config import RunConfig
from studio.data.load import (BUILTIN_DIR, COMPLETION_START, LABEL_COLUMNS, TEXT_COLUMNS, LoadedData, _detect, _short,
                              check_task, load_config_data, load_records)
from studio.errors import DataError

IGNORE = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
BUILTINS = {
    "instructions": ("instructions.jsonl", "causal_lm",
                     "Templated instructions with short regular answers (spelling backwards, capitals, "
                     "arithmetic in words, plurals, antonyms, colors...): tiny-llama learns it in a minute."),
    "sentiment": ("sentiment.jsonl", "seq_cls",
                  "Movie and product review sentences labelled positive or negative, for minilm-l6."),
    "profile-json": ("profile-json.jsonl", "causal_lm",
                     "Chat: any sentence about a person is answered with one line of strict JSON "
                     "(name, age, city, job), over 1 to 3 turns; SmolLM2 answers in prose until trained."),
    "profile-json-heldout": ("profile-json-heldout.jsonl", "causal_lm",
                             "Held-out prompts for profile-json (other names, cities, jobs and sentence "
                             "shapes), for the Evaluate tab and studio eval --data; not for training."),
}
_PREVIEW_SAMPLE = 2000  # token statistics over the first rows only: the preview must stay instant
# ...and over at most this many characters of them: tokenizing costs about 300 bytes of memory and
# 2 us per character, so a 200 MB upload of long documents would take minutes and tens of GB.
_PREVIEW_CHARS = 1_000_000

@dataclass
class Prepared:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    collator: Callable
    format: str
    reason: str
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    train_tokens: int = 0
    packed: bool = False
    group_by_length: bool = False
    train_examples: int = 0
    eval_examples: int = 0
    warnings: list[str] = field(default_factory=list)


# --- prompts ------------------------------------------------------------------------------

def alpaca_prompt(instruction: str, input: str | None = "") -> str:
    """The prompt an alpaca example is trained with; the response follows it directly."""
    block = f"### Input:\n{input}\n\n" if input else ""
    return ALPACA_TEMPLATE.format(instruction=instruction, input_block=block)


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Conversation text: the tokenizer's chat template, else the plain "<|role|>\\ncontent\\n" one."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def _segments(row: dict, fmt: str, text_col: str | None, tokenizer, where: str) -> list[tuple[str, bool]]:
    """An example as (text, is_response) pieces; their concatenation is what the model reads."""
    if fmt == "alpaca":
        return [(alpaca_prompt(row["instruction"], row.get("input")), False), (row["output"], True)]
    if fmt == "text":
        return [(row[text_col], True)]
    if fmt == "completion":  # TRL's prompt/completion: the prompt as it is, loss on the completion
        return [(row["prompt"], False), (row["completion"], True)]
    msgs = row["messages"]
    first_trained = row.get(COMPLETION_START) or 0
    try:
        whole = chat_prompt(tokenizer, msgs, add_generation_prompt=False)
        segs, pos = [], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i < first_trained:
                continue
            # This turn's text is what renders between "prompt so far" and "prompt plus this
            # turn": its end-of-turn marker is trained too, so the model learns to stop.
            before = chat_prompt(tokenizer, msgs[:i], add_generation_prompt=True)
            upto = chat_prompt(tokenizer, msgs[: i + 1], add_generation_prompt=False)
            start, end = len(before), len(upto)
            if not (whole.startswith(upto) and upto.startswith(before) and start >= pos):
                start = whole.find(m["content"], pos)  # template not prefix-stable: train the content
                if start < 0:
                    continue
                end = start + len(m["content"])
            segs += [(whole[pos:start], False), (whole[start:end], True)]
            pos = end
        return segs + [(whole[pos:], False)]
    except Exception as e:  # jinja errors: e.g. a template that demands alternating roles
        raise DataError(f"{where}: the tokenizer's chat template rejected this conversation: {_short(e)}") from None


# --- tokenization -------------------------------------------------------------------------

class _CausalEncoder:
    def __init__(self, tokenizer, fmt: str, text_col: str | None, train_on_prompt: bool):
        self.tok, self.fmt, self.text_col, self.all = tokenizer, fmt, text_col, train_on_prompt
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None
        self.eos = tokenizer.eos_token_id

    def encode(self, rows: list[dict], wheres: list[str]) -> list[tuple[list[int], list[int]]]:
        segs = [_segments(r, self.fmt, self.text_col, self.tok, w) for r, w in zip(rows, wheres)]
        texts = ["".join(t for t, _ in s) for s in segs]
        out = []
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            for s, ids, offs in zip(segs, enc["input_ids"], enc["offset_mapping"]):
                spans, pos = [], 0
                for t, resp in s:
                    if resp or self.all:
                        spans.append((pos, pos + len(t)))
                    pos += len(t)
                # A token is trained when it holds any response character.
                keep = [any(a < e and max(b, a + 1) > st for st, e in spans) for a, b in offs]
                out.append((list(ids), [i if k else IGNORE for i, k in zip(ids, keep)]))
        else:  # slow tokenizers give no offsets: tokenize the pieces one by one
            for s in segs:
                ids, labels = [], []
                for t, resp in s:
                    piece = self.tok(t, add_special_tokens=False).input_ids if t else []
                    ids += piece
                    labels += piece if resp or self.all else [IGNORE] * len(piece)
                out.append((ids, labels))
        for (ids, labels), s, text in zip(out, segs, texts):
            if self.bos is not None and not text.startswith(self.tok.bos_token or "\0"):
                ids.insert(0, self.bos)
                labels.insert(0, IGNORE)
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
                last_is_response = next((resp for t, resp in reversed(s) if t), False)
                labels.append(self.eos if last_is_response or self.all else IGNORE)
        return out


def _tokenize_causal(d: LoadedData, ds: datasets.Dataset, enc: _CausalEncoder, index: list[int]):
    ids_all, labels_all = [], []
    for start in range(0, len(ds), 1000):
        rows = ds[start: start + 1000]
        rows = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
        where = [d.locate(index[start + k]) for k in range(len(rows))]
        for ids, labels in enc.encode(rows, where):
            ids_all.append(ids)
            labels_all.append(labels)
    return ids_all, labels_all


def pack(ids: list[list[int]], labels: list[list[int]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate examples into [n_blocks, max_length] arrays; see the module docstring."""
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    total = int(lens.sum())
    n_blocks = max(1, -(-total // max_length))
    size = n_blocks * max_length
    flat = np.full(size, pad_id, dtype=np.int64)
    lab = np.full(size, IGNORE, dtype=np.int64)
    flat[:total] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=total)
    lab[:total] = np.fromiter((t for x in labels for t in x), dtype=np.int64, count=total)
    idx = np.arange(size)
    ex_start = np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    ex_start = np.concatenate([ex_start, np.full(size - total, total)])  # the tail padding is one more piece
    pos = idx - np.maximum(ex_start, idx // max_length * max_length)
    lab[pos == 0] = IGNORE
    mask = (idx < total).astype(np.int64)
    return {k: v.reshape(n_blocks, max_length) for k, v in
            (("input_ids", flat), ("attention_mask", mask), ("labels", lab), ("position_ids", pos))}


def _table(cols: dict[str, Any]) -> datasets.Dataset:
    arrays = {}
    for k, v in cols.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1).astype(np.int32)), v.shape[1])
        elif v and isinstance(v[0], list):
            arrays[k] = pa.array(v, type=pa.list_(pa.int32()))
        else:
            arrays[k] = pa.array(v, type=pa.int32())
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(arrays)))


@dataclass
class PadCollator:
    """Pads a batch to its longest example (right side); labels pad with -100. Extra keys are dropped."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            if isinstance(features[0]["labels"], list):
                lab = torch.full((len(features), n), IGNORE, dtype=torch.long)
                for i, f in enumerate(features):
                    lab[i, : len(f["labels"])] = torch.tensor(f["labels"])
            else:
                lab = torch.tensor([f["labels"] for f in features], dtype=torch.long)
            batch["labels"] = lab
        return batch


@dataclass
class PackedCollator:
    """Stacks packed blocks. No attention_mask on purpose: see the module docstring."""

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {k: torch.tensor([f[k] for f in features], dtype=torch.long)
                                 for k in ("input_ids", "labels", "position_ids") if k in features[0]}
        # transformers only derives the per-example mask from position_ids when no KV cache is
        # made, and models default to config.use_cache=True even while training.
        batch["use_cache"] = False
        return batch


# --- the trainer's entry point ------------------------------------------------------------

def _split(n: int, fraction: float, seed: int, strata: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Row indices for train and eval; eval gets >= 1 row when fraction > 0 and n >= 2."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(n * fraction)))
    ds = datasets.Dataset.from_dict({"i": list(range(n))} | ({"y": strata} if strata else {}))
    kw = {}
    if strata:
        ds = ds.cast_column("y", datasets.ClassLabel(num_classes=max(strata) + 1))
        kw = {"stratify_by_column": "y"}
    try:
        parts = ds.train_test_split(test_size=n_eval, seed=seed, keep_in_memory=True, **kw)
    except ValueError:  # too few rows of some label to stratify: split at random
        parts = ds.train_test_split(test_size=n_eval, seed=seed, keep_in_memory=True)
    return parts["train"]["i"], parts["test"]["i"]


def split_rows(cfg: RunConfig, d: LoadedData) -> tuple[list[int], list[int]]:
    """Row indices of `d` in the train and eval splits build_datasets draws for `cfg` (same seed,
    same strata), so held-out evaluation sees exactly the rows training never did."""
    strata = None
    if d.format == "classification":
        col = d.dataset[d.label_column]
        lookup = {v: i for i, v in enumerate(d.labels)}
        is_class_label = isinstance(d.dataset.features[d.label_column], datasets.ClassLabel)
        strata = list(col) if is_class_label else [lookup[v] for v in col]
    return _split(d.num_rows, cfg.data.eval_fraction, cfg.train.seed, strata)


def encode_causal(tokenizer, fmt: str, rows: list[dict], wheres: list[str],
                  text_col: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of causal-LM rows as the trainer tokenizes and masks them (responses only)."""
    return _CausalEncoder(tokenizer, fmt, text_col, False).encode(rows, wheres)


def build_datasets(cfg: RunConfig, tokenizer, world_batch: int | None = None) -> Prepared:
    """Tokenized train/eval datasets and the collator for `cfg`.

    world_batch: sequences in one step over all processes (per_device_train_batch_size x
    processes); the train split must fill it. Defaults to per_device_train_batch_size.
    """
    dc = cfg.data
    d = load_config_data(dc)
    check_task(d, cfg.model.task)
    need = world_batch or cfg.train.per_device_train_batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    warnings: list[str] = []
    if d.format == "classification":
        names = [str(x) for x in d.labels]
        col = d.dataset[d.label_column]
        lookup = {v: i for i, v in enumerate(d.labels)}
        y = list(col) if isinstance(d.dataset.features[d.label_column], datasets.ClassLabel) else [lookup[v] for v in col]
        tr, ev = _split(d.num_rows, dc.eval_fraction, cfg.train.seed, y)
        texts = d.dataset[d.text_column]

        def encode(idx):
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=dc.max_length)
            return _table({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                           "labels": [y[i] for i in idx], "length": [len(x) for x in enc["input_ids"]]})
        train, evl = encode(tr), (encode(ev) if ev else None)
        prep = Prepared(train, evl, PadCollator(pad_id), d.format, d.reason, len(names), dict(enumerate(names)),
                        {n: i for i, n in enumerate(names)}, int(sum(train["length"])), False, True, len(tr), len(ev))
        unit = "examples"
    else:
        tr, ev = _split(d.num_rows, dc.eval_fraction, cfg.train.seed)
        enc = _CausalEncoder(tokenizer, d.format, d.text_column, dc.train_on_prompt)

        def encode(idx):
            ids, labels = _tokenize_causal(d, d.dataset.select(idx, keep_in_memory=True), enc, idx)
            if dc.packing:
                blocks = pack(ids, labels, dc.max_length, pad_id)
                # A block of prompt tokens only has no target: a batch of such blocks has a loss of
                # 0/0 = NaN, which would end the run as `diverged`. It teaches nothing, so drop it.
                keep = (blocks["labels"] != IGNORE).any(axis=1)
                if not keep.all():
                    blocks = {k: v[keep] for k, v in blocks.items()}
                return _table(blocks), sum(map(len, ids)), int((~keep).sum())
            ids, labels = [x[: dc.max_length] for x in ids], [x[: dc.max_length] for x in labels]
            keep = [i for i, lab in enumerate(labels) if any(t != IGNORE for t in lab)]
            cols = {"input_ids": [ids[i] for i in keep], "attention_mask": [[1] * len(ids[i]) for i in keep],
                    "labels": [labels[i] for i in keep], "length": [len(ids[i]) for i in keep]}
            return _table(cols), sum(cols["length"]), len(ids) - len(keep)

        (train, n_tok, dropped), evl = encode(tr), (encode(ev)[0] if ev else None)
        evl = evl if evl is not None and len(evl) else None  # every eval example lost its response
        if dropped and dc.packing:
            warnings.append(f"{dropped} packed training blocks dropped: they hold prompt tokens only, "
                            "no response token to learn from")
        elif dropped:
            warnings.append(f"{dropped} training examples dropped: no response token within "
                            f"max_length={dc.max_length}")
        if len(train) == 0:
            raise DataError(f"{dc.path}: no example keeps a response token within data.max_length={dc.max_length}")
        prep = Prepared(train, evl, PackedCollator() if dc.packing else PadCollator(pad_id), d.format, d.reason,
                        train_tokens=n_tok, packed=dc.packing, group_by_length=not dc.packing,
                        train_examples=len(tr), eval_examples=len(ev), warnings=warnings)
        unit = f"blocks of {dc.max_length} tokens (packed from {len(tr)} examples)" if dc.packing else "examples"
    if len(prep.train) < need:
        raise DataError(f"{dc.path}: {len(prep.train)} training {unit} after holding out {len(ev)} for eval, "
                        f"fewer than one batch of {need}; add examples or lower train.per_device_train_batch_size"
                        + (" or data.max_length" if prep.packed else " or data.eval_fraction"))
    return prep


# --- preview and built-ins ----------------------------------------------------------------

def preview(path: str, tokenizer=None, fmt: str = "auto", n: int = 5, max_length: int = 256,
            columns: dict | None = None) -> dict:
    """Plain data for the UI: first rows, format, counts, token-length statistics (no tokenizer: None)."""
    d = load_records(path, fmt, columns)
    ds = d.dataset
    out = {"rows": [dict(r) for r in ds.select(range(min(n, d.num_rows)))], "format": d.format,
           "reason": d.reason, "num_rows": d.num_rows, "columns": d.columns, "token_stats": None, "labels": None}
    if d.format == "classification":
        out["labels"] = {str(d.labels[v] if isinstance(ds.features[d.label_column], datasets.ClassLabel) else v): c
                         for v, c in sorted(Counter(ds[d.label_column]).items())}
    if tokenizer is not None:
        m = _preview_rows(ds, min(d.num_rows, _PREVIEW_SAMPLE))
        if d.format == "classification":
            lengths = [len(x) for x in tokenizer(ds[d.text_column][:m])["input_ids"]]
        else:
            enc = _CausalEncoder(tokenizer, d.format, d.text_column, True)
            ids, _ = _tokenize_causal(d, ds.select(range(m), keep_in_memory=True), enc, list(range(m)))
            lengths = [len(x) for x in ids]
        a = np.array(lengths)
        out["token_stats"] = {"min": int(a.min()), "mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
                              "p95": int(np.percentile(a, 95)), "max": int(a.max()),
                              "truncated": int((a > max_length).sum()), "counted": m}
    return out


def _preview_rows(ds: datasets.Dataset, m: int) -> int:
    """How many of the first `m` rows fit in _PREVIEW_CHARS of text (at least one)."""
    head = ds.data.slice(0, m)
    chars = np.zeros(m, dtype=np.int64)
    for col in head.column_names:
        arr = head.column(col)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            n = pc.utf8_length(arr).to_numpy(zero_copy_only=False).astype(np.float64)
            chars += np.nan_to_num(n).astype(np.int64)  # a null counts 0
        elif not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
            chars += np.array([len(str(v)) for v in arr.to_pylist()], dtype=np.int64)  # messages and other nesting
    return max(1, int(np.searchsorted(np.cumsum(chars), _PREVIEW_CHARS, side="right")))


def list_builtin() -> list[dict]:
    """The sample datasets shipped in assets/datasets."""
    out = []
    for name, (file, task, description) in BUILTINS.items():
        p = BUILTIN_DIR / file
        if not p.is_file():
            continue
        with open(p, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        cols = list(json.loads(lines[0])) if lines else []
        text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
        label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
        fmt = _detect(str(p), cols, "auto", text_col, label_col)[0]
        out.append({"name": name, "path": str(p), "format": fmt, "task": task, "rows": len(lines),
                    "description": description})
    return out
