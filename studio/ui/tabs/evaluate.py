"""Evaluate tab: a run's base and tuned model on held-out prompts (studio eval), in the browser.

Pick a run and the run's own held-out split or an eval file; the engine (studio.evaluate)
generates greedily with both on one loaded model and saves eval/NAME.json in the run folder.
Shown: the metrics base vs tuned, and every example with the matches marked. A run's saved
results come back when it is picked again. Bad input (no adapter, no usable prompts) is a
message next to the button, not an exception: the tab stays usable.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from studio import data
from studio.errors import StudioError
from studio.ui.tabs.playground import usable_runs
from studio.ui.tabs.runs import run_folder

HELDOUT_CHOICE = "held-out split of the run's dataset"
HELDOUT = ""  # the eval-data value meaning the run's own held-out split
METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L", "loss": "reference loss (lower is better)",
                "accuracy": "accuracy", "macro_f1": "macro F1"}
PERCENT = ("exact_match", "accuracy")


def data_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """The run's held-out split, then the built-in language-model datasets and uploads."""
    out = [(HELDOUT_CHOICE, HELDOUT)]
    out += [(f"{d['name']}  ·  {d['format']}, {d['rows']} rows", d["path"]) for d in data.list_builtin()]
    up = runs_dir / "uploads"
    if up.is_dir():
        out += [(f"{p.name}  ·  uploaded", str(p)) for p in sorted(up.iterdir()) if p.is_file()]
    return out


def message_html(text: str, bad: bool = False) -> str:
    return f"<div class='{'bad' if bad else 'ev-ok'}'>{'⚠ ' if bad else ''}{html.escape(text)}</div>" if text else ""


def metrics_html(result: dict) -> str:
    """A table of the metrics, one row each: base | tuned | change (or base | each adapter compared)."""
    m = result.get("metrics") or {}
    cols = result.get("columns") or ["base", "tuned"]
    rows = []

    def cell(x, key):
        if not isinstance(x, (int, float)):
            return "–"
        return f"{x:.1%}" if key in PERCENT else f"{x:.4f}"

    base = m.get("base") or {}
    for key in [k for k in METRIC_NAMES if any(k in (m.get(c) or {}) for c in cols)]:
        cells = "".join(f"<td class='ev-{'base' if c == 'base' else 'tuned' if c == 'tuned' else 'adapter'}'>"
                        f"{cell((m.get(c) or {}).get(key), key)}</td>" for c in cols)
        delta = ""
        b, t = base.get(key), (m.get("tuned") or {}).get(key)
        if cols == ["base", "tuned"] and isinstance(b, (int, float)) and isinstance(t, (int, float)):
            better = t < b if key == "loss" else t > b
            sign = "+" if t >= b else "−"
            diff = f"{abs(t - b) * 100:.1f} pt" if key in PERCENT else f"{abs(t - b):.4f}"
            delta = f"<span class='{'ev-up' if better else 'ev-down' if t != b else ''}'>{sign}{diff}</span>"
        rows.append(f"<tr data-metric='{key}'><th>{METRIC_NAMES[key]}</th>{cells}"
                    + (f"<td>{delta}</td>" if cols == ["base", "tuned"] else "") + "</tr>")
    head = (f"<div class='ev-head'>{html.escape(str(result.get('name')))}: {result.get('n')} examples of "
            f"{html.escape(str(result.get('data')))}</div>")
    titles = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + ("<th>change</th>" if cols == ["base", "tuned"]
                                                                           else "")
    return (head + f"<table class='ev-table'><tr><th>metric</th>{titles}</tr>" + "".join(rows) + "</table>"
            + "".join(_confusion(m.get(w), w) for w in cols))


def _confusion(metrics: dict | None, who: str) -> str:
    """A classifier's confusion matrix (rows gold, columns predicted), as studio eval saves it."""
    cm = (metrics or {}).get("confusion_matrix")
    if not cm:
        return ""
    labels = [html.escape(str(x)) for x in cm["labels"]]
    body = "".join(f"<tr><th>{lab}</th>" + "".join(f"<td>{n}</td>" for n in row) + "</tr>"
                   for lab, row in zip(labels, cm["matrix"]))
    return (f"<table class='ev-table ev-cm' data-model='{who}'><tr><th>{who}: gold \\ predicted</th>"
            + "".join(f"<th>{lab}</th>" for lab in labels) + "</tr>" + body + "</table>")


def examples_html(result: dict, limit: int = 200) -> str:
    """Every example (up to `limit`): prompt, reference, each column's answer, a match marked ✔."""
    ex = result.get("examples") or []
    cols = result.get("columns") or ["base", "tuned"]
    out = ["<table class='ev-examples'><tr><th>#</th><th>prompt</th><th>reference</th>"
           + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>"]
    for i, e in enumerate(ex[:limit]):
        cells = []
        for who in cols:
            hit = bool(e.get(f"{who}_match"))
            cells.append(f"<td class='ev-{'hit' if hit else 'miss'}' data-match='{int(hit)}'>"
                         f"{'✔ ' if hit else ''}{_text(e.get(who))}</td>")
        out.append(f"<tr><td>{i + 1}</td><td>{_text(e.get('prompt'))}</td><td>{_text(e.get('reference'))}</td>"
                   + "".join(cells) + "</tr>")
    out.append("</table>")
    if len(ex) > limit:
        out.append(f"<div class='tk-note'>first {limit} of {len(ex)} examples; all are in the saved file</div>")
    return "".join(out)


def _text(v) -> str:
    s = "" if v is None else str(v)
    return html.escape(s if len(s) <= 600 else s[:600] + "…")


NO_RUNS = "no run with an adapter yet: train one on the Train tab, then evaluate it here"


def saved(runs_dir: Path, run_id: str | None) -> list[str]:
    """The names of a run's saved evaluations, newest first."""
    from studio.evaluate import list_evals

    if not run_id:
        return []
    try:
        return [e["name"] for e in list_evals(run_folder(runs_dir, run_id))]
    except (StudioError, gr.Error):
        return []


def show_saved(runs_dir: Path, run_id: str | None, name: str | None) -> dict[str, Any]:
    """The saved result `name` of a run (default: its newest) as the tab's tables."""
    from studio.evaluate import read_eval

    names = saved(runs_dir, run_id)
    name = name if name in names else (names[0] if names else None)
    out = {"evaluate.saved": gr.update(choices=names, value=name)}
    if name is None:
        return {**out, "evaluate.table": "", "evaluate.examples": "",
                "evaluate.message": message_html("no saved evaluation for this run yet: press Evaluate" if run_id
                                                 else NO_RUNS if not usable_runs(runs_dir) else "")}
    try:
        res = read_eval(run_folder(runs_dir, run_id), name)
    except StudioError as e:
        return {**out, "evaluate.message": message_html(str(e), bad=True)}
    return {**out, "evaluate.table": metrics_html(res), "evaluate.examples": examples_html(res),
            "evaluate.message": message_html(f"saved result {name}")}


def run_eval(runs_dir: Path, v: Mapping[str, Any], progress=None) -> dict[str, Any]:
    """Evaluate the picked run on the picked data; the result's tables, or the reason it cannot run."""
    from studio.evaluate import evaluate

    run_id = v["evaluate.run"]
    if not run_id:
        return {"evaluate.message": message_html("pick a run with an adapter (train one on the Train tab first)",
                                                 bad=True)}

    def report(done: int, total: int, phase: str) -> None:
        if progress is not None:
            progress(done / max(total, 1), desc=f"{phase}: {done} of {total}")

    try:
        # The browser shows an empty number box as 0: 0 means all here (studio eval refuses --limit 0).
        limit = None if v["evaluate.limit"] in (None, "", 0) else int(v["evaluate.limit"])
        res = evaluate(run_folder(runs_dir, run_id), v["evaluate.data"] or None, limit=limit,
                       max_new_tokens=int(v["evaluate.max_new_tokens"]), progress=report)
    except StudioError as e:
        return {"evaluate.message": message_html(str(e), bad=True)}
    except gr.Error as e:
        return {"evaluate.message": message_html(str(e.message), bad=True)}
    secs = res.get("seconds", {})
    names = saved(runs_dir, run_id)
    return {"evaluate.table": metrics_html(res), "evaluate.examples": examples_html(res),
            "evaluate.saved": gr.update(choices=names, value=res["name"]),
            "evaluate.message": message_html(f"{res['n']} examples in {secs.get('eval', 0):.1f} s "
                                             f"(model load {secs.get('load', 0):.1f} s), saved as eval/{res['name']}.json")}


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ids = usable_runs(runs_dir)
    gr.Markdown("Did it learn? The base model and the tuned one answer the same held-out prompts "
                "(greedy, one loaded model, the adapter switched off for base). Same as `studio eval RUN`.")
    with gr.Row():
        ui.run = gr.Dropdown(ids, value=ids[0] if ids else None, label="Run", elem_id="eval-run", scale=3)
        ui.data = gr.Dropdown(data_choices(runs_dir), value=HELDOUT, label="Evaluate on", elem_id="eval-data",
                              allow_custom_value=True, scale=3,
                              info="the run's own held-out rows, or a file in any format the Data tab reads")
        ui.saved = gr.Dropdown([], label="Saved results", elem_id="eval-saved", scale=2)
    with gr.Row():
        ui.limit = gr.Number(0, precision=0, label="limit", info="the first N examples (0: all)",
                             elem_id="eval-limit")
        ui.max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="max new tokens")
    with gr.Row():
        ui.start = gr.Button("Evaluate", variant="primary", elem_id="eval-start", scale=1)
        ui.message = gr.HTML(message_html("" if ids else NO_RUNS), elem_id="eval-message")
    ui.table = gr.HTML(elem_id="eval-table")
    ui.examples = gr.HTML(elem_id="eval-examples")
    return ui
