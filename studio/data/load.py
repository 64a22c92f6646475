"""Loading and checking dataset files: the first half of the data layer (prepare.py is the rest).

Sources: .jsonl, .json (a list of objects, or an object holding one such list, e.g.
{"data": [...]}), .csv, .tsv, .parquet, .txt (one example per non-blank line), a folder written
by `datasets.save_to_disk`, or a Hub dataset id (split "train") when the path is no local file
and looks like one. JSON, JSONL and TXT are read and checked here line by line, so a bad line is
reported as `file:LINE: what is wrong`; CSV and Parquet go through `datasets.load_dataset` after
an encoding check. Formats are detected from the columns (see data.py for what each means), and
every example is checked before any tokenizer sees it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from studio.errors import DataError

FORMATS = ("alpaca", "messages", "completion", "text", "classification")
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "txt"}
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "labels")
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (`conversations: [{from, value}]`) and the roles they mean.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
# A conversational prompt/completion row becomes `messages`; this column says where the
# completion starts, so only the completion's assistant turns carry loss (as TRL trains them).
COMPLETION_START = "completion_start"
# The fields `data.columns` may map a column of the file onto, per format.
FIELDS = ("instruction", "input", "output", "messages", "prompt", "completion", "text", "label")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "datasets"  # package data
# One example (a line of JSONL/TXT/CSV, or one text value) may hold at most this much. Longer
# ones are almost always a file without line breaks or a misplaced blob; real documents this long
# should be split into several examples. Refused up front, with the line, before any tokenizer sees it.
MAX_EXAMPLE_MB = 1



@dataclass
class LoadedData:
    dataset: datasets.Dataset
    format: str
    reason: str
    columns: list[str]
    num_rows: int
    labels: list | None = None
    text_column: str | None = None
    label_column: str | None = None
    source: str = ""
    locate: Callable[[int], str] = field(default=str, repr=False, compare=False)
    """Row index -> 'file:LINE' (or 'file: row N'), for messages about one row."""


# --- loading ------------------------------------------------------------------------------

def load_records(path: str, fmt: str = "auto", columns: dict | None = None) -> LoadedData:
    """Load and check a dataset; detect (or check the forced) format. Raises DataError.

    `columns` maps the fields a format needs onto the file's own column names
    ({"instruction": "question", "output": "answer"}); ShareGPT conversations and TRL's
    conversational prompt/completion rows are turned into `messages`.
    """
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"data.format = {fmt!r} is not one of: auto, {', '.join(FORMATS)}")
    ds, name, locate = _load_source(str(path))
    if len(ds) == 0:
        raise DataError(f"{name}: no examples (columns found: {', '.join(ds.column_names) or 'none'})")
    ds = _map_columns(ds, columns or {}, name)
    ds, converted = _normalize(ds, locate)
    cols = list(ds.column_names)
    text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
    label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
    fmt, reason = _detect(name, cols, fmt, text_col, label_col)
    if converted:
        reason = f"{converted} -> {fmt}"
    out = LoadedData(ds, fmt, reason, cols, len(ds), None, text_col, label_col, name, locate)
    _check_sizes(out)
    out.labels = _check(out)
    return out


def load_config_data(dc) -> LoadedData:
    """The dataset a run's DataConfig names, with its format and column mapping."""
    return load_records(dc.path, dc.format, dc.columns)


def check_task(d: LoadedData, task: str) -> None:
    """A causal LM trains on text, a classifier on text + label: refuse the other pairings."""
    if task == "seq_cls" and d.format != "classification":
        raise DataError(f"{d.source}: model.task seq_cls needs text + label columns, but {d.reason}")
    if task == "causal_lm" and d.format == "classification":
        raise DataError(f"{d.source}: {d.reason}, which needs model.task seq_cls; or set data.format: text "
                        "to train a language model on the text alone")


def _check_sizes(d: LoadedData) -> None:
    """No text value above MAX_EXAMPLE_MB (JSON, Parquet and saved datasets have no lines to check)."""
    limit = MAX_EXAMPLE_MB << 20
    for col in d.columns:
        feat = d.dataset.features[col]
        if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
            continue
        sizes = pc.binary_length(d.dataset.data.column(col)).to_numpy(zero_copy_only=False)
        sizes = np.nan_to_num(sizes.astype(np.float64))  # nulls
        if len(sizes) and sizes.max() > limit:
            i = int(sizes.argmax())
            raise DataError(f"{d.locate(i)}: {col} is {_mb(int(sizes[i]))} long; one example may be at most "
                            f"{MAX_EXAMPLE_MB} MB (split long documents into several examples)")


def _resolve(path: str) -> Path | None:
    p = Path(path).expanduser()
    if p.exists():
        return p
    # Configs name built-ins as "assets/datasets/NAME.jsonl", relative to the package, whatever the cwd.
    q = BUILTIN_DIR.parent.parent / p
    return q if not p.is_absolute() and q.exists() else None


def _looks_like_hub_id(path: str) -> bool:
    return (Path(path).suffix.lower() not in FILE_KINDS
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", path) is not None)


def _load_source(path: str) -> tuple[datasets.Dataset, str, Callable[[int], str]]:
    p = _resolve(path)
    rows_at = lambda i: f"{path}: row {i + 1}"
    if p is None:
        if not _looks_like_hub_id(path):
            raise DataError(f"{path}: no such file or folder")
        try:
            return datasets.load_dataset(path, split="train"), path, rows_at
        except Exception as e:  # the hub client raises many types; all mean "not reachable or not there"
            raise DataError(f"{path}: no such local file, and loading it as a Hub dataset failed ({_short(e)}); "
                            "check the path, or connect to the network") from None
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{path}: folder is not a dataset saved with datasets' save_to_disk ({_short(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        return ds, path, rows_at
    kind = FILE_KINDS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {p.suffix or '(no extension)'!r}; use "
                        f"{', '.join(FILE_KINDS)} or a folder saved with save_to_disk")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    if kind == "jsonl":
        rows, lines = [], []
        for lineno, text in _lines(p, path):
            if not text.strip():
                continue
            line = text.rstrip("\r\n")  # so an error at the end of the line is not reported at column 1 of the next
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                col = e.colno if e.lineno == 1 else e.pos + 1
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {col}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object like {{\"text\": ...}}, got {_jtype(obj)}")
            rows.append(obj)
            lines.append(lineno)
        locate = lambda i: f"{path}:{lines[i]}"
        return _from_rows(rows, locate, path), path, locate
    if kind == "json":
        return _read_json(p, path)
    if kind == "txt":
        lines, texts = [], []
        for lineno, text in _lines(p, path):
            if text.strip():
                lines.append(lineno)
                texts.append(text.rstrip("\r\n"))
        return datasets.Dataset.from_dict({"text": texts}), path, lambda i: f"{path}:{lines[i]}"
    # CSV / Parquet readers fail on bad bytes with no position, and on a bare header with no reason.
    head: list[str] = []
    for _, text in _lines(p, path):
        if text.strip() and len(head) < 2:
            head.append(text)
    if kind in ("csv", "tsv") and len(head) < 2:
        header = next(csv.reader(head, delimiter="\t" if kind == "tsv" else ","), [])
        raise DataError(f"{path}: no examples (columns found: {', '.join(header) or 'none'})")
    try:
        if kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        else:  # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename column 1
            ds = datasets.load_dataset("csv", data_files=str(p), split="train", encoding="utf-8-sig",
                                       sep="\t" if kind == "tsv" else ",")
    except Exception as e:
        raise DataError(f"{path}: cannot read as {kind.upper()}: {_short(e)}") from None
    return ds, path, rows_at


def _lines(p: Path, name: str, max_bytes: int | None = MAX_EXAMPLE_MB << 20):
    """(line number, text) for each line; a byte that is not UTF-8 is reported with its offset,
    a line longer than `max_bytes` (one example) by its length."""
    if p.suffix.lower() == ".parquet":
        return
    offset = 0
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if max_bytes is not None and len(raw) > max_bytes:
                raise DataError(f"{name}:{lineno}: line is {_mb(len(raw))} long; one example may be at most "
                                f"{MAX_EXAMPLE_MB} MB (split long documents into several examples)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                                f"{offset + e.start}); save the file as UTF-8") from None
            offset += len(raw)
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def _read_json(p: Path, name: str):
    text = "".join(t for _, t in _lines(p, name, max_bytes=None))  # a JSON document is often one line
    if not text.strip():
        raise DataError(f"{name}: empty file (only whitespace)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    key = None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
        if key is None:
            raise DataError(f"{name}: expected a list of objects, or an object with one list of them "
                            f"(e.g. {{\"data\": [...]}}); found keys {', '.join(doc) or 'none'}")
        doc = doc[key]
    if not isinstance(doc, list):
        raise DataError(f"{name}: expected a list of objects, got {_jtype(doc)}")
    where = f"{key}[{{}}]" if key else "item {}"
    locate = lambda i: f"{name}: " + where.format(i)
    for i, obj in enumerate(doc):
        if not isinstance(obj, dict):
            raise DataError(f"{locate(i)}: expected an object like {{\"text\": ...}}, got {_jtype(obj)}")
    return _from_rows(doc, locate, name), name, locate


def _jtype(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _from_rows(rows: list[dict], locate: Callable[[int], str], name: str) -> datasets.Dataset:
    """Rows -> Dataset, refusing a field whose type changes between rows (Arrow would, less clearly)."""
    first: dict[str, tuple[str, int]] = {}
    keys: dict[str, None] = {}
    for i, row in enumerate(rows):
        for k, v in row.items():
            keys.setdefault(k)
            t = _jtype(v)
            if t == "null":
                continue
            if k not in first:
                first[k] = (t, i)
                continue
            t0, i0 = first[k]
            if t != t0 and {t, t0} != {"integer", "number"}:
                hint = ("labels must be all integers or all strings" if k in LABEL_COLUMNS
                        else "a field needs the same type in every row")
                raise DataError(f"{locate(i)}: field {k!r} is {_a(t)} ({_clip(v)}) but {_a(t0)} at "
                                f"{locate(i0)}; {hint}")
    if "messages" in keys:
        for i, row in enumerate(rows):
            _check_messages(row.get("messages"), locate(i))
    try:
        return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    except (pa.ArrowException, ValueError, TypeError) as e:
        raise DataError(f"{name}: cannot build a table from the rows: {_short(e)}") from None


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _short(e: BaseException) -> str:
    e = e.__cause__ or e
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _clip(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# --- the formats people have ---------------------------------------------------------------

def _map_columns(ds: datasets.Dataset, columns: dict, name: str) -> datasets.Dataset:
    """Rename the file's columns to the fields the formats use, as data.columns says."""
    if not isinstance(columns, dict):
        raise DataError(f"data.columns must map fields to column names, e.g. {{instruction: question}}; got {columns!r}")
    have = list(ds.column_names)
    rename = {}
    for want, col in columns.items():
        if want not in FIELDS:
            raise DataError(f"data.columns: {want!r} is not a field; allowed: {', '.join(FIELDS)}")
        if col not in have:
            raise DataError(f"{name}: data.columns.{want} = {col!r} is not a column; its columns: {', '.join(have)}")
        if col != want:
            rename[col] = want
    clash = [w for w in rename.values() if w in have and w not in rename]
    if clash:
        ds = ds.remove_columns(clash)  # the mapped column replaces a same-named one
    return ds.rename_columns(rename) if rename else ds


def _normalize(ds: datasets.Dataset, locate: Callable[[int], str]) -> tuple[datasets.Dataset, str | None]:
    """ShareGPT and conversational prompt/completion rows -> `messages`; others unchanged.

    Returns the dataset and, when it was converted, how (for the detection reason)."""
    cols = ds.column_names
    if "conversations" in cols and "messages" not in cols:
        msgs = [_from_sharegpt(conv, locate(i)) for i, conv in enumerate(ds["conversations"])]
        return _replace(ds, ["conversations"], {"messages": msgs}), "column conversations (ShareGPT from/value turns)"
    if "prompt" in cols and "completion" in cols and "messages" not in cols:
        first_p, first_c = ds[0]["prompt"], ds[0]["completion"]
        if isinstance(first_p, list) and isinstance(first_c, list):
            msgs, starts = [], []
            for i, (p, c) in enumerate(zip(ds["prompt"], ds["completion"])):
                if not isinstance(p, list) or not isinstance(c, list):
                    raise DataError(f"{locate(i)}: prompt and completion must both be lists of {{role, content}} "
                                    "in a conversational prompt/completion dataset")
                msgs.append(list(p) + list(c))
                starts.append(len(p))
            return (_replace(ds, ["prompt", "completion"], {"messages": msgs, COMPLETION_START: starts}),
                    "columns prompt, completion (conversational prompt/completion)")
    return ds, None


def _replace(ds: datasets.Dataset, drop: list[str], new: dict[str, list]) -> datasets.Dataset:
    # Built anew rather than with remove_columns + add_column: a table left with no column has no rows.
    keep = {c: ds[c] for c in ds.column_names if c not in drop}
    return datasets.Dataset.from_dict({**keep, **new})


def _from_sharegpt(conv: Any, where: str) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: conversations must be a non-empty list of {{from, value}}, got {_clip(conv)}")
    out = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{j}] must be an object {{from, value}}, got {_clip(turn)}")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}: conversations[{j}].from is {_clip(turn['from'])}; allowed: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": turn["value"]})
    return out


# --- formats and checks -------------------------------------------------------------------

_NEEDS = {"alpaca": "instruction, output (input optional)",
          "messages": "messages (or ShareGPT conversations, or conversational prompt + completion)",
          "completion": "prompt, completion (TRL's prompt/completion)",
          "text": "text (or sentence)", "classification": "text (or sentence) and label (or labels)"}


def _detect(name: str, cols: list[str], fmt: str, text_col: str | None, label_col: str | None) -> tuple[str, str]:
    fits = {
        "messages": "messages" in cols,
        "alpaca": "instruction" in cols and "output" in cols,
        "completion": "prompt" in cols and "completion" in cols,
        "classification": text_col is not None and label_col is not None,
        "text": text_col is not None,
    }
    used = {"messages": ["messages"], "alpaca": [c for c in ("instruction", "input", "output") if c in cols],
            "completion": ["prompt", "completion"],
            "classification": [text_col, label_col], "text": [text_col]}
    if fmt != "auto":
        if not fits[fmt]:
            raise DataError(f"{name}: format {fmt} needs columns {_NEEDS[fmt]}; found: {', '.join(cols)}")
        return fmt, f"format {fmt} set in the config (columns {', '.join(used[fmt])})"
    for f in ("messages", "alpaca", "completion", "classification", "text"):  # most specific first
        if fits[f]:
            extra = " (no label column)" if f == "text" else ""
            plural = "s" if len(used[f]) > 1 else ""
            return f, f"column{plural} {', '.join(used[f])} found{extra} -> {f}"
    expected = "; ".join(f"{v} ({k})" for k, v in _NEEDS.items())
    hint = f"data.columns: {{instruction: {cols[0]}, output: {cols[-1]}}}" if len(cols) > 1 else f"data.columns: {{text: {cols[0]}}}"
    raise DataError(f"{name}: cannot tell the format from columns {', '.join(cols)}; expected {expected}; "
                    f"or say which column is which, e.g. {hint}")


def _check(d: LoadedData) -> list | None:
    ds = d.dataset
    if d.format == "alpaca":
        _require_text(d, "instruction")
        _require_text(d, "output")
        if "input" in d.columns:
            _require_text(d, "input", optional=True)
    elif d.format == "messages":
        starts = ds[COMPLETION_START] if COMPLETION_START in d.columns else [0] * len(ds)
        for i, (conv, start) in enumerate(zip(ds["messages"], starts)):
            _check_messages(conv, d.locate(i), start or 0)
    elif d.format == "completion":
        _require_text(d, "prompt")
        _require_text(d, "completion")
    else:
        _require_text(d, d.text_column)
    if d.format != "classification":
        return None
    col, feat = d.label_column, ds.features[d.label_column]
    _first_null(d, col, "is missing (null)")
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names)
    dtype = getattr(feat, "dtype", None)
    if not (isinstance(feat, datasets.Value) and (dtype in ("string", "large_string") or dtype.startswith(("int", "uint")))):
        raise DataError(f"{d.locate(0)}: label {_clip(ds[0][col])} is {_a(_describe(feat))}; labels must be "
                        "integers or strings")
    labels = sorted(set(ds[col]))
    if len(labels) < 2:
        raise DataError(f"{d.source}: only one label ({labels[0]!r}) in column {col}; classification needs at least 2")
    return labels


def _describe(feat: Any) -> str:
    if isinstance(feat, datasets.Value):
        return {"large_string": "string", "null": "null"}.get(feat.dtype, f"{feat.dtype} value")
    return "list" if isinstance(feat, (list, datasets.List, datasets.LargeList)) else (
        "object" if isinstance(feat, dict) else type(feat).__name__)


def _require_text(d: LoadedData, col: str, optional: bool = False) -> None:
    if not optional:
        _first_null(d, col, "is empty (null)")
    feat = d.dataset.features[col]
    if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string", "null"):
        return
    arr = d.dataset.data.column(col)
    i = int(np.flatnonzero(~pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
    raise DataError(f"{d.locate(i)}: column {col!r} must hold text, found {_a(_describe(feat))} "
                    f"({_clip(d.dataset[i][col])})")


def _first_null(d: LoadedData, col: str, what: str) -> None:
    arr = d.dataset.data.column(col)
    if arr.null_count:
        i = int(np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{d.locate(i)}: {col} {what}; every row needs one")


def _check_messages(conv: Any, where: str, start: int = 0) -> None:
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}, got {_clip(conv)}")
    for j, m in enumerate(conv):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{j}] must be an object {{role, content}}, got {_clip(m)}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{j}].role is {_clip(m.get('role'))}; allowed: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{j}].content must be text, got {_clip(m.get('content'))}")
    if not any(m["role"] == "assistant" for m in conv[start:]):
        what = "completion" if start else "conversation"
        raise DataError(f"{where}: {what} has no assistant message, so nothing to learn from")
