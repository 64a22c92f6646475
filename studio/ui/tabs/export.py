"""Export tab: merge a run's adapter into its base, verify it, download adapter or merged model.

Downloads are written inside the run folder (exports/), which the server is allowed to serve;
gradio copies a returned file into its cache, so a merged model above ZIP_LIMIT_MB is offered
as its folder path instead of a zip that would be copied again.
"""

from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import runs
from studio.errors import StudioError
from studio.ui.tabs.runs import run_folder, run_ids

ZIP_LIMIT_MB = 512


def exportable(runs_dir: Path) -> list[str]:
    from studio.adapters.file import present

    return [i for i in run_ids(runs_dir) if present(runs_dir / i / runs.ADAPTER)]


def merge(runs_dir: Path, run_id: str, dtype: str, verify: bool, progress=None) -> tuple[str, str | None]:
    """Merge (again) into RUN/merged. Returns (merge-report HTML, merged zip path or None)."""
    from studio.export import merge as merging
    from studio.export import zips as export

    d = run_folder(runs_dir, run_id)

    def report(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress((done, total), desc=f"merging {what}")

    try:
        rep = merging.merge_run(d, dtype=dtype, verify=verify, overwrite=True, progress=report)
        zip_path = None
        if rep.size_mb <= ZIP_LIMIT_MB:
            zip_path = str(export.export_merged_zip(rep.out, runs.RunDir(d).merged_zip))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except OSError as e:  # a full disk: the merge left nothing that looks complete; say why
        where = f" ({e.filename})" if e.filename else ""
        raise gr.Error(f"cannot write the merged model of {run_id}: {e.strerror or e}{where}",
                       print_exception=False) from None
    return report_html(rep.to_dict(), zip_path is None), zip_path


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
        rows.append(("download", f"larger than {ZIP_LIMIT_MB} MB: use the folder above directly"))
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
    ids = exportable(runs_dir)
    with gr.Row():
        ui.run = gr.Dropdown(ids, value=ids[0] if ids else None, label="Run with a final adapter",
                             elem_id="export-run", scale=3)
        ui.dtype = gr.Radio(["float32", "bfloat16", "float16"], value="float32", label="merged dtype", scale=2)
        ui.verify = gr.Checkbox(True, label="verify (logits merged vs base + adapter)", scale=1)
    with gr.Row():
        ui.merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
        ui.download_adapter = gr.DownloadButton("Download adapter (.zip)", elem_id="download-adapter",
                                                interactive=bool(ids))
        ui.download_merged = gr.DownloadButton("Download merged model (.zip)", elem_id="download-merged",
                                               interactive=False)
    ui.merge_report = gr.HTML(elem_id="merge-report")
    return ui
