"""Data tab: built-in datasets or an upload, checked and previewed before any training starts.

Components are registered under "data.NAME"; the widgets start at DataConfig's defaults.
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from studio import data, models
from studio.config import DATA_FORMATS, DataConfig, field_help
from studio.data.load import check_task
from studio.data.token_view import PAD, token_preview
from studio.errors import StudioError
from studio.ui.registry import Registry

DATA_HELP = field_help(DataConfig)
UPLOAD_KINDS = [".jsonl", ".json", ".csv", ".parquet", ".txt"]
MAX_UPLOAD_MB = 200
# The values `data_config` reads.
DATA_FORM = ("data.dataset_select", "data.data_format", "data.eval_fraction", "data.max_length", "data.packing",
             "data.train_on_prompt")


def data_values(d: DataConfig) -> dict[str, Any]:
    """The Data tab's widget values for data settings (the dataset itself aside: it follows the task)."""
    return {"data.data_format": d.format, "data.eval_fraction": d.eval_fraction, "data.max_length": d.max_length,
            "data.packing": d.packing, "data.train_on_prompt": d.train_on_prompt}


def data_config(v: Mapping[str, Any], base: DataConfig) -> DataConfig:
    """The DATA_FORM values over `base` (the fields without a widget keep its values); not validated here."""
    return replace(base, path=v["data.dataset_select"] or "", format=v["data.data_format"] or "auto",
                   eval_fraction=float(v["data.eval_fraction"]), max_length=int(v["data.max_length"]),
                   packing=bool(v["data.packing"]), train_on_prompt=bool(v["data.train_on_prompt"]))


def max_upload_mb() -> float:
    """The upload limit in MB: $STUDIO_MAX_UPLOAD_MB, else MAX_UPLOAD_MB. Read when the server starts."""
    raw = os.environ.get("STUDIO_MAX_UPLOAD_MB")
    if not raw:
        return float(MAX_UPLOAD_MB)
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 < mb < float("inf"):
        raise ValueError(f"STUDIO_MAX_UPLOAD_MB = {raw!r} must be a number of megabytes > 0")
    return mb


def dataset_choices(runs_dir: Path) -> list[tuple[str, str]]:
    out = [(f"{d['name']}  ·  {d['format']}, {d['rows']} rows", d["path"]) for d in data.list_builtin()]
    up = uploads_dir(runs_dir)
    if up.is_dir():
        for p in sorted(up.iterdir()):
            if p.suffix in UPLOAD_KINDS:
                out.append((f"{p.name}  ·  uploaded", str(p)))
    return out


def dataset_value(path: str) -> str:
    """The dropdown's value for a config's data.path: a built-in, named as configs name it
    ("assets/datasets/NAME.jsonl"), is the path the list shows; any other path is itself."""
    for d in data.list_builtin():
        if path == d["path"] or Path(d["path"]).as_posix().endswith("/" + Path(path).as_posix().lstrip("./")):
            return d["path"]
    return path


def default_dataset(task: str) -> str:
    want = "seq_cls" if task == "seq_cls" else "causal_lm"
    for d in data.list_builtin():
        if d["task"] == want:
            return d["path"]
    return data.list_builtin()[0]["path"]


def dataset_name(path: str) -> str:
    """How the list names a dataset: a built-in by its name, an upload or typed path by its file name."""
    for d in data.list_builtin():
        if path == d["path"]:
            return d["name"]
    return Path(str(path)).name or str(path)


def task_mismatch(path: str, fmt: str | None, task: str) -> str | None:
    """Why the dataset at `path` cannot train a model of `task` (the preflight's words), or None,
    also when it does not load at all: the preview says why next to it, and Start is refused."""
    try:
        loaded = data.load_records(path, fmt or "auto")
    except StudioError:
        return None
    try:
        check_task(loaded, task)
    except StudioError as e:
        return str(e)
    return None


def safe_upload_name(name: str) -> str:
    """A plain file name: no folders, no dots in front, only safe characters."""
    base = Path(str(name).replace("\\", "/")).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._") or "dataset"
    return f"{stem[:80]}{suffix}"


def uploads_dir(runs_dir: Path) -> Path:
    return runs_dir / "uploads"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_upload(src: Path, dest_dir: Path) -> Path | None:
    """The file already kept in `dest_dir` with the content of `src` (its own name first), or None:
    uploading a file again selects the copy kept before instead of adding `x-2.jsonl`."""
    if not dest_dir.is_dir():
        return None
    size, suffix, digest = src.stat().st_size, src.suffix.lower(), None
    named = dest_dir / safe_upload_name(src.name)
    for p in sorted(dest_dir.iterdir(), key=lambda p: p != named):
        if p.suffix == suffix and p.is_file() and p.stat().st_size == size:
            digest = digest or _digest(src)
            if _digest(p) == digest:
                return p
    return None


def save_upload(tmp_path: str | None, runs_dir: Path) -> str:
    """Copy an uploaded file into runs/uploads under a safe name; returns its path. A file with
    the same content kept before is that file (nothing is copied).

    The file is checked first, so a bad upload never lands in the dataset list.
    """
    return _save_upload(tmp_path, runs_dir)[0]


def upload_view(tmp_path: str | None, runs_dir: Path) -> dict[str, Any]:
    """An upload kept and selected in the list (every upload of the runs folder listed); a file
    uploaded again is the copy kept before, and a note says so."""
    path, reused = _save_upload(tmp_path, runs_dir)
    if reused:
        gr.Info(f"{Path(str(tmp_path)).name} was uploaded before (same content): using {Path(path).name}.")
    return {"data.dataset_select": gr.update(choices=dataset_choices(runs_dir), value=path)}


def _save_upload(tmp_path: str | None, runs_dir: Path) -> tuple[str, bool]:
    if not tmp_path:
        raise gr.Error("no file was uploaded", print_exception=False)
    src = Path(tmp_path)
    suffix = src.suffix.lower()
    if suffix not in UPLOAD_KINDS:
        raise gr.Error(f"{src.name}: unsupported file type {suffix or '(none)'}; allowed: {', '.join(UPLOAD_KINDS)}",
                       print_exception=False)
    if src.stat().st_size == 0:
        raise gr.Error(f"{src.name}: the file is empty (0 bytes)", print_exception=False)
    try:
        data.load_records(str(src))
    except StudioError as e:
        raise gr.Error(str(e).replace(str(src.parent) + "/", ""), print_exception=False) from None
    dest_dir = uploads_dir(runs_dir)
    try:
        kept = same_upload(src, dest_dir)
        if kept is not None:
            return str(kept), True
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / safe_upload_name(src.name)
        n = 2
        while dest.exists():
            dest = dest_dir / f"{Path(safe_upload_name(src.name)).stem}-{n}{suffix}"
            n += 1
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)  # a disk that filled up mid-copy leaves no half file behind
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise gr.Error(f"cannot save the upload in {dest_dir}: {e.strerror or e}{where}",
                       print_exception=False) from None
    return str(dest), False


@functools.lru_cache(maxsize=4)
def _tokenizer(ref: str, trust_remote_code: bool):
    # Loading one takes seconds for a real model, and the preview asks on every change; nothing
    # here changes a tokenizer, so the last few models' are kept.
    return models.load_tokenizer(ref, trust_remote_code=trust_remote_code)


def tokenizer_of(model_state: dict | None):
    """The loaded model's tokenizer, or None (explore-only models, or one that cannot load)."""
    state = model_state or {}
    if not state.get("ref") or state.get("explore_only"):
        return None
    try:
        return _tokenizer(state["ref"], bool(state.get("trust_remote_code")))
    except StudioError:
        return None


def preview(path: str, fmt: str, max_length: float, model_state: dict):
    """(rows for the table, info markdown, error or None) for the chosen dataset; token statistics
    with the tokenizer of the model in `model_state`, so they follow the model loaded."""
    if not path:
        return [], "", "choose a dataset"
    tok = tokenizer_of(model_state)
    try:
        p = data.preview(path, tok, fmt or "auto", n=8, max_length=int(max_length))
    except StudioError as e:
        return [], f"<div class='bad'>⚠ {html.escape(str(e))}</div>", str(e)
    rows = [{k: _cell(v) for k, v in r.items()} for r in p["rows"]]
    info = [f"**{p['num_rows']:,} examples** · format **{p['format']}** ({html.escape(p['reason'])})"]
    if p["token_stats"]:
        s = p["token_stats"]
        info.append(f"tokens per example ({html.escape(str(model_state.get('ref')))}'s tokenizer): min {s['min']}, mean {s['mean']}, p50 {s['p50']}, p95 {s['p95']}, "
                    f"max {s['max']}; {s['truncated']} of {s['counted']} longer than max_length {int(max_length)}")
    if p["labels"]:
        info.append("labels: " + ", ".join(f"{html.escape(str(k))} ({v})" for k, v in p["labels"].items()))
    return rows, "<br>".join(info), None


def tokens_html(path: str, fmt: str, max_length: float, packing: bool, train_on_prompt: bool,
                model_state: dict) -> str:
    """The first examples as the trainer sees them (studio.data.token_view): the model's own chat
    template, special tokens boxed, trained tokens marked apart from masked prompt, system and
    padding; the warnings above them."""
    tok = tokenizer_of(model_state)
    if not path or tok is None:
        why = "choose a dataset" if not path else "load a model with a tokenizer to see its tokens"
        return f"<div class='tk-note'>{why}</div>"
    try:
        p = token_preview(path, tok, fmt or "auto", max_length=int(max_length), packing=bool(packing),
                          train_on_prompt=bool(train_on_prompt))
    except StudioError as e:
        return f"<div class='bad'>⚠ {html.escape(str(e))}</div>"
    if p["format"] == "classification":
        return "<div class='tk-note'>classification: each text is read whole and its label trains the head</div>"
    ref = html.escape(str(model_state.get("ref")))
    out = [f"<div class='tk-warn'>⚠ {html.escape(w)}</div>" for w in p["warnings"]]
    template = "its chat template" if p["chat_template"] else "no chat template"
    eot = f" · end of turn: <code>{html.escape(p['end_of_turn'])}</code>" if p["end_of_turn"] else ""
    out.append(f"<div class='tk-legend'>How <b>{ref}</b> reads the first examples ({template}{eot}"
               f"{', packed into blocks of ' + str(int(max_length)) if p['packed'] else ', padded as one batch'}): "
               "<span class='tk tk-on'>trained</span> <span class='tk tk-system'>system</span> "
               "<span class='tk tk-user'>prompt</span> <span class='tk tk-sp'>special</span> "
               "<span class='tk tk-pad'>padding</span> (masked: no loss)</div>")
    for k, s in enumerate(p["sequences"]):
        head = f"{'block' if p['packed'] else 'example'} {k + 1}: {s['tokens']} tokens, {s['trained']} trained"
        head += " · cut at max_length" if s["truncated"] else ""
        out.append(f"<div class='tk-seq' data-seq='{k}'><div class='tk-head'>{head}</div>"
                   f"<div class='tk-body'>{_pieces_html(s['pieces'])}</div></div>")
    return "".join(out)


def _pieces_html(pieces: list[dict]) -> str:
    out, pads = [], 0
    for p in pieces + [None]:
        if p is not None and p["kind"] == PAD:
            pads += 1
            continue
        if pads:
            out.append(f"<span class='tk tk-pad' data-trained='0' data-kind='pad'>pad × {pads}</span>")
            pads = 0
        if p is None:
            break
        kind = p["kind"] if p["kind"] in ("system", "special") else "user"
        cls = "tk-on" if p["trained"] else f"tk-{'sp' if kind == 'special' else kind}"
        cls += " tk-sp-on" if p["trained"] and p["kind"] == "special" else ""
        text = html.escape(p["text"]).replace("\n", "↵\n")
        out.append(f"<span class='tk {cls}' data-trained='{int(p['trained'])}' data-kind='{p['kind']}' "
                   f"title='{' '.join(map(str, p['ids']))}'>{text}</span>")
    return "".join(out)


def preview_view(v: Mapping[str, Any]) -> dict[str, Any]:
    """`preview` of the chosen dataset as updates of the Data tab, and its tokens as the trainer sees them."""
    import pandas as pd

    path, fmt, max_length, state = (v["data.dataset_select"], v["data.data_format"], v["data.max_length"],
                                    v["model.state"])
    rows, info, _ = preview(path, fmt, max_length, state)
    return {"data.dataset_preview": pd.DataFrame(rows), "data.data_info": info,
            "data.dataset_tokens": tokens_html(path, fmt, max_length, v["data.packing"], v["data.train_on_prompt"],
                                               state)}


def _cell(v) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= 300 else s[:300] + "…"


def build(ui: Registry, runs_dir: Path, d: DataConfig | None = None) -> None:
    """The Data tab at data settings `d` (the opening model's starter data; default: DataConfig's)."""
    named = d is not None and d.path != DataConfig().path
    d = d or DataConfig()
    c = {}
    with gr.Row():
        c["dataset_select"] = gr.Dropdown(dataset_choices(runs_dir),
                                          value=dataset_value(d.path) if named else default_dataset("causal_lm"),
                                          label="Dataset", elem_id="dataset-select", scale=3, info=DATA_HELP["path"],
                                          allow_custom_value=True)
        c["data_format"] = gr.Dropdown(list(DATA_FORMATS), value=d.format, label="Format", scale=1,
                                       info=DATA_HELP["format"])
        c["dataset_upload"] = gr.UploadButton("Upload a dataset", file_types=UPLOAD_KINDS, elem_id="dataset-upload",
                                              scale=1)
    with gr.Row():
        c["max_length"] = gr.Slider(16, 4096, value=d.max_length, step=16, label="max_length",
                                    info=DATA_HELP["max_length"])
        c["eval_fraction"] = gr.Slider(0.0, 0.5, value=d.eval_fraction, step=0.01, label="eval_fraction",
                                       info=DATA_HELP["eval_fraction"])
        c["packing"] = gr.Checkbox(d.packing, label="packing", info=DATA_HELP["packing"])
        c["train_on_prompt"] = gr.Checkbox(d.train_on_prompt, label="train_on_prompt", info=DATA_HELP["train_on_prompt"])
    c["data_info"] = gr.Markdown(elem_id="data-info")
    c["dataset_tokens"] = gr.HTML(elem_id="dataset-tokens", label="What the trainer sees")
    c["picked"] = gr.State({})  # the dataset settings the last model pick brought (studio/ui/app.py)
    c["dataset_preview"] = gr.Dataframe(elem_id="dataset-preview", label="First rows", wrap=True, max_height=360,
                                        interactive=False)
    ui.add("data", **c)
