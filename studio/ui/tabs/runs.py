"""Runs tab: every run in the runs folder, the queue, overlaid curves, resume and delete.

A run is picked from the list or by clicking its row; the details under the table say what it
is doing: its place in the queue, why it failed, how it ended, and the command that opens its
experiment tracker. Cancel and move up / down act on a waiting run through the queue's own
functions, with the messages `studio queue` prints.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import runs
from studio.config import load_config
from studio.errors import ConfigError, StudioError
from studio.runs import queue
from studio.ui.widgets.charts import loss_figure

COLUMNS = ["id", "state", "steps", "final loss", "eval loss", "duration", "trainable", "targets", "r / alpha",
           "model"]
# Widths that keep the table inside a 1400 px page (ids and targets wrap instead of scrolling).
WIDTHS = ["22%", "9%", "8%", "7%", "7%", "7%", "8%", "16%", "6%", "10%"]
WAITING = ("queued", "running", "stopping")


def positions(runs_dir: Path) -> dict[str, int]:
    """Queue position by run id for the waiting runs (1 starts next); {} when the queue cannot be read."""
    try:
        return {e["run"]: e["position"] for e in queue.entries(runs_dir) if e["position"]}
    except StudioError:
        return {}  # a queue file edited into nonsense: the details of a queued run say what is wrong


def state_label(state: str | None, position: int | None) -> str:
    return f"queued #{position}" if state == "queued" and position else (state or "")


def table(runs_dir: Path) -> list[list]:
    out, where = [], positions(runs_dir)
    for r in runs.list_runs(runs_dir):
        targets = r.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else (targets or "")
        out.append([
            r["id"], state_label(r["state"], where.get(r["id"])), f"{r['step'] or 0} / {r['max_steps'] or '?'}",
            _fmt(r.get("last_loss")), _fmt(r.get("eval_loss")),
            _dur(r.get("duration_s")), f"{r['trainable_params']:,}" if r.get("trainable_params") else "",
            targets[:60], f"{r.get('r')} / {r.get('lora_alpha')}", r.get("model") or "",
        ])
    return out


def busy(rows: list[list]) -> bool:
    """Whether a run of the table waits or trains (what the tab's timer keeps refreshing for)."""
    return any(str(row[1]).split(" ")[0] in WAITING for row in rows)


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


def clicked_run(row_value) -> str | None:
    """The run id of a clicked table row (its first cell), or None for a click outside the rows."""
    if isinstance(row_value, (list, tuple)) and row_value and runs.is_run_id(row_value[0]):
        return row_value[0]
    return None


def trackers(run_dir: Path, status: dict) -> list[tuple[str, str]]:
    """(tracker, command that opens it) for each train.report_to tracker of the run.

    The trainer records the commands in status.json once it has set the trackers up; before that
    (a queued run) the tracker is named with a note instead."""
    shown = {name: t.get("open") for name, t in (status.get("trackers") or {}).items() if isinstance(t, dict)}
    try:
        wanted = load_config(run_dir / runs.CONFIG).train.report_to
    except ConfigError:
        wanted = []
    for name in wanted:
        shown.setdefault(name, None)
    return [(name, cmd or "") for name, cmd in shown.items()]


def detail(runs_dir: Path, run_id: str | None) -> str:
    """The picked run's details as HTML: state and queue position, the error of a failed run, how it
    ended, its sweep, and the commands that open its trackers."""
    if not run_id:
        return "<p class='rd-none'>Pick a run in the list or click its row.</p>"
    d = run_folder(runs_dir, run_id)
    st = runs.read_status(d)
    state = st.get("state") or "?"
    lines = [f"<span class='badge st-{html.escape(state)}'>{html.escape(state)}</span> "
             f"<b>{html.escape(run_id)}</b> · step {st.get('step') or 0} / {st.get('max_steps') or '?'}"]
    if state == "queued" and not st.get("alive"):
        try:
            pos = queue.position(runs_dir, run_id)
        except StudioError as e:
            lines.append(f"<span class='bad'>{html.escape(str(e))}</span>")
        else:
            lines.append(f"waiting in the queue at position <b>{pos}</b> (1 starts next)" if pos else
                         "not in the queue (start it with Resume)")
    if st.get("sweep"):
        point = ", ".join(f"{k} = {value_text(v)}" for k, v in (st.get("grid") or {}).items())
        lines.append(f"sweep <b>{html.escape(str(st['sweep']))}</b>: {html.escape(point)}")
    if st.get("stop_reason"):
        lines.append(f"ended: {html.escape(str(st['stop_reason']))}")
    if st.get("best_step") is not None:
        metric = st.get("best_metric")
        lines.append(f"best checkpoint: step {st['best_step']}"
                     + (f" ({metric:.4f})" if isinstance(metric, (int, float)) else ""))
    if st.get("note"):
        lines.append(html.escape(str(st["note"])))
    out = "<br>".join(lines)
    if st.get("error"):
        out += f"<div class='rd-error'><b>Why it {'failed' if state == 'failed' else 'ended'}:</b>" \
               f"<pre class='rs-err'>{html.escape(str(st['error']))}</pre></div>"
    shown = trackers(d, st)
    if shown:
        rows = "".join(f"<li>{html.escape(name)}: <code>{html.escape(cmd)}</code></li>" if cmd else
                       f"<li>{html.escape(name)}: the command to open it appears once the run starts</li>"
                       for name, cmd in shown)
        out += f"<div class='rd-trackers'>Open its tracker:<ul>{rows}</ul></div>"
    return f"<div class='rd'>{out}</div>"


def value_text(v) -> str:
    """A config value as a grid writes it: a list of targets as query,value."""
    return ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))


def cancel(runs_dir: Path, run_id: str | None) -> str:
    """Take a waiting run out of the queue (`studio queue cancel`); the message says what happened."""
    if not run_id:
        return "⚠ pick a queued run first"
    try:
        if not queue.cancel(runs_dir, run_id):
            return f"⚠ run {run_id} is not waiting in the queue (studio stop stops a running one)"
    except StudioError as e:
        return f"⚠ {e}"
    return f"{run_id}: removed from the queue"


def move(runs_dir: Path, run_id: str | None, by: int) -> str:
    """Move a waiting run one place up (by=-1) or down (`studio queue up|down`)."""
    if not run_id:
        return "⚠ pick a queued run first"
    try:
        return f"{run_id}: position {queue.move(runs_dir, run_id, by)}"
    except StudioError as e:
        return f"⚠ {e}"


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
                                 max_height=420, label="Runs (click a row to pick it)", column_widths=WIDTHS)
    with gr.Row():
        ui.refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
        ui.pick = gr.Dropdown(run_ids(runs_dir), label="Run", elem_id="runs-pick", scale=3)
        ui.resume = gr.Button("Resume", elem_id="runs-resume", scale=0)
        ui.delete = gr.Button("Delete…", variant="stop", elem_id="runs-delete", scale=0)
        ui.confirm = gr.Button("Yes, delete it", variant="stop", visible=False, elem_id="runs-delete-confirm", scale=0)
    with gr.Row():
        ui.queue_up = gr.Button("Move up", elem_id="runs-queue-up", scale=0, size="sm")
        ui.queue_down = gr.Button("Move down", elem_id="runs-queue-down", scale=0, size="sm")
        ui.queue_cancel = gr.Button("Cancel (leave the queue)", elem_id="runs-queue-cancel", scale=0, size="sm")
        ui.message = gr.Markdown(elem_id="runs-message")
    ui.detail = gr.HTML(detail(runs_dir, None), elem_id="runs-detail")
    ui.compare = gr.CheckboxGroup(run_ids(runs_dir), label="Overlay the curves of", elem_id="runs-overlay")
    ui.overlay_plot = gr.Plot(elem_id="runs-plot", label="Loss curves")
    # Refreshes the table while runs wait or train; switched on by the tab, off once nothing does.
    ui.timer = gr.Timer(3.0, active=False)
    return ui
