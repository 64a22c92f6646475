"""Export tab: a run's adapter as a merged safetensors model, a GGUF file or a LoRA GGUF, verified,
with its downloads.

Everything is written inside the run folder (merged/, exports/), which the server is allowed to
serve. Gradio copies a returned file into its cache once, so the merged safetensors files are
offered as they are (no zip that would be a second copy) up to MERGED_LIMIT_MB, and a GGUF file
up to GGUF_LIMIT_MB; beyond that the tab shows the path to use directly.
"""

from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import runs
from studio.errors import StudioError
from studio.ui.tabs.runs import run_folder, run_ids

MERGED_LIMIT_MB = 4096
GGUF_LIMIT_MB = 1024
MERGED, GGUF, LORA_GGUF = "merged safetensors", "GGUF", "adapter-only GGUF (llama.cpp --lora)"
FORMATS = (MERGED, GGUF, LORA_GGUF)


EMPTY = ("**No run has a final adapter yet.** Train one first: pick a model (Model tab) and a dataset (Data "
         "tab), then Start on the Train tab. A run writes its adapter when it completes or is stopped; it is "
         "listed here then.")


def exportable(runs_dir: Path) -> list[str]:
    from studio.adapters.file import present

    return [i for i in run_ids(runs_dir) if present(runs_dir / i / runs.ADAPTER)]


def offered_runs(runs_dir: Path) -> tuple[list[str], str | None]:
    """The runs with a final adapter, newest first, and the one to preselect: the newest completed
    run (not a newer one that was stopped early or failed), else the newest."""
    from studio.adapters.file import present

    rows = [r for r in runs.list_runs(runs_dir) if present(runs_dir / r["id"] / runs.ADAPTER)]
    ids = [r["id"] for r in rows]
    done = next((r["id"] for r in rows if r["state"] == "completed"), None)
    return ids, done or (ids[0] if ids else None)


def run_choice(runs_dir: Path, current: str | None) -> tuple[dict, bool]:
    """The run dropdown's update (the current pick kept while it is offered, else the preselected
    run) and whether there is any run to offer."""
    ids, preferred = offered_runs(runs_dir)
    return gr.update(choices=ids, value=current if current in ids else preferred), bool(ids)


def refresh_view(runs_dir: Path, current: str | None) -> dict:
    """The tab as it opens: the runs to export, or what to do first when there are none."""
    pick, any_run = run_choice(runs_dir, current)
    return {"export.run": pick, "export.empty": gr.update(visible=not any_run)}


def merged_files(folder: Path) -> list[str]:
    """The merged folder's files to download (weights, config, tokenizer), weights first; [] when
    there is no complete merge or it is above MERGED_LIMIT_MB (then its folder is the way)."""
    if not (folder / "config.json").is_file():
        return []
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: (p.suffix != ".safetensors", p.name))
    if not any(p.suffix == ".safetensors" for p in files) or sum(p.stat().st_size for p in files) > MERGED_LIMIT_MB * 2**20:
        return []
    return [str(p) for p in files]


def merged_downloads(files: list[str]) -> dict:
    """The merged model's downloads: the weights file on its button when there is one shard, every file in the list."""
    weights = [f for f in files if f.endswith(".safetensors")]
    one = weights[0] if len(weights) == 1 else None
    return {"export.download_merged": gr.update(value=one, interactive=one is not None),
            "export.merged_files": gr.update(value=files or None)}


def merge(runs_dir: Path, run_id: str, dtype: str, verify: bool, progress=None) -> tuple[str, list[str]]:
    """Merge (again) into RUN/merged. Returns (merge-report HTML, the merged files to offer, [] if too big)."""
    from studio.export import merge as merging

    d = run_folder(runs_dir, run_id)

    def report(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress((done, total), desc=f"merging {what}")

    try:
        rep = merging.merge_run(d, dtype=dtype, verify=verify, overwrite=True, progress=report)
        files = merged_files(Path(rep.out))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except OSError as e:  # a full disk: the merge left nothing that looks complete; say why
        where = f" ({e.filename})" if e.filename else ""
        raise gr.Error(f"cannot write the merged model of {run_id}: {e.strerror or e}{where}",
                       print_exception=False) from None
    return report_html(rep.to_dict(), not files), files


def report_html(r: dict, too_big: bool) -> str:
    rows = [("merged into", f"<code>{html.escape(r['out'])}</code>"),
            ("tensors", f"{r['tensors_merged']} merged, {r.get('tensors_replaced', 0)} replaced (modules_to_save), "
                        f"{r['tensors_copied']} copied"),
            ("size", f"{r['size_mb']:,.1f} MB in {r['shards']} shard(s), dtype {r['dtype']}"),
            ("time / memory", f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:,.0f} MB")]
    if r.get("untied_embeddings"):
        rows.append(("embeddings", "untied: the adapter changed one side of the tied pair"))
    if r.get("max_abs_logit_diff") is not None:
        ok = bool(r.get("ok"))
        rows.append(("verification", f"{'✔' if ok else '✘'} max |Δ logits| merged vs PEFT's merge at the same "
                                     f"precision = <b class='mdiff'>{r['max_abs_logit_diff']:.3g}</b> (a correct merge "
                                     f"stays under {r.get('tolerance', 0):.3g}; rounding the weights to {r['dtype']} "
                                     f"alone moves the logits by {r.get('rounding_effect', 0):.3g}); differs from "
                                     f"base: {r.get('differs_from_base')} (max |Δ| {r.get('base_vs_merged_max_diff', 0):.3g})"))
    if too_big:
        rows.append(("download", f"larger than {MERGED_LIMIT_MB:,} MB: use the folder above directly"))
    return "<table class='mr'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def message_html(text: str, bad: bool = True) -> str:
    return f"<div class='{'bad' if bad else 'ev-ok'}'>{'⚠ ' if bad else ''}{html.escape(text)}</div>" if text else ""


def format_changed(fmt: str, quant: str | None) -> dict:
    """The quant types the chosen format can write, the button that makes it, Ollama for a merged GGUF only."""
    from studio.export.gguf import ADAPTER_QUANTS, QUANTS

    gguf_fmt = fmt in (GGUF, LORA_GGUF)
    allowed = list(ADAPTER_QUANTS if fmt == LORA_GGUF else QUANTS)
    return {"export.quant": gr.update(choices=allowed, value=quant if quant in allowed else "f16", visible=gguf_fmt),
            "export.ollama": gr.update(visible=True) if fmt == GGUF else gr.update(visible=False, value=False),
            "export.dtype": gr.update(visible=not gguf_fmt),
            "export.merge_btn": gr.update(visible=not gguf_fmt),
            "export.gguf_btn": gr.update(visible=gguf_fmt)}


def gguf_view(runs_dir: Path, v: dict, progress=None) -> dict:
    """Export the picked run to GGUF (merged, or its adapter alone): the report, the download, and any
    message next to the button. Bad input is that message, never an exception: the server stays up."""
    from studio.export import gguf

    cleared = {"export.export_report": "", "export.download_gguf": gr.update(value=None, interactive=False)}
    run_id, fmt, quant = v["export.run"], v["export.format"], v["export.quant"]
    if not run_id:
        return {**cleared, "export.gguf_message": message_html("pick a run with a final adapter first (train one on "
                                                               "the Train tab)")}
    if fmt not in (GGUF, LORA_GGUF):
        return {**cleared, "export.gguf_message": message_html(f"format {fmt!r} is not a GGUF one; pick {GGUF!r} or "
                                                               f"{LORA_GGUF!r} (the merged safetensors model is Merge)")}

    def report(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress((done, total), desc=what)

    try:
        rep = gguf.export_run(run_folder(runs_dir, run_id), quant=quant, ollama=bool(v["export.ollama"]),
                              adapter_only=fmt == LORA_GGUF, progress=report)
    except StudioError as e:
        return {**cleared, "export.gguf_message": message_html(str(e))}
    except OSError as e:  # the export removed its partial file; say why
        where = f" ({e.filename})" if e.filename else ""
        return {**cleared, "export.gguf_message": message_html(f"cannot write the GGUF of {run_id}: "
                                                               f"{e.strerror or e}{where}")}
    r = rep.to_dict()
    small = r["bytes"] <= GGUF_LIMIT_MB * 2**20
    return {"export.gguf_message": message_html(f"wrote {Path(r['out']).name}", bad=False),
           "export.export_report": gguf_report_html(r, small),
           "export.download_gguf": gr.update(value=r["out"] if small else None, interactive=small)}


def gguf_report_html(r: dict, downloadable: bool = True) -> str:
    from studio.export.gguf_verify import AGREEMENT, DELTA_TOLERANCE

    vr, quant = r["verify"], r["quant"]
    rows = [("written to", f"<code class='gguf-path'>{html.escape(r['out'])}</code>"),
            ("file", f"{r['bytes'] / 2**20:,.1f} MB, {r['tensors']} tensors, architecture {html.escape(r['architecture'])}, "
                     f"{quant} (norms and biases f32)"
                     + (f"; {len(r['fallback_f16'])} tensor(s) f16: rows not a whole number of blocks"
                        if r.get("fallback_f16") else "")),
            ("time / memory", f"{r['seconds']:.2f} s to convert, {r.get('verify_seconds') or 0:.2f} s to verify, "
                              f"peak RSS {r['peak_rss_mb']:,.0f} MB")]
    if r.get("adapter_only"):
        rows.append(("verification", f"✔ read back with {html.escape(str(vr.get('reader')))}: the update llama.cpp "
                                     f"applies (alpha / r · B @ A, alpha {vr.get('lora_alpha')}) equals the adapter's in "
                                     f"{vr.get('updates')} modules; largest difference "
                                     f"<b class='gdelta'>{vr.get('max_rel_update_diff', 0):.3g}</b> of the update's "
                                     f"largest entry (allowed for {quant}: {DELTA_TOLERANCE.get(quant, 0):g})"))
    else:
        rows += [
            ("verification", f"✔ read back by an independent reader, {html.escape(str(vr.get('reader')))}, and compared "
                             f"with base + adapter merged by PEFT over {vr.get('positions')} tokens of a fixed text"),
            ("tokenizer round trip", f"{'✔' if vr.get('tokenizer_ok') else '✘'} the GGUF's tokenizer gives the same ids "
                                     "as the model's and decodes them to the same text"),
            ("agreement", f"<b class='gagree'>{vr.get('agreement', 0):.1%}</b> of positions pick the same next token "
                          f"as the merged model (at least {AGREEMENT.get(quant, 0):.0%} required for {quant})"),
            ("max |logit diff|", f"<b class='gdiff'>{vr.get('max_abs_logit_diff', 0):.3g}</b>: the largest change of any "
                                 f"logit; the rounding of the weights to {quant}, not a layout error (that changes "
                                 "the next token almost everywhere)")]
    if r.get("modelfile"):
        cmds = "<br>".join(f"<code>{html.escape(c)}</code>" for c in r.get("commands") or [])
        rows.append(("Ollama", f"<code>{html.escape(r['modelfile'])}</code> written beside it; run "
                               f"<span class='ollama-cmds'>{cmds}</span>"))
    if not downloadable:
        rows.append(("download", f"larger than {GGUF_LIMIT_MB:,} MB: use the file above directly"))
    return "<table class='mr'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def adapter_zip(runs_dir: Path, run_id: str) -> str:
    from studio.export import zips as export

    d = run_folder(runs_dir, run_id)
    try:
        from studio.config import load_config

        base = load_config(d / runs.CONFIG).model.name_or_path
        return str(export.export_adapter_zip(runs.RunDir(d).adapter, runs.RunDir(d).adapter_zip, base_name=base))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ids, _ = offered_runs(runs_dir)
    # What to do first. The list, this note and the preselected run are brought up to date each time
    # the tab opens (`refresh_view`): a run picked at build time would be stale on a page opened later.
    ui.empty = gr.Markdown(EMPTY, elem_id="export-empty", visible=not ids)
    with gr.Row():
        ui.run = gr.Dropdown(ids, value=None, label="Run with a final adapter", elem_id="export-run", scale=3)
        ui.format = gr.Radio(list(FORMATS), value=MERGED, label="format", elem_id="export-format", scale=3)
    with gr.Row():
        # "auto": the base's own dtype (a float32 merge of a bfloat16 base doubles the file for nothing)
        ui.dtype = gr.Radio(["auto", "float32", "bfloat16", "float16"], value="auto", label="merged dtype",
                            elem_id="merge-dtype", scale=2)
        ui.verify = gr.Checkbox(True, label="verify (logits merged vs base + adapter)", scale=1)
        from studio.export.gguf import QUANTS

        ui.quant = gr.Dropdown(list(QUANTS), value="f16", label="GGUF quant type (norms and biases stay f32)",
                               elem_id="export-quant", visible=False, scale=2)
        ui.ollama = gr.Checkbox(False, label="also write an Ollama Modelfile", elem_id="export-ollama",
                                visible=False, scale=1)
    with gr.Row():
        ui.merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
        ui.gguf_btn = gr.Button("Export GGUF", variant="primary", elem_id="export-gguf", visible=False)
        ui.download_adapter = gr.DownloadButton("Download adapter (.zip)", elem_id="download-adapter",
                                                interactive=False)
        ui.download_merged = gr.DownloadButton("Download merged weights (.safetensors)", elem_id="download-merged",
                                               interactive=False)
        ui.download_gguf = gr.DownloadButton("Download GGUF", elem_id="download-gguf", interactive=False)
    ui.gguf_message = gr.HTML(elem_id="export-message")
    ui.merged_files = gr.File(label="merged model files (weights, config, tokenizer)", file_count="multiple",
                              interactive=False, elem_id="merged-files")
    ui.merge_report = gr.HTML(elem_id="merge-report")
    ui.export_report = gr.HTML(elem_id="export-report")
    return ui
