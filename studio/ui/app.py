"""The studio's Gradio app: tabs, event wiring and a locked-down launch.

Each tab module builds its components, registered by name in one Registry (studio/ui/registry.py),
and holds its handlers as plain functions of named values; this module only wires events
between them, by those names. Polls are cheap and unlimited in concurrency; starting a run
and merging share one slot, so two clicks never start two heavy jobs.
"""

from __future__ import annotations

import functools
import html
import os
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from studio import _compat
from studio import runs
from studio.config import starter_config
from studio.ui import live
from studio.ui.login_wall import LoginWall
from studio.ui.registry import Registry
from studio.ui.tabs import adapters as adapters_tab
from studio.ui.tabs import analysis as analysis_tab
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import evaluate as evaluate_tab
from studio.ui.tabs import export as export_tab
from studio.ui.tabs import memory_panel
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import next_steps
from studio.ui.tabs import playground as playground_tab
from studio.ui.tabs import runs as runs_tab
from studio.ui.tabs import sweeps as sweeps_tab
from studio.ui.tabs import train as train_tab

CSS = """
.pc { padding: 10px 12px; border-radius: 8px; background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.pc-big { font-size: 1.25em; margin-bottom: 4px; }
.pc-trainable { font-weight: 700; color: var(--color-accent); }
.pc-err, .bad { color: #b91c1c; }
.pc-targets code { font-size: 12px; }
.rs { font-size: 1.05em; }
.rs-err { max-height: 220px; overflow: auto; font-size: 12px; background: #fef2f2; padding: 8px; }
.badge { padding: 2px 8px; border-radius: 10px; background: #e5e7eb; font-weight: 600; }
.st-running, .st-queued { background: #dbeafe; } .st-completed { background: #dcfce7; }
.st-failed, .st-diverged { background: #fee2e2; } .st-stopped, .st-stopping { background: #fef9c3; }
.pbar { height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden; }
.pbar > div { height: 100%; background: var(--color-accent); transition: width .5s; }
.pbar-text { font-size: 12px; color: var(--body-text-color-subdued); }
.mr th { text-align: left; padding-right: 12px; white-space: nowrap; }
#start-reason { color: #b45309; }
.model-note { color: #1e40af; }
.next-note { padding: 8px 10px; background: #dcfce7; border-radius: 6px; }
.tk-seq { margin: 8px 0; padding: 6px 8px; border: 1px solid var(--border-color-primary); border-radius: 6px; }
.tk-head, .tk-note { font-size: 12px; color: var(--body-text-color-subdued); }
.tk-body { font-family: var(--font-mono); font-size: 12px; white-space: pre-wrap; word-break: break-all; line-height: 1.7; }
.tk { border-radius: 3px; padding: 0 1px; }
.tk-on { background: #bbf7d0; color: #14532d; } .tk-user { color: #6b7280; } .tk-system { color: #7c3aed; background: #f5f3ff; }
.tk-sp { color: #6b7280; border: 1px dashed #9ca3af; } .tk-sp-on { border: 1px solid #15803d; font-weight: 600; }
.tk-pad { color: #9ca3af; background: #f3f4f6; font-style: italic; }
.tk-warn { color: #b45309; background: #fffbeb; padding: 6px 8px; border-radius: 6px; margin: 4px 0; }
.ev-table td, .ev-table th { padding: 2px 14px 2px 0; text-align: left; } .ev-up { color: #15803d; } .ev-down { color: #b91c1c; }
.ev-examples { font-size: 12px; table-layout: fixed; width: 100%; }
.ev-examples td { vertical-align: top; white-space: pre-wrap; overflow-wrap: anywhere; padding: 3px 6px; }
.ev-examples th:first-child { width: 2.5em; }
.ev-hit { background: #dcfce7; } .ev-head { font-weight: 600; margin-bottom: 4px; }
.rd .rs-err { white-space: pre-wrap; overflow-wrap: anywhere; } .rd-none { color: var(--body-text-color-subdued); }
.sw-points { max-height: 200px; overflow: auto; font-size: 12px; } .sw-points td, .sw-points th { padding: 1px 12px 1px 0; }
"""
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)
LIGHT = dict(concurrency_limit=None)


def build_app(runs_dir: str | os.PathLike | None = None, model: str | None = None) -> gr.Blocks:
    """The app, opening on `model` (default: model_tab.opening_model(): SmolLM2 and its chat dataset)."""
    root = runs.runs_dir(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ref, note = model_tab.opening_model(model)
    start = starter_config(ref)
    ui = Registry()
    with gr.Blocks(title="LoRA Studio", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("## LoRA Studio\nPick a model, tick the modules that get LoRA adapters, train in the "
                    "background, merge and download. Everything here is also a `studio` command.")
        with gr.Tabs() as tabs:
            with gr.Tab("Model", id="tab-model"):
                model_tab.build(ui, ref, note)
            with gr.Tab("Data", id="tab-data"):
                data_tab.build(ui, root, start.data)
            with gr.Tab("Train", id="tab-train"):
                train_tab.build(ui, ref)
            # These tabs' build functions return their components; registered here by attribute name.
            for tab, label, build in (("runs", "Runs", runs_tab.build), ("export", "Export", export_tab.build),
                                      ("playground", "Playground", playground_tab.build),
                                      ("adapters", "Adapters", adapters_tab.build),
                                      ("evaluate", "Evaluate", evaluate_tab.build),
                                      ("analysis", "Analysis", analysis_tab.build),
                                      ("sweeps", "Sweeps", sweeps_tab.build)):
                with gr.Tab(label, id=f"tab-{tab}") as el:
                    ui.add(tab, tab=el, **vars(build(root)))
        ui.add("app", tabs=tabs)
        _wire_model(ui, root)
        _wire_data(ui, root)
        _wire_train(ui, root)
        _wire_next_steps(ui, root)
        _wire_runs(ui, root)
        _wire_export(ui, root)
        _wire_playground(ui, root)
        _wire_adapters(ui, root)
        _wire_evaluate(ui, root)
        _wire_analysis(ui, root)
        sweeps_tab.wire(ui, root, light=LIGHT, heavy=HEAVY)
        load = ui.on(demo.load, _on_page_load(root), ["model.state"], FILL_OUT + ("train.live",),
                     api_name="page_load", **LIGHT)
        load = ui.on(load.then, model_tab.recount, COUNT_IN, COUNT_OUT, **LIGHT)
        load = ui.on(load.then, data_tab.preview_view, PREVIEW_IN, PREVIEW_OUT, **LIGHT)
        _gate(ui, root, load.then)
    return demo


COUNT_IN = model_tab.LORA_FORM + model_tab.MEMORY_FORM
COUNT_OUT = ("model.param_count", "model.param_chart") + model_tab.MEMORY_OUT
PREVIEW_IN = ("data.dataset_select", "data.data_format", "data.max_length", "data.packing", "data.train_on_prompt",
              "model.state")
PREVIEW_OUT = ("data.dataset_preview", "data.data_info", "data.dataset_tokens")
LOAD_OUT = ("model.module_tree", "model.target_types", "model.summary", "model.state", "model.message",
            "model.model_select")
# What filling the form from a run sets (train_tab.run_form).
FILL_OUT = LOAD_OUT + train_tab.SETTINGS_FORM + ("model.trust_remote_code", "train.form_note")


# --- model ---------------------------------------------------------------------------------

def _on_page_load(root: Path):
    def page_load(v):
        state = v["model.state"] or {}
        followed = train_tab.attach(root)
        # The list as the runs folder has it now: uploads made since the server started included.
        out = {**model_tab.load_view(state.get("ref"), state.get("task"), bool(state.get("trust_remote_code"))),
               "train.live": followed, "data.dataset_select": gr.update(choices=data_tab.dataset_choices(root))}
        if followed["active"]:  # a reload while a run trains: the form beside it is that run's
            try:
                form = train_tab.run_form(root, followed["run"])
            except gr.Error as e:
                return {**out, "train.form_note": f"⚠ {html.escape(e.message)}"}
            out.update(form, **{"data.dataset_select": gr.update(choices=out["data.dataset_select"]["choices"],
                                                                 value=form["data.dataset_select"])})
        return out
    return page_load


def pick_model(v) -> dict:
    """A model picked (or Load pressed): its tree and default ticks, and the form at its starter settings
    (also kept in data.picked, for the preview that follows: see _wire_model); the user's dataset
    stays when it suits the model (train_tab.settings_after_pick). A model that cannot load changes
    nothing but the message next to Load (model_tab.load_or_refuse)."""
    shown = v["model.state"]
    out = model_tab.load_or_refuse(v["model.model_select"], None, v["model.trust_remote_code"], shown)
    if "model.state" not in out:
        return {**out, "data.picked": {}}
    state = out["model.state"]
    settings, note = train_tab.settings_after_pick(shown, state, v["data.dataset_select"], v["data.data_format"])
    return {**out, **settings, "model.message": model_tab.note_html(note),
            "data.picked": {k: settings[k] for k in PREVIEW_IN if k in settings}}


def preview_after_pick(v) -> dict:
    """The Data tab's preview for the model just picked, with the dataset settings it brought."""
    return data_tab.preview_view({**v, **(v["data.picked"] or {})})


def pick_task(v) -> dict:
    """Another task for the same model: its tree again (the head differs); the settings stay."""
    return model_tab.load_or_refuse(v["model.model_select"], v["model.task"], v["model.trust_remote_code"],
                                    v["model.state"])


def _wire_model(ui: Registry, root: Path):
    pick_in = ["model.model_select", "model.trust_remote_code", "model.state", "data.dataset_select",
               "data.data_format"]
    for event, extra in ((ui["model.model_load"].click, dict(api_name="load_model")),
                         (ui["model.model_select"].select, {})):
        picked = ui.on(event, pick_model, pick_in, LOAD_OUT + train_tab.SETTINGS_FORM + ("data.picked",), **extra,
                       **LIGHT)
        _recount_on(ui, root, picked.then)
        # Token statistics and the token view belong to the model's tokenizer: redo them for the new
        # one, also when the dataset stays. The dataset settings come from the pick's own state: the
        # dropdowns' values a following event reads can still be the ones before the pick.
        ui.on(picked.then, preview_after_pick, PREVIEW_IN + ("data.picked",), PREVIEW_OUT, **LIGHT)
    _recount_on(ui, root, ui.on(ui["model.task"].input, pick_task, pick_in + ["model.task"],
                                LOAD_OUT + ("model.task",), **LIGHT).then)
    # Ticking it explains it; the model loads with it on the next Load (nothing runs on a tick).
    ui.on(ui["model.trust_remote_code"].change, model_tab.trust_changed, ["model.trust_remote_code"],
          ["model.trust_note"], **LIGHT)
    ui.on(ui["model.target_types"].input, model_tab.types_changed,
          ["model.state", "model.target_types", "model.module_tree", "model.types_state"],
          ["model.module_tree", "model.types_state"], **LIGHT)
    ui.on(ui["model.sweep_btn"].click, model_tab.sweep, ["model.state"], ["model.sweep_plot", "model.sweep_table"],
          api_name="sweep", **LIGHT)
    ui.on(ui["model.module_tree"].change, model_tab.tree_changed, ["model.state", "model.module_tree"],
          ["model.target_types", "model.types_state"], **LIGHT)
    for name in model_tab.LORA_FORM:
        if name != "model.state":  # a new state only comes from a load, which recounts itself
            _recount_on(ui, root, ui[name].change)
    for name in model_tab.MEMORY_FORM:  # the estimate's own inputs: nothing a run is started with
        ui.on(ui[name].change, model_tab.recount, COUNT_IN, COUNT_OUT, **LIGHT)
    for name, target in memory_panel.FOLLOWS.items():  # ... that follow the run's settings
        ui.on(ui[name].change, functools.partial(_follow, name), [name], [target], **LIGHT)


def _follow(name: str, v) -> dict:
    return memory_panel.follow(name, v[name])


def _recount_on(ui: Registry, root: Path, event):
    """Recount, then re-ask whether the form can start."""
    _gate(ui, root, ui.on(event, model_tab.recount, COUNT_IN, COUNT_OUT, **LIGHT).then)


# --- data ----------------------------------------------------------------------------------

def _wire_data(ui: Registry, root: Path):
    _gate(ui, root, ui.on(ui["data.dataset_select"].change, data_tab.preview_view, PREVIEW_IN, PREVIEW_OUT,
                          **LIGHT).then)
    # The other settings redo the preview on the user's own edits only: a model pick sets them all
    # at once, and a change event of one can read the dataset list's value from before the pick
    # (the pick redoes the preview itself, from what it set).
    for name in ("data.data_format", "data.max_length", "data.packing", "data.train_on_prompt"):
        ui.on(ui[name].input, data_tab.preview_view, PREVIEW_IN, PREVIEW_OUT, **LIGHT)
    for name in ("data.data_format", "data.max_length", "data.packing", "data.train_on_prompt", "data.eval_fraction"):
        _gate(ui, root, ui[name].change)

    ui.on(ui["data.dataset_upload"].upload, lambda v: data_tab.upload_view(v["data.dataset_upload"], root),
          ["data.dataset_upload"], ["data.dataset_select"], api_name="upload_dataset", **LIGHT)


# --- train ---------------------------------------------------------------------------------

def _wire_train(ui: Registry, root: Path):
    start = ui.on(ui["train.train_start"].click, functools.partial(train_tab.start, root), train_tab.FORM,
                  ["train.live"], api_name="start_training", **HEAVY)
    _gate(ui, root, start.then)
    ui.on(ui["train.train_stop"].click, functools.partial(train_tab.stop, root), ["train.live"], [],
          api_name="stop_training", **LIGHT)
    ui.on(ui["train.train_continue"].click, functools.partial(train_tab.continue_run, root),
          ["train.live", "train.continue_steps"], ["train.live", "train.continue_message"],
          api_name="continue_training", **HEAVY)

    def fill(v):
        form = train_tab.run_form(root, (v["train.live"] or {}).get("run"))
        return {**form, "data.picked": {k: form[k] for k in PREVIEW_IN if k in form}}

    filled = ui.on(ui["train.from_run"].click, fill, ["train.live"], FILL_OUT + ("data.picked",),
                   api_name="fill_from_run", **LIGHT)
    _recount_on(ui, root, filled.then)
    ui.on(filled.then, preview_after_pick, PREVIEW_IN + ("data.picked",), PREVIEW_OUT, **LIGHT)
    ui.on(ui["train.live"].change,
          lambda v: {"train.from_run": gr.update(interactive=bool((v["train.live"] or {}).get("run")))},
          ["train.live"], ["train.from_run"], **LIGHT)
    # The live view polls its own route (studio/ui/live.py); its value changes when the run it
    # follows does, or stops being active, and that re-gates Start.
    for name in ("train.live",) + train_tab.TRAIN_FORM:
        _gate(ui, root, ui[name].change)


def _wire_next_steps(ui: Registry, root: Path):
    """A completed run's note and its buttons, each opening a tab with the run selected (studio/ui/tabs/next_steps.py)."""
    ui.on(ui["train.live"].change, functools.partial(next_steps.view, root), ["train.live", "train.seen"],
          ["train.next", "train.next_note", "train.seen"], **LIGHT)
    for action in next_steps.ACTIONS:
        ui.on(ui[f"train.next_{action}"].click, functools.partial(next_steps.go, root, action), ["train.live"],
              next_steps.OUTPUTS[action], **LIGHT)


def _gate(ui: Registry, root: Path, event):
    """Start enabled, or disabled with preflight's reason, for the form as it is now."""
    return ui.on(event, functools.partial(train_tab.phase_view, root), train_tab.FORM + ("train.live",),
                 ["train.start_reason", "train.train_start", "train.run_yaml", "train.run_cli"],
                 show_progress="hidden", **LIGHT)


# --- runs ----------------------------------------------------------------------------------

TICK_OUT = ("runs.runs_table", "runs.detail", "runs.timer")


def _wire_runs(ui: Registry, root: Path):
    def refresh(v):
        rows = runs_tab.table(root)
        ids = [r[0] for r in rows]
        pick, compare = v["runs.pick"], v["runs.compare"]
        pick = pick if pick in ids else None
        return {"runs.runs_table": rows, "runs.pick": gr.update(choices=ids, value=pick),
                "runs.compare": gr.update(choices=ids, value=[i for i in (compare or []) if i in ids]),
                "runs.detail": runs_tab.detail(root, pick), "runs.timer": gr.Timer(active=runs_tab.busy(rows))}

    def tick(v):
        # The table and the details only: a tick sent before a row was clicked must not put the
        # run picked before it back (a click sets the list's choices itself), and the overlay's
        # choices stay as they are while its curves are drawn.
        return {k: u for k, u in refresh(v).items() if k in TICK_OUT}

    ins, outs = ["runs.pick", "runs.compare"], ["runs.runs_table", "runs.pick", "runs.compare", "runs.detail",
                                                "runs.timer"]
    ui.on(ui["runs.refresh"].click, refresh, ins, outs, api_name="list_runs", **LIGHT)
    ui.on(ui["runs.tab"].select, refresh, ins, outs, **LIGHT)
    ui.on(ui["runs.timer"].tick, tick, ins, TICK_OUT, show_progress="hidden", **LIGHT)

    def clicked(v, event):
        run = runs_tab.clicked_run(event.row_value)
        return {"runs.pick": gr.update(choices=runs_tab.run_ids(root), value=run)} if run else {}

    ui.on(ui["runs.runs_table"].select, clicked, [], ["runs.pick"], **LIGHT)
    ui.on(ui["runs.pick"].change, lambda v: {"runs.detail": runs_tab.detail(root, v["runs.pick"])}, ["runs.pick"],
          ["runs.detail"], show_progress="hidden", **LIGHT)
    for name, act, api in (("runs.queue_cancel", lambda run: runs_tab.cancel(root, run), "queue_cancel"),
                           ("runs.queue_up", lambda run: runs_tab.move(root, run, -1), "queue_up"),
                           ("runs.queue_down", lambda run: runs_tab.move(root, run, 1), "queue_down")):
        acted = ui.on(ui[name].click, lambda v, act=act: {"runs.message": act(v["runs.pick"])}, ["runs.pick"],
                      ["runs.message"], api_name=api, **LIGHT)
        ui.on(acted.then, refresh, ins, outs, **LIGHT)
    ui.on(ui["runs.compare"].change, lambda v: {"runs.overlay_plot": runs_tab.overlay(root, v["runs.compare"])},
          ["runs.compare"], ["runs.overlay_plot"], **LIGHT)
    resumed = ui.on(ui["runs.resume"].click, lambda v: {"runs.message": runs_tab.resume(root, v["runs.pick"])},
                    ["runs.pick"], ["runs.message"], api_name="resume_run", **HEAVY)
    ui.on(resumed.then, refresh, ins, outs, **LIGHT)

    def ask_delete(v):
        pick = v["runs.pick"]
        return {"runs.confirm": gr.update(visible=bool(pick)),
                "runs.message": f"Delete **{pick}** and all its files? This cannot be undone." if pick
                else "Pick a run first."}

    ui.on(ui["runs.delete"].click, ask_delete, ["runs.pick"], ["runs.confirm", "runs.message"], **LIGHT)
    deleted = ui.on(ui["runs.confirm"].click, lambda v: {"runs.message": runs_tab.delete(root, v["runs.pick"])},
                    ["runs.pick"], ["runs.message"], api_name="delete_run", **LIGHT)
    hidden = ui.on(deleted.then, lambda v: {"runs.confirm": gr.update(visible=False)}, [], ["runs.confirm"], **LIGHT)
    ui.on(hidden.then, refresh, ins, outs, **LIGHT)


# --- export --------------------------------------------------------------------------------

def _wire_export(ui: Registry, root: Path):
    ui.on(ui["export.tab"].select, lambda v: export_tab.refresh_view(root, v["export.run"]), ["export.run"],
          ["export.run", "export.empty"], **LIGHT)
    merged_out = ["export.download_merged", "export.merged_files"]

    def prepare_adapter(v):
        run_id = v["export.run"]
        if not run_id:
            off = gr.update(value=None, interactive=False)
            return {"export.download_adapter": off, "export.download_merged": off, "export.merged_files": None}
        merged = runs.RunDir(runs_tab.run_folder(root, run_id)).merged
        return {"export.download_adapter": gr.update(value=export_tab.adapter_zip(root, run_id), interactive=True),
                **export_tab.merged_downloads(export_tab.merged_files(merged))}

    ui.on(ui["export.run"].change, prepare_adapter, ["export.run"], ["export.download_adapter", *merged_out], **LIGHT)

    def do_merge(v, progress=gr.Progress()):
        if not v["export.run"]:
            raise gr.Error("pick a run with a final adapter first", print_exception=False)
        report, files = export_tab.merge(root, v["export.run"], v["export.dtype"], v["export.verify"], progress)
        return {"export.merge_report": report, **export_tab.merged_downloads(files)}

    ui.on(ui["export.merge_btn"].click, do_merge, ["export.run", "export.dtype", "export.verify"],
          ["export.merge_report", *merged_out], api_name="merge", **HEAVY)

    ui.on(ui["export.format"].change, lambda v: export_tab.format_changed(v["export.format"], v["export.quant"]),
          ["export.format", "export.quant"],
          ["export.quant", "export.ollama", "export.dtype", "export.merge_btn", "export.gguf_btn"], **LIGHT)

    def do_gguf(v, progress=gr.Progress()):
        return export_tab.gguf_view(root, v, progress)

    ui.on(ui["export.gguf_btn"].click, do_gguf, ["export.run", "export.format", "export.quant", "export.ollama"],
          ["export.gguf_message", "export.export_report", "export.download_gguf"], api_name="export_gguf", **HEAVY)


# --- playground ----------------------------------------------------------------------------

def _wire_playground(ui: Registry, root: Path):
    columns = [f"playground.{c}" for c in playground_tab.COLUMNS]
    chats = [f"playground.chat_{c}" for c in playground_tab.COLUMNS]
    chat_reset = ["playground.chat_state", *chats, "playground.chat_message"]
    pick = ["playground.run", "playground.adapters"]
    ui.on(ui["playground.tab"].select, functools.partial(playground_tab.refresh, root), pick,
          [*pick, "playground.notice", *columns, *chats], **LIGHT)
    ui.on(ui["playground.run"].change, functools.partial(playground_tab.run_changed, root), pick,
          ["playground.adapters", *columns, *chat_reset], **LIGHT)
    ui.on(ui["playground.adapters"].change, functools.partial(playground_tab.adapters_changed, root), pick,
          [*columns, *chat_reset], **LIGHT)
    sampling = ["playground.max_new_tokens", "playground.temperature", "playground.top_p", "playground.seed"]
    slot = dict(concurrency_id="playground", concurrency_limit=2)
    ins = [*pick, "playground.prompt", "playground.template", *sampling]
    outs = [*columns, "playground.message"]
    ui.on(ui["playground.generate"].click, functools.partial(playground_tab.generate, root), ins, outs,
          api_name="generate", **slot)
    ui.on(ui["playground.prompt"].submit, functools.partial(playground_tab.generate, root), ins, outs, **slot)
    chat_in = [*pick, "playground.chat_input", "playground.system", "playground.chat_state", *sampling]
    chat_out = ["playground.chat_input", *chat_reset]
    # A message sent while an answer still streams waits for it and then goes out with the whole
    # history ("always_last"); gradio's default ("once") would drop it while the box still shows it.
    turn = dict(slot, trigger_mode="always_last")
    ui.on(ui["playground.send"].click, functools.partial(playground_tab.send, root), chat_in, chat_out,
          api_name="chat", **turn)
    ui.on(ui["playground.chat_input"].submit, functools.partial(playground_tab.send, root), chat_in, chat_out, **turn)
    ui.on(ui["playground.clear"].click, lambda v: playground_tab.empty_chat(), [], chat_reset, api_name="chat_clear",
          **LIGHT)

    def evaluate(v):
        text, rows = playground_tab.evaluate(root, v["playground.run"])
        return {"playground.eval_text": text, "playground.eval_rows": rows}

    ui.on(ui["playground.evaluate"].click, evaluate, ["playground.run"],
          ["playground.eval_text", "playground.eval_rows"], api_name="evaluate", **slot)


# --- adapters ------------------------------------------------------------------------------

def _wire_adapters(ui: Registry, root: Path):
    listed = ["adapters.table", "adapters.notice", "adapters.pick", "adapters.base"]
    keep = ["adapters.pick", "adapters.base"]
    for event in (ui["adapters.tab"].select, ui["adapters.refresh"].click):
        ui.on(event, functools.partial(adapters_tab.library_view, root), keep, listed, **LIGHT)
    weights = [f"adapters.weight_{i + 1}" for i in range(adapters_tab.MAX_COMBINE)]
    check_out = [*weights, "adapters.density", "adapters.methods", "adapters.combine"]
    for name in ("adapters.pick", "adapters.method"):
        ui.on(ui[name].change, functools.partial(adapters_tab.combine_check, root), ["adapters.pick", "adapters.method"],
              check_out, show_progress="hidden", **LIGHT)
    ui.on(ui["adapters.import_btn"].click, functools.partial(adapters_tab.do_import, root),
          ["adapters.upload", "adapters.import_path", "adapters.import_name", "adapters.import_base", *keep],
          ["adapters.import_message", *listed], api_name="import_adapter", **HEAVY)
    ui.on(ui["adapters.combine"].click, functools.partial(adapters_tab.do_combine, root),
          ["adapters.pick", "adapters.method", "adapters.density", "adapters.name", *weights, "adapters.base"],
          ["adapters.combine_message", *listed], api_name="combine_adapters", **HEAVY)
    ui.on(ui["adapters.compare"].click, functools.partial(adapters_tab.do_compare, root), ["adapters.base"],
          ["adapters.metrics", "adapters.similarity", "adapters.compare_message"], api_name="compare_adapters",
          **HEAVY)


# --- evaluate ------------------------------------------------------------------------------

def _wire_evaluate(ui: Registry, root: Path):
    def refresh(v):
        ids, current = playground_tab.usable_runs(root), v["evaluate.run"]
        return {"evaluate.run": gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None)),
                "evaluate.data": gr.update(choices=evaluate_tab.data_choices(root))}

    ui.on(ui["evaluate.tab"].select, refresh, ["evaluate.run"], ["evaluate.run", "evaluate.data"], **LIGHT)
    shown = ["evaluate.saved", "evaluate.table", "evaluate.examples", "evaluate.message"]
    # A run picked again shows its newest saved result; another saved one is picked by name.
    ui.on(ui["evaluate.run"].change, lambda v: evaluate_tab.show_saved(root, v["evaluate.run"], None),
          ["evaluate.run"], shown, **LIGHT)
    ui.on(ui["evaluate.saved"].input, lambda v: evaluate_tab.show_saved(root, v["evaluate.run"], v["evaluate.saved"]),
          ["evaluate.run", "evaluate.saved"], shown, **LIGHT)
    ui.on(ui["evaluate.start"].click, functools.partial(evaluate_tab.run_eval, root),
          ["evaluate.run", "evaluate.data", "evaluate.limit", "evaluate.max_new_tokens"], shown,
          api_name="evaluate_run", **HEAVY)


# --- analysis ------------------------------------------------------------------------------

def _wire_analysis(ui: Registry, root: Path):
    runs_ab = ["analysis.run_a", "analysis.run_b"]
    ui.on(ui["analysis.tab"].select, lambda v: analysis_tab.refresh_view(root, v["analysis.run_a"], v["analysis.run_b"]),
          runs_ab, runs_ab + ["analysis.empty"], **LIGHT)
    ui.on(ui["analysis.run_a"].change,
          lambda v: {"analysis.module": gr.update(choices=analysis_tab.modules(root, v["analysis.run_a"]), value=None)},
          ["analysis.run_a"], ["analysis.module"], **LIGHT)

    def subspace(v):
        fig, text = analysis_tab.subspace(root, v["analysis.run_a"], v["analysis.run_b"], v["analysis.module"],
                                          v["analysis.which"])
        return {"analysis.heatmap": fig, "analysis.summary": text}

    def spectrum(v):
        fig, table = analysis_tab.spectrum(root, v["analysis.run_a"])
        return {"analysis.spectrum_plot": fig, "analysis.spectrum_table": table}

    ui.on(ui["analysis.btn_subspace"].click, subspace, runs_ab + ["analysis.module", "analysis.which"],
          ["analysis.heatmap", "analysis.summary"], api_name="analyze_subspace", **HEAVY)
    ui.on(ui["analysis.btn_spectrum"].click, spectrum, ["analysis.run_a"],
          ["analysis.spectrum_plot", "analysis.spectrum_table"], api_name="analyze_spectrum", **HEAVY)
    ui.on(ui["analysis.btn_amp"].click,
          lambda v: {"analysis.amp_table": analysis_tab.amplification(root, v["analysis.run_a"])},
          ["analysis.run_a"], ["analysis.amp_table"], api_name="analyze_amplification", **HEAVY)


# --- launch --------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """No download-style progress bars or deprecation chatter from the libraries in our output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports of every model the playground opens
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD")
    return user, password


# Gradio's queue looks for new work every millisecond while it has none, and for progress to send
# every 10 ms: about 1,100 wakeups a second, 6% of a core on a server nobody uses, taken from the
# trainer beside it. A queued click now waits up to 20 ms more to start (a person does not notice),
# and a progress bar updates 20 times a second.
QUEUE_IDLE_POLL_S, QUEUE_PROGRESS_POLL_S = 0.02, 0.05


def calm_queue(demo: gr.Blocks) -> bool:
    """Slow the queue's idle polling (see above); False where this gradio has no such knobs."""
    q = _compat.gradio_queue(demo)
    knobs = {"sleep_when_free": QUEUE_IDLE_POLL_S, "progress_update_sleep_when_free": QUEUE_PROGRESS_POLL_S}
    if q is None or not all(isinstance(getattr(q, k, None), (int, float)) for k in knobs):
        return False
    for k, v in knobs.items():
        setattr(q, k, v)
    return True


def prepare_model(ref: str) -> None:
    """Convert a GGUF-backed opening model before serving (tens of seconds, once), so the first
    page does not wait on it in silence; a model that cannot be prepared is left to the page to explain."""
    from studio import models
    from studio.errors import StudioError

    try:
        if models.resolve(ref).kind in ("gguf",) or ref == models.SMOLLM2:
            print(f"preparing {ref} (converted once, then cached) ...", file=sys.stderr, flush=True)
            models.model_dir(ref)
    except StudioError as e:
        print(f"warning: {e}", file=sys.stderr)


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, runs_dir=None,
           prevent_thread_lock: bool = False, quiet: bool = False, model: str | None = None):
    """Serve the studio; it opens on `model` (default: $STUDIO_UI_MODEL, else SmolLM2 with its dataset)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    quiet_libraries()
    creds = parse_auth(auth or os.environ.get("STUDIO_AUTH"))
    if host not in ("127.0.0.1", "localhost", "::1") and creds is None:
        print(f"warning: serving on {host} without --auth: anyone who can reach this machine can start "
              "training and read your runs. Pass --auth USER:PASSWORD (or set STUDIO_AUTH).", file=sys.stderr)
    root = runs.runs_dir(runs_dir).resolve()
    max_bytes = int(data_tab.max_upload_mb() * 2**20)
    # Gradio's queue rebuilds a pandas summary of every event it remembers (up to 10,000) after
    # each event, for the monitoring page, which is off here: about 15 ms an event, a third of a
    # core with 20 tabs polling once a second. Read when the queue is made, below.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")
    ref, _ = model_tab.opening_model(model)
    prepare_model(ref)
    demo = build_app(root, ref)
    demo.queue(default_concurrency_limit=4)
    calm_queue(demo)
    # quiet: gradio's own start-up lines include "To create a public link, set `share=True`", an
    # invitation this studio never takes; it says where it serves itself, once launch has returned
    # (its server thread is then listening).
    demo.launch(server_name=host, server_port=port, auth=creds, share=False, allowed_paths=[str(root)],
                max_file_size=max_bytes, enable_monitoring=False, show_error=True,
                prevent_thread_lock=True, quiet=True, css=CSS, footer_links=[],
                # No call history kept in the browser or offered to sync to the Hub, no
                # unauthenticated /openapi.json, and with auth nothing but the login page.
                run_history=False, app_kwargs={"openapi_url": None, "middleware": [Middleware(LoginWall)],
                                                 "routes": live.routes(root)},
                **_compat.gradio_launch_without_self_check())
    if not quiet:
        print(serving_line(host, getattr(demo, "server_port", None) or port), flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo


def serving_line(host: str, port: int) -> str:
    """What the server prints once it answers (tests/browser.py waits for it)."""
    return f"LoRA Studio serving on http://{host}:{port} (share links off)"
