"""Runs tab: every run in the runs folder, overlaid curves, resume and delete."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import runs
from studio.errors import StudioError
from studio.ui.widgets.charts import loss_figure

COLUMNS = ["id", "state", "steps", "final loss", "eval loss", "duration", "trainable", "targets", "r / alpha",
           "model"]


def table(runs_dir: Path) -> list[list]:
    out = []
    for r in runs.list_runs(runs_dir):
        targets = r.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else (targets or "")
        out.append([
            r["id"], r["state"], f"{r['step'] or 0} / {r['max_steps'] or '?'}",
            _fmt(r.get("last_loss")), _fmt(r.get("eval_loss")),
            _dur(r.get("duration_s")), f"{r['trainable_params']:,}" if r.get("trainable_params") else "",
            targets[:60], f"{r.get('r')} / {r.get('lora_alpha')}", r.get("model") or "",
        ])
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else ""


def _dur(s) -> str:
    if not s:
        return ""
    s = int(s)
    return time.strftime("%H:%M:%S", time.gmtime(s))


def run_ids(runs_dir: Path) -> list[str]:
    return [r["id"] for r in runs.list_runs(runs_dir)]


def run_folder(runs_dir: Path, run_id: str) -> Path:
    """A run folder by id; ids come from the browser, so nothing but a direct child is accepted."""
    if not runs.is_run_id(run_id):
        raise gr.Error(f"no run {run_id!r}", print_exception=False)
    d = runs_dir / run_id
    if not (d / runs.CONFIG).is_file():
        raise gr.Error(f"no run {run_id!r} in {runs_dir}", print_exception=False)
    return d


def overlay(runs_dir: Path, ids: list[str]):
    series = {}
    for run_id in ids or []:
        rows, _ = runs.read_metrics(run_folder(runs_dir, run_id), 0)
        series[run_id] = rows
    return loss_figure(series)


def resume(runs_dir: Path, run_id: str) -> str:
    try:
        runs.resume_run(run_folder(runs_dir, run_id))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return f"Resumed **{run_id}** from its last complete checkpoint; follow it on the Train tab."


def delete(runs_dir: Path, run_id: str) -> str:
    try:
        runs.delete_run(run_folder(runs_dir, run_id))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return f"Deleted **{run_id}**."


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ui.runs_table = gr.Dataframe(table(runs_dir), headers=COLUMNS, elem_id="runs-table", interactive=False, wrap=True,
                                 max_height=420, label="Runs")
    with gr.Row():
        ui.refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
        ui.pick = gr.Dropdown(run_ids(runs_dir), label="Run", elem_id="runs-pick", scale=3)
        ui.resume = gr.Button("Resume", elem_id="runs-resume", scale=0)
        ui.delete = gr.Button("Delete…", variant="stop", elem_id="runs-delete", scale=0)
        ui.confirm = gr.Button("Yes, delete it", variant="stop", visible=False, elem_id="runs-delete-confirm", scale=0)
    ui.message = gr.Markdown(elem_id="runs-message")
    ui.compare = gr.CheckboxGroup(run_ids(runs_dir), label="Overlay the curves of", elem_id="runs-overlay")
    ui.overlay_plot = gr.Plot(elem_id="runs-plot", label="Loss curves")
    return ui
