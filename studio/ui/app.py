"""The studio's Gradio app: tabs, event wiring and a locked-down launch.

Each tab module builds its components and holds its handlers as plain functions; this module
only wires events between them. Polls are cheap and unlimited in concurrency; starting a run
and merging share one slot, so two clicks never start two heavy jobs.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from studio import runs
from studio.ui import live
from studio.ui.login_wall import LoginWall
from studio.ui.tabs import analysis as analysis_tab
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import export as export_tab
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import playground as playground_tab
from studio.ui.tabs import runs as runs_tab
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
"""
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)
LIGHT = dict(concurrency_limit=None)


def build_app(runs_dir: str | os.PathLike | None = None) -> gr.Blocks:
    root = runs.runs_dir(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title="LoRA Studio", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown("## LoRA Studio\nPick a model, tick the modules that get LoRA adapters, train in the "
                    "background, merge and download. Everything here is also a `studio` command.")
        model_state = gr.State({"ref": model_tab.DEFAULT_MODEL, "task": "causal_lm", "explore_only": False})
        model_reason = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Model", id="tab-model"):
                m = model_tab.build(model_state)
            with gr.Tab("Data", id="tab-data"):
                d = data_tab.build(root)
            with gr.Tab("Train", id="tab-train"):
                t = train_tab.build()
            with gr.Tab("Runs", id="tab-runs") as runs_tab_el:
                r = runs_tab.build(root)
            with gr.Tab("Export", id="tab-export") as export_tab_el:
                x = export_tab.build(root)
            with gr.Tab("Playground", id="tab-playground") as playground_tab_el:
                g = playground_tab.build(root)
            with gr.Tab("Analysis", id="tab-analysis") as analysis_tab_el:
                a = analysis_tab.build(root)
        _wire_model(m, d, t, model_state, model_reason)
        _wire_data(d, t, model_state, model_reason, root)
        _wire_train(m, d, t, model_state, model_reason, root)
        _wire_runs(r, runs_tab_el, root)
        _wire_export(x, export_tab_el, root)
        _wire_playground(g, playground_tab_el, root)
        _wire_analysis(a, analysis_tab_el, root)
        demo.load(_on_page_load(root), [model_state], [m.module_tree, m.target_types, m.summary, model_state,
                                                          t.live], api_name="page_load", **LIGHT) \
            .then(_recount, m.lora_inputs, [m.param_count, m.param_chart, model_reason], **LIGHT) \
            .then(_preview, [d.dataset_select, d.data_format, d.max_length, model_state],
                  [d.dataset_preview, d.data_info, d.data_error], **LIGHT) \
            .then(**_gate(root, t, model_reason, d))
    return demo


# --- model ---------------------------------------------------------------------------------

def _on_page_load(root: Path):
    def load(state: dict):
        tree_upd, types_upd, summary, state = model_tab.load(state.get("ref"), state.get("task"))
        return tree_upd, types_upd, summary, state, train_tab.attach(root)
    return load


def _recount(state, keys, layers, r, alpha, dropout, bias, rslora, dora, mts, rank_pattern):
    sel = model_tab.selection(state, keys, layers, r, alpha, dropout, bias, rslora, dora, mts, rank_pattern)
    html, fig, reason = model_tab.count_view(sel)
    if reason is None and state.get("explore_only"):
        reason = f"{state.get('ref')} is explore-only (a config without weights): counts only, no training"
    return html, fig, reason


def _wire_model(m, d, t, model_state, model_reason):
    def load(ref, task, trust):
        tree_upd, types_upd, summary, state = model_tab.load(ref, task, trust)
        return tree_upd, types_upd, summary, state

    def load_default_task(ref, trust):
        return load(ref, None, trust)

    outs = [m.module_tree, m.target_types, m.summary, model_state]
    after = dict(fn=_recount, inputs=m.lora_inputs, outputs=[m.param_count, m.param_chart, model_reason], **LIGHT)
    sync_task = dict(fn=lambda s: (s["task"], gr.update(value=data_tab.default_dataset(s["task"]))),
                     inputs=[model_state], outputs=[m.task, d.dataset_select], **LIGHT)
    m.model_load.click(load_default_task, [m.model_select, m.trust_remote_code], outs, api_name="load_model",
                       **LIGHT).then(**after).then(**sync_task)
    m.model_select.select(load_default_task, [m.model_select, m.trust_remote_code], outs, **LIGHT) \
        .then(**after).then(**sync_task)
    m.task.input(load, [m.model_select, m.task, m.trust_remote_code], outs, **LIGHT).then(**after)
    # Ticking it explains it; the model loads with it on the next Load (nothing runs on a tick).
    m.trust_remote_code.change(model_tab.trust_note, [m.trust_remote_code], [m.trust_note], **LIGHT)

    def types_changed(state, types, keys, previous_types):
        return model_tab.keys_from_types(model_tab.tree_of(state), types, keys, previous_types), types

    m.target_types.input(types_changed, [model_state, m.target_types, m.module_tree, m.types_state],
                         [m.module_tree, m.types_state], **LIGHT)

    def tree_changed(state, keys):
        types = model_tab.types_from_keys(model_tab.tree_of(state), keys)
        return types, types

    m.sweep_btn.click(model_tab.sweep_view, [model_state], [m.sweep_plot, m.sweep_table], api_name="sweep", **LIGHT)
    m.module_tree.change(tree_changed, [model_state, m.module_tree], [m.target_types, m.types_state], **LIGHT) \
        .then(**after)
    for w in (m.layers, m.bias, m.rslora, m.dora, m.mts, m.rank_pattern):
        w.change(**after)
    for w in (m.lora_r, m.lora_alpha, m.lora_dropout):
        w.change(**after)


# --- data ----------------------------------------------------------------------------------

def _preview(path, fmt, max_length, state):
    rows, info, error = data_tab.preview(path, fmt, max_length, state)
    import pandas as pd

    return pd.DataFrame(rows), info, error


def _wire_data(d, t, model_state, model_reason, root: Path):
    prev = dict(fn=_preview, inputs=[d.dataset_select, d.data_format, d.max_length, model_state],
                outputs=[d.dataset_preview, d.data_info, d.data_error], **LIGHT)
    for w in (d.dataset_select, d.data_format, d.max_length):
        w.change(**prev)

    def uploaded(file):
        path = data_tab.save_upload(file, root)
        return gr.update(choices=data_tab.dataset_choices(root), value=path)

    d.dataset_upload.upload(uploaded, [d.dataset_upload], [d.dataset_select], api_name="upload_dataset", **LIGHT)


# --- train ---------------------------------------------------------------------------------

def _wire_train(m, d, t, model_state, model_reason, root: Path):
    def start(state, *values):
        lora_values = list(values[:10])
        data_values = list(values[10:16])
        train_values = list(values[16:])
        return train_tab.start(root, state, lora_values, data_values, train_values)

    inputs = [model_state] + m.lora_inputs[1:] + d.inputs + t.inputs
    gate = _gate(root, t, model_reason, d)
    t.train_start.click(start, inputs, [t.live], api_name="start_training", **HEAVY).then(**gate)
    t.train_stop.click(functools.partial(train_tab.stop, root), [t.live], None, api_name="stop_training", **LIGHT)
    # The live view polls its own route (studio/ui/live.py); its value changes when the run it
    # follows does, or stops being active, and that re-gates Start.
    for st in (t.live, model_reason, d.data_error):
        st.change(**gate)


def _gate(root: Path, t, model_reason, d) -> dict:
    return dict(fn=functools.partial(train_tab.phase_view, root), inputs=[t.live, model_reason, d.data_error],
                outputs=[t.start_reason, t.train_start, t.run_yaml, t.run_cli], show_progress="hidden", **LIGHT)


# --- runs ----------------------------------------------------------------------------------

def _wire_runs(r, tab, root: Path):
    def refresh(current_pick, current_compare):
        ids = runs_tab.run_ids(root)
        return (runs_tab.table(root), gr.update(choices=ids, value=current_pick if current_pick in ids else None),
                gr.update(choices=ids, value=[i for i in (current_compare or []) if i in ids]))

    outs = [r.runs_table, r.pick, r.compare]
    r.refresh.click(refresh, [r.pick, r.compare], outs, api_name="list_runs", **LIGHT)
    tab.select(refresh, [r.pick, r.compare], outs, **LIGHT)
    r.compare.change(functools.partial(runs_tab.overlay, root), [r.compare], [r.overlay_plot], **LIGHT)
    r.resume.click(functools.partial(runs_tab.resume, root), [r.pick], [r.message], api_name="resume_run", **HEAVY) \
        .then(refresh, [r.pick, r.compare], outs, **LIGHT)
    r.delete.click(lambda pick: (gr.update(visible=bool(pick)),
                                 f"Delete **{pick}** and all its files? This cannot be undone." if pick
                                 else "Pick a run first."),
                   [r.pick], [r.confirm, r.message], **LIGHT)
    r.confirm.click(functools.partial(runs_tab.delete, root), [r.pick], [r.message], api_name="delete_run", **LIGHT) \
        .then(lambda: gr.update(visible=False), None, [r.confirm], **LIGHT) \
        .then(refresh, [r.pick, r.compare], outs, **LIGHT)


# --- export --------------------------------------------------------------------------------

def _wire_export(x, tab, root: Path):
    def refresh(current):
        ids = export_tab.exportable(root)
        return gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

    tab.select(refresh, [x.run], [x.run], **LIGHT)

    def prepare_adapter(run_id):
        if not run_id:
            return gr.update(value=None, interactive=False), gr.update(value=None, interactive=False)
        merged = root / run_id / "exports" / f"{run_id}-merged.zip"
        return (gr.update(value=export_tab.adapter_zip(root, run_id), interactive=True),
                gr.update(value=str(merged) if merged.is_file() else None, interactive=merged.is_file()))

    x.run.change(prepare_adapter, [x.run], [x.download_adapter, x.download_merged], **LIGHT)

    def do_merge(run_id, dtype, verify, progress=gr.Progress()):
        if not run_id:
            raise gr.Error("pick a run with a final adapter first", print_exception=False)
        report, zip_path = export_tab.merge(root, run_id, dtype, verify, progress)
        return report, gr.update(value=zip_path, interactive=zip_path is not None)

    x.merge_btn.click(do_merge, [x.run, x.dtype, x.verify], [x.merge_report, x.download_merged],
                      api_name="merge", **HEAVY)


# --- playground ----------------------------------------------------------------------------

def _wire_playground(g, tab, root: Path):
    def refresh(current):
        ids = playground_tab.usable_runs(root)
        return gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

    tab.select(refresh, [g.run], [g.run], **LIGHT)
    g.generate.click(functools.partial(playground_tab.generate, root),
                     [g.run, g.prompt, g.max_new_tokens, g.temperature, g.top_p, g.seed, g.template],
                     [g.base, g.tuned], api_name="generate", concurrency_id="playground", concurrency_limit=2)
    g.prompt.submit(functools.partial(playground_tab.generate, root),
                    [g.run, g.prompt, g.max_new_tokens, g.temperature, g.top_p, g.seed, g.template],
                    [g.base, g.tuned], concurrency_id="playground", concurrency_limit=2)
    g.evaluate.click(functools.partial(playground_tab.evaluate, root), [g.run], [g.eval_text, g.eval_rows],
                     api_name="evaluate", concurrency_id="playground", concurrency_limit=2)


# --- analysis ------------------------------------------------------------------------------

def _wire_analysis(a, tab, root: Path):
    def refresh(run_a, run_b):
        ids = export_tab.exportable(root)
        pick = lambda cur: cur if cur in ids else (ids[0] if ids else None)
        return gr.update(choices=ids, value=pick(run_a)), gr.update(choices=ids, value=pick(run_b))

    tab.select(refresh, [a.run_a, a.run_b], [a.run_a, a.run_b], **LIGHT)
    a.run_a.change(lambda run_id: gr.update(choices=analysis_tab.modules(root, run_id), value=None),
                   [a.run_a], [a.module], **LIGHT)
    a.btn_subspace.click(functools.partial(analysis_tab.subspace, root), [a.run_a, a.run_b, a.module, a.which],
                         [a.heatmap, a.summary], api_name="analyze_subspace", **HEAVY)
    a.btn_spectrum.click(functools.partial(analysis_tab.spectrum, root), [a.run_a],
                         [a.spectrum_plot, a.spectrum_table], api_name="analyze_spectrum", **HEAVY)
    a.btn_amp.click(functools.partial(analysis_tab.amplification, root), [a.run_a], [a.amp_table],
                    api_name="analyze_amplification", **HEAVY)


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
    q = getattr(demo, "_queue", None)
    knobs = {"sleep_when_free": QUEUE_IDLE_POLL_S, "progress_update_sleep_when_free": QUEUE_PROGRESS_POLL_S}
    if q is None or not all(isinstance(getattr(q, k, None), (int, float)) for k in knobs):
        return False
    for k, v in knobs.items():
        setattr(q, k, v)
    return True


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, runs_dir=None,
           prevent_thread_lock: bool = False, quiet: bool = False):
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
    demo = build_app(root)
    demo.queue(default_concurrency_limit=4)
    calm_queue(demo)
    demo.launch(server_name=host, server_port=port, auth=creds, share=False, allowed_paths=[str(root)],
                max_file_size=max_bytes, enable_monitoring=False, show_error=True,
                prevent_thread_lock=prevent_thread_lock, quiet=quiet, css=CSS, footer_links=[],
                # No call history kept in the browser or offered to sync to the Hub, no
                # unauthenticated /openapi.json, and with auth nothing but the login page.
                run_history=False, app_kwargs={"openapi_url": None, "middleware": [Middleware(LoginWall)],
                                                 "routes": live.routes(root)})
    return demo
