"""Sweeps tab: one run per point of a grid over up to three config fields, queued, then compared.

The base of a sweep is the run Start would make from the Model, Data and Train tabs
(train_tab.build_config over train_tab.FORM); the grid goes through the same engine calls as
`studio sweep` (parse_grid, plan, start), so the UI and the CLI refuse the same grids with the
same words. Before anything is queued the plan says how many runs there will be and their
trainable parameters, counted by the engine (sweep.trainable). The results view is
`studio sweep show` as a table and a chart of the eval metric against trainable parameters,
the LoRA paper's ablation plot; "compare" overlays the members' loss curves (the Runs tab's
overlay) and opens the subspace similarity of two members in the Analysis tab.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import plotly.graph_objects as go

from studio.errors import ConfigError, StudioError
from studio.runs import sweep
from studio.ui import live
from studio.ui.tabs import runs as runs_tab
from studio.ui.tabs import train as train_tab
from studio.ui.registry import Registry
from studio.ui.tabs.export import exportable

FIELDS = 3  # rows of the grid form: the paper's ablations vary two fields; a third for a seed or a rate
GRID_FORM = tuple(f"sweeps.key_{i}" for i in range(1, FIELDS + 1)) + tuple(
    f"sweeps.values_{i}" for i in range(1, FIELDS + 1))
PLAN_IN = train_tab.FORM + GRID_FORM
START_IN = PLAN_IN + ("sweeps.name",)
RESULTS_OUT = ("sweeps.table", "sweeps.chart", "sweeps.progress", "sweeps.timer")
VALUES_HELP = ("comma-separated (1,4,16); for target sets separate the sets with | "
               "(query|query,value|all-linear)")


def specs(v: Mapping[str, Any]) -> list[str]:
    """The grid rows as `studio sweep --grid` arguments ("lora.r=1,4,16"); a field without values is unused."""
    out = []
    for i in range(1, FIELDS + 1):
        key, values = (v[f"sweeps.key_{i}"] or "").strip(), (v[f"sweeps.values_{i}"] or "").strip()
        if not values:
            continue
        if not key:
            raise ConfigError(f"row {i}: the values {values!r} need a field to vary (e.g. lora.r)")
        out.append(f"{key}={values}")
    if not out:
        raise ConfigError("the grid is empty: choose a field and its values (e.g. lora.r with 1,4,16)")
    return out


def planned(v: Mapping[str, Any]) -> tuple[Any, dict, list[tuple[dict, int]]]:
    """(base config, grid, [(point, trainable parameters)]) for the form; raises with what is wrong."""
    base = train_tab.build_config(v)
    grid = sweep.parse_grid(specs(v))
    counted: dict[str, int] = {}
    out = []
    for point, cfg in sweep.plan(base, grid):
        key = cfg.to_yaml()  # points that give the same run (lora_alpha on a frozen r...) count once
        if key not in counted:
            counted[key] = sweep.trainable(cfg)
        out.append((point, counted[key]))
    return base, grid, out


def message(e: Exception) -> str:
    """One line for the form: the engine's words without the CLI's flag names."""
    return "⚠ " + str(e).replace("--grid ", "").replace("--name ", "name ")


def plan_view(v: Mapping[str, Any]) -> dict[str, Any]:
    """How many runs the grid makes and their trainable parameters, or why it cannot be queued."""
    if not any((v[f"sweeps.values_{i}"] or "").strip() for i in range(1, FIELDS + 1)):
        return {"sweeps.plan": "<p class='rd-none'>Give a field its values to see the runs and their trainable "
                               "parameters before anything is queued.</p>", "sweeps.message": ""}
    try:
        _, _, points = planned(v)
    except StudioError as e:
        return {"sweeps.plan": "", "sweeps.message": message(e)}
    total = sum(n for _, n in points)
    rows = "".join(f"<tr><td>{html.escape(label(p))}</td><td>{n:,}</td></tr>" for p, n in points)
    plan = (f"<div class='sw-plan' data-runs='{len(points)}' data-total='{total}'><b>{len(points)} runs</b>, "
            f"<b>{total:,}</b> trainable parameters in total; they train one after another in the queue."
            f"<div class='sw-points'><table><tr><th>point</th><th>trainable</th></tr>{rows}</table></div></div>")
    return {"sweeps.plan": plan, "sweeps.message": ""}


def start(root: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Queue one run per point (sweep.start, as `studio sweep` does); nothing is queued on a refusal."""
    try:
        base, grid, _ = planned(v)
        out = sweep.start(base, grid, root, (v["sweeps.name"] or "").strip() or None)
    except StudioError as e:
        return {"sweeps.message": message(e)}
    except OSError as e:
        return {"sweeps.message": "⚠ " + train_tab.os_error_message(e, f"cannot write the runs folder {root}")}
    live.forget_active(root)
    ids = sweep_ids(root)
    return {"sweeps.message": f"sweep **{out['sweep']}**: {len(out['runs'])} runs queued; follow them here, "
                              f"in the Runs tab or with `studio sweep show {out['sweep']}`",
            "sweeps.pick": gr.update(choices=ids, value=out["sweep"])}


def sweep_ids(root: Path) -> list[str]:
    return [s["sweep"] for s in sweep.sweeps(root)]


def label(point: Mapping[str, Any]) -> str:
    """A grid point as a person reads it: `r=4, target_modules=query,value`."""
    return ", ".join(f"{k.split('.', 1)[-1]}={runs_tab.value_text(v)}" for k, v in point.items())


def table(root: Path, rows: list[dict]) -> dict:
    """`studio sweep show`'s rows as the table's headers and cells (a waiting run with its position)."""
    keys = list(rows[0]["grid"]) if rows else []
    where = runs_tab.positions(root)
    data = [[runs_tab.value_text(r["grid"].get(k)) for k in keys]
            + [runs_tab.state_label(r["state"], where.get(r["run"])), _num(r["trainable"], ",d"),
               _num(r["final_loss"], ".4f"), _num(r["best_eval_loss"], ".4f"), _num(r["best_eval_accuracy"], ".3f"),
               _num(r["seconds"], ".0f"), r["run"]] for r in rows]
    return {"headers": keys + ["state", "trainable", "final loss", "best eval loss", "best eval accuracy", "seconds",
                               "run"], "data": data}


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def metric(rows: list[dict]) -> tuple[str, str]:
    """(row key, axis title): eval accuracy for a classifier sweep, else eval loss."""
    if any(isinstance(r.get("best_eval_accuracy"), (int, float)) for r in rows):
        return "best_eval_accuracy", "best eval accuracy"
    return "best_eval_loss", "best eval loss"


def chart(sweep_id: str, rows: list[dict]) -> go.Figure:
    """The eval metric against trainable parameters (log x), one point per evaluated run, labelled by its point."""
    key, title = metric(rows)
    shown = [r for r in rows if isinstance(r.get(key), (int, float)) and isinstance(r.get("trainable"), int)]
    fig = go.Figure(go.Scatter(x=[r["trainable"] for r in shown], y=[r[key] for r in shown],
                               text=[label(r["grid"]) for r in shown], customdata=[r["run"] for r in shown],
                               mode="markers+text", textposition="top center", marker=dict(size=10),
                               hovertemplate="%{text}<br>%{x:,} trainable<br>%{y:.4f}<br>%{customdata}"
                                             "<extra></extra>"))
    fig.update_layout(title=f"{title} against trainable parameters: {sweep_id}", xaxis_type="log",
                      xaxis_title="trainable parameters (log)", yaxis_title=title, height=380,
                      margin=dict(l=60, r=20, t=50, b=50), template="plotly_white", uirevision="keep")
    if not shown:
        fig.add_annotation(text="no run of this sweep has been evaluated yet", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def results(root: Path, sweep_id: str | None) -> dict[str, Any]:
    """The picked sweep's table, chart and progress; the timer runs while a member waits or trains."""
    if not sweep_id:
        return {"sweeps.table": table(root, []), "sweeps.chart": None, "sweeps.timer": gr.Timer(active=False),
                "sweeps.progress": "No sweep yet: queue one above, or with `studio sweep`." if not sweep_ids(root)
                else "Pick a sweep."}
    try:
        rows = sweep.rows(sweep_id, root)
    except StudioError as e:
        return {"sweeps.progress": message(e), "sweeps.timer": gr.Timer(active=False)}
    done = sum(r["state"] == "completed" for r in rows)
    waiting = sum(r["state"] in runs_tab.WAITING for r in rows)
    progress = f"{done} of {len(rows)} runs completed" + (f", {waiting} waiting or training" if waiting else "")
    return {"sweeps.table": table(root, rows), "sweeps.chart": chart(sweep_id, rows),
            "sweeps.progress": progress, "sweeps.timer": gr.Timer(active=bool(waiting))}


def members(root: Path, sweep_id: str | None) -> list[str]:
    """The sweep's runs that have a final adapter (what the curves and the similarity can use)."""
    if not sweep_id:
        return []
    have = set(exportable(root))
    try:
        return [r["run"] for r in sweep.rows(sweep_id, root) if r["run"] in have]
    except StudioError:
        return []


def compare(root: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Every member's loss curves in one chart, and the members offered for the similarity."""
    sweep_id = v["sweeps.pick"]
    if not sweep_id:
        return {"sweeps.compare_message": "⚠ pick a sweep first"}
    ids = [r["run"] for r in sweep.rows(sweep_id, root)]
    usable = members(root, sweep_id)
    note = "" if len(usable) >= 2 else "⚠ the similarity needs two members with a final adapter; wait for them"
    return {"sweeps.curves": runs_tab.overlay(root, ids), "sweeps.compare_message": note,
            "sweeps.run_a": gr.update(choices=usable, value=usable[0] if usable else None),
            "sweeps.run_b": gr.update(choices=usable, value=usable[-1] if usable else None)}


def similarity(root: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """The Analysis tab with the two members picked and their subspace similarity computed."""
    from studio.ui.tabs import analysis as analysis_tab

    a, b = v["sweeps.run_a"], v["sweeps.run_b"]
    if not a or not b:
        return {"sweeps.compare_message": "⚠ pick two members (press Compare to list them)"}
    try:
        fig, text = analysis_tab.subspace(root, a, b, None, v["analysis.which"])  # the factor that tab shows
    except gr.Error as e:
        return {"sweeps.compare_message": f"⚠ {e.message}"}
    ids = exportable(root)  # the Analysis lists were filled when that tab last opened: offer these two too
    return {"analysis.run_a": gr.update(choices=ids, value=a), "analysis.run_b": gr.update(choices=ids, value=b),
            "analysis.heatmap": fig, "analysis.summary": text,
            "app.tabs": gr.Tabs(selected="tab-analysis"), "sweeps.compare_message": ""}


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    keys = sweep.keys()
    gr.Markdown("A sweep trains one run per point of a grid, one after another in the queue, from the run "
                "**Start** would make now (the Model, Data and Train tabs). As in the LoRA paper's Tables 5 "
                "and 6: vary `lora.target_modules` and `lora.r` and see which buys the most per parameter. "
                "The same as `studio sweep CONFIG.yaml --grid KEY=V1,V2 ...`.")
    defaults = ("lora.r", "lora.target_modules", None)
    for i in range(1, FIELDS + 1):
        with gr.Row():
            setattr(ui, f"key_{i}", gr.Dropdown(keys, value=defaults[i - 1], label=f"field {i}",
                                                allow_custom_value=True, elem_id=f"sweep-key-{i}", scale=1))
            setattr(ui, f"values_{i}", gr.Textbox(label=f"values {i}", info=VALUES_HELP,
                                                  elem_id=f"sweep-values-{i}", scale=3))
    with gr.Row():
        ui.name = gr.Textbox(label="name (optional)", placeholder="sweep-DATE-TIME", elem_id="sweep-name", scale=1)
        ui.start = gr.Button("Queue the sweep", variant="primary", elem_id="sweep-start", scale=0)
        ui.message = gr.Markdown(elem_id="sweep-message")
    ui.plan = gr.HTML(elem_id="sweep-plan")
    gr.Markdown("### Results")
    ids = sweep_ids(runs_dir)
    with gr.Row():
        ui.pick = gr.Dropdown(ids, value=ids[-1] if ids else None, label="Sweep", elem_id="sweep-pick", scale=2)
        ui.progress = gr.Markdown(elem_id="sweep-progress")
    ui.table = gr.Dataframe(headers=["state", "trainable", "final loss", "best eval loss", "best eval accuracy",
                                     "seconds", "run"], interactive=False, wrap=True, max_height=360,
                            elem_id="sweep-table", label="Runs of the sweep (studio sweep show)")
    ui.chart = gr.Plot(elem_id="sweep-chart", label="Eval metric against trainable parameters")
    with gr.Row():
        ui.compare = gr.Button("Compare", elem_id="sweep-compare", scale=0)
        ui.run_a = gr.Dropdown([], label="member A", elem_id="sweep-run-a", scale=2)
        ui.run_b = gr.Dropdown([], label="member B", elem_id="sweep-run-b", scale=2)
        ui.similarity = gr.Button("Subspace similarity in Analysis", elem_id="sweep-similarity", scale=0)
    ui.compare_message = gr.Markdown(elem_id="sweep-compare-message")
    ui.curves = gr.Plot(elem_id="sweep-curves", label="Loss curves of the sweep")
    ui.timer = gr.Timer(3.0, active=False)  # the results while members wait or train
    return ui


def wire(ui: Registry, root: Path, light: dict, heavy: dict) -> None:
    """The tab's events, by name (`light`: polls and views; `heavy`: the slot Start and merges share)."""
    def show(v):
        return results(root, v["sweeps.pick"])

    def opened(v):
        ids, pick = sweep_ids(root), v["sweeps.pick"]
        pick = pick if pick in ids else (ids[-1] if ids else None)
        return {**plan_view(v), **results(root, pick),
                "sweeps.pick": gr.update(choices=ids, value=pick)}

    plan_in, plan_out = list(PLAN_IN), ["sweeps.plan", "sweeps.message"]
    ui.on(ui["sweeps.tab"].select, opened, plan_in + ["sweeps.pick"], plan_out + ["sweeps.pick", *RESULTS_OUT],
          **light)
    for name in GRID_FORM:
        events = (ui[name].change,) if name.startswith("sweeps.key") else (ui[name].blur, ui[name].submit)
        for event in events:
            ui.on(event, plan_view, plan_in, plan_out, show_progress="hidden", **light)
    started = ui.on(ui["sweeps.start"].click, functools.partial(start, root), START_IN,
                    ["sweeps.message", "sweeps.pick"], api_name="start_sweep", **heavy)
    ui.on(started.then, show, ["sweeps.pick"], RESULTS_OUT, **light)
    ui.on(ui["sweeps.pick"].input, show, ["sweeps.pick"], RESULTS_OUT, **light)
    ui.on(ui["sweeps.timer"].tick, show, ["sweeps.pick"], RESULTS_OUT, show_progress="hidden", **light)
    ui.on(ui["sweeps.compare"].click, functools.partial(compare, root), ["sweeps.pick"],
          ["sweeps.curves", "sweeps.compare_message", "sweeps.run_a", "sweeps.run_b"], api_name="compare_sweep",
          **light)
    ui.on(ui["sweeps.similarity"].click, functools.partial(similarity, root),
          ["sweeps.run_a", "sweeps.run_b", "analysis.which"],
          ["analysis.run_a", "analysis.run_b", "analysis.heatmap", "analysis.summary", "app.tabs",
           "sweeps.compare_message"], api_name="sweep_similarity", **heavy)
