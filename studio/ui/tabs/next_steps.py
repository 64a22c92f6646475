"""What to do once a run completed: a note on the Train tab, beside the run it follows, with the
next actions (evaluate it, try it in the Playground, merge it, export it to GGUF).

Each action is a button that opens its tab with the run selected there; nothing starts until the
user presses that tab's own button. The note shows for the run the live view follows when that
run completed with its adapter; a toast says so too, once, when it completes while the page
watches (the user may be on another tab by then).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from studio import runs
from studio.adapters.file import present
from studio.ui.registry import Registry
from studio.ui.tabs import export as export_tab
from studio.ui.tabs.playground import usable_runs

# action -> (button label, elem_id, the tab it opens)
ACTIONS = {"evaluate": ("Evaluate it", "next-evaluate", "tab-evaluate"),
           "playground": ("Try it in the Playground", "next-playground", "tab-playground"),
           "merge": ("Merge it", "next-merge", "tab-export"),
           "export": ("Export to GGUF", "next-export", "tab-export")}
TABS = "app.tabs"  # the gr.Tabs of the whole page, registered by the app


def completed_run(runs_dir: Path, followed: Mapping[str, Any] | None) -> dict | None:
    """The status of the run the live view follows when it completed with its final adapter, else None."""
    followed = followed or {}
    run = followed.get("run")
    if not run or followed.get("active") or not runs.is_run_id(run):
        return None
    d = runs_dir / run
    if not (d / runs.CONFIG).is_file():
        return None
    status = runs.RunDir(d).status()
    return status if status.get("state") == "completed" and present(d / runs.ADAPTER) else None


def note_html(run: str, status: dict) -> str:
    loss = status.get("last_loss")
    eval_loss = status.get("eval_loss")
    facts = [f"{status.get('step') or 0} steps"]
    if isinstance(loss, (int, float)):
        facts.append(f"final loss {loss:.4f}")
    if isinstance(eval_loss, (int, float)):
        facts.append(f"eval loss {eval_loss:.4f}")
    return (f"<div class='next-note' data-run='{html.escape(run)}'>✔ <b>{html.escape(run)}</b> completed "
            f"({', '.join(facts)}); its adapter is saved. Next: see whether it learned (held-out prompts, base "
            "vs tuned), talk to it, merge it into its base, or export it for llama.cpp / Ollama.</div>")


def view(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """The note and its buttons for the run the live view follows ("train.live"); the toast when
    that run has just completed ("train.seen": the value the live view had before)."""
    followed, before = v["train.live"] or {}, v["train.seen"] or {}
    status = completed_run(runs_dir, followed)
    if status is None:
        return {"train.next": gr.update(visible=False), "train.seen": dict(followed)}
    run = followed["run"]
    if before.get("run") == run and before.get("active"):
        gr.Info(f"{run} completed: the next steps are on the Train tab.")
    return {"train.next": gr.update(visible=True), "train.next_note": note_html(run, status),
            "train.seen": dict(followed)}


def go(runs_dir: Path, action: str, v: Mapping[str, Any]) -> dict[str, Any]:
    """Open the tab of `action` with the followed run selected there."""
    run = (v["train.live"] or {}).get("run")
    status = completed_run(runs_dir, v["train.live"])
    if status is None:
        raise gr.Error(f"run {run or '(none)'} has no final adapter yet", print_exception=False)
    out: dict[str, Any] = {TABS: gr.Tabs(selected=ACTIONS[action][2])}
    if action in ("evaluate", "playground"):
        out[f"{action}.run"] = gr.update(choices=usable_runs(runs_dir), value=run)
    else:
        ids, _ = export_tab.offered_runs(runs_dir)
        out["export.run"] = gr.update(choices=ids, value=run)
        out["export.empty"] = gr.update(visible=False)
        out["export.format"] = export_tab.MERGED if action == "merge" else export_tab.GGUF
    return out


OUTPUTS = {"evaluate": (TABS, "evaluate.run"), "playground": (TABS, "playground.run"),
           "merge": (TABS, "export.run", "export.empty", "export.format"),
           "export": (TABS, "export.run", "export.empty", "export.format")}


def build(ui: Registry) -> None:
    """The note and its buttons, hidden until the followed run completed; registered as "train.NAME"."""
    c = {}
    with gr.Group(visible=False, elem_id="run-next") as c["next"]:
        c["next_note"] = gr.HTML(elem_id="run-next-note")
        with gr.Row():
            for action, (label, elem_id, _) in ACTIONS.items():
                c[f"next_{action}"] = gr.Button(label, elem_id=elem_id, size="sm")
    c["seen"] = gr.State({})
    ui.add("train", **c)

