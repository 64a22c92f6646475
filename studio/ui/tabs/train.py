"""Train tab: hyperparameters, Start/Stop, and the live view of the run (studio/ui/live.py).

The trainer is a separate process started through the runs manager; this tab only starts and
stops it and reads its run directory. The form a run is made from spans three tabs (FORM, by
name); whether it may start is the engine's preflight, the answer `studio train` gives, asked
while the form changes (Start is disabled with the reason) and again when Start is clicked.
"""

from __future__ import annotations

import dataclasses
import html
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from studio import runs
from studio.config import (
    OPTIMIZERS,
    PRECISIONS,
    QUANTIZATIONS,
    SCHEDULERS,
    DataConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainConfig,
    field_help,
    starter_config,
)
from studio.errors import ConfigError, StudioError
from studio.runs import queue
from studio.runs.preflight import preflight
from studio.ui import live
from studio.ui.registry import Registry
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import next_steps

TRAIN_HELP = field_help(TrainConfig)
FINAL = set(runs.FINAL_STATES)
# TrainConfig fields with a widget, each registered as "train.<field>".
TRAIN_FIELDS = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "eval_steps", "save_steps", "seed",
                "gradient_checkpointing", "precision", "optim")
# model.quantization is set beside the other memory switches, so its widget is this tab's: "train.quantization".
TRAIN_FORM = tuple(f"train.{f}" for f in TRAIN_FIELDS) + ("train.quantization",)
# Every value a run is made from, across the Model, Data and Train tabs.
FORM = model_tab.LORA_FORM + data_tab.DATA_FORM + TRAIN_FORM
# What picking a model sets (`model_settings`).
SETTINGS_FORM = (tuple(model_tab.lora_values(LoraSettings())) + tuple(data_tab.data_values(DataConfig())) + TRAIN_FORM
                 + ("model.task", "data.dataset_select"))
TRAINING = "a run is training: Start queues this one behind it (it starts when the slot is free)"


def train_values(t: TrainConfig, quantization: str = "none") -> dict[str, Any]:
    """The TRAIN_FORM values of `t`, with the base's quantization (a ModelConfig field)."""
    return {**{f"train.{f}": getattr(t, f) for f in TRAIN_FIELDS}, "train.quantization": quantization}


def train_config(v: Mapping[str, Any], base: TrainConfig) -> TrainConfig:
    """The TRAIN_FORM values over `base` (fields without a widget keep its values); not validated here."""
    kw = {}
    for f in TRAIN_FIELDS:
        value, kind = v[f"train.{f}"], type(getattr(base, f))
        kw[f] = value if kind is str else bool(value) if kind is bool else kind(_num(value, f))
    return dataclasses.replace(base, **kw)


def _num(v, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"train.{name} must be a number, got {v!r}") from None


def model_settings(ref: str, task: str) -> dict[str, Any]:
    """The form's values when model `ref` is picked: its starter config (studio.config), with the
    dataset it names, else the first built-in dataset of its task."""
    cfg = starter_config(ref)
    named = cfg.data.path != DataConfig().path
    dataset = data_tab.dataset_value(cfg.data.path) if named else data_tab.default_dataset(task)
    return {**model_tab.lora_values(cfg.lora), **data_tab.data_values(cfg.data),
            **train_values(cfg.train, cfg.model.quantization), "model.task": task, "data.dataset_select": dataset}


def settings_after_pick(shown: dict | None, state: dict, dataset: str | None,
                        data_format: str | None) -> tuple[dict[str, Any], str]:
    """The form's values once the model in `state` loaded over the one `shown` before, and a note
    for the user ("" when nothing needs saying).

    The dataset the user chose stays (reloading the same model included) when it suits the new
    model's task; one that does not is replaced by the new model's starter dataset, and the note
    says why. A dataset the user never changed (the previous model's starter one) follows the new
    model's starter, and the note says so when that is another one."""
    settings = model_settings(state["ref"], state["task"])
    new, current = settings["data.dataset_select"], dataset or ""
    if not current or current == new:
        return settings, ""
    name = lambda p: f"<b>{html.escape(data_tab.dataset_name(p))}</b>"
    ref = html.escape(state["ref"])
    if shown and shown.get("ref"):
        before = model_settings(shown["ref"], shown.get("task") or "causal_lm")["data.dataset_select"]
        if current == before:
            return settings, (f"Dataset: now {name(new)}, the starter dataset of {ref} (was {name(current)}, "
                              f"the one of {html.escape(shown['ref'])}); pick another on the Data tab.")
    reason = data_tab.task_mismatch(current, data_format, state["task"])
    if reason is None:
        return {k: v for k, v in settings.items() if k not in ("data.dataset_select", "data.data_format")}, ""
    return settings, (f"Dataset: {name(current)} does not suit {ref} ({html.escape(reason, quote=False)}); switched to "
                      f"{name(new)}, the starter dataset of {ref}.")


def form_for(ref: str = model_tab.DEFAULT_MODEL, task: str | None = None, trust_remote_code: bool = False,
             **changes) -> dict[str, Any]:
    """The FORM values right after `ref` loads (ticked modules included), with `changes` by name
    ({"train.max_steps": 5}, or as keywords without the tab: max_steps=5)."""
    loaded = model_tab.load_view(ref, task, trust_remote_code)
    state = loaded["model.state"]
    values = {**model_settings(state["ref"], state["task"]), "model.state": state,
              "model.module_tree": loaded["model.module_tree"]["value"]}
    values = {k: values[k] for k in FORM}
    for name, value in changes.items():
        key = name if name in values else next((k for k in values if k.split(".", 1)[1] == name), name)
        if key not in values:
            raise KeyError(f"{name!r} is not a form value; form values: {', '.join(values)}")
        values[key] = value
    return values


def run_form(runs_dir: Path, run: str | None) -> dict[str, Any]:
    """The form filled from the config.yaml of `run` (the one the live view follows): its model
    with the modules it adapts ticked, its LoRA, data and train settings, and a note saying so.
    Refusals (no such run, a config or model that no longer loads) raise gr.Error."""
    from studio.config import load_config

    path = runs_dir / str(run) / runs.CONFIG
    if not run or not runs.is_run_id(run) or not path.is_file():
        raise gr.Error(f"no run {run!r} in {runs_dir} to take the settings from", print_exception=False)
    try:
        cfg = load_config(path)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    m = cfg.model
    loaded = model_tab.load_view(m.name_or_path, m.task, m.trust_remote_code, ticked=cfg.lora)
    return {**loaded, **model_tab.lora_values(cfg.lora), **data_tab.data_values(cfg.data),
            **train_values(cfg.train, m.quantization),
            "model.model_select": m.name_or_path, "model.task": m.task, "model.trust_remote_code": m.trust_remote_code,
            "model.message": "", "data.dataset_select": data_tab.dataset_value(cfg.data.path),
            "train.form_note": f"The form shows the settings of <b>{html.escape(run)}</b> (its {runs.CONFIG})."}


def build_config(v: Mapping[str, Any]) -> RunConfig:
    """The FORM values, by name -> a validated RunConfig (raises ConfigError naming the field).

    Whether it can start is preflight's question (`refusal`), not this one's."""
    sel = model_tab.selection(v)
    if sel.error:
        raise ConfigError(sel.error)
    state = v["model.state"] or {}
    base = starter_config(sel.ref)
    cfg = RunConfig(
        model=dataclasses.replace(base.model, name_or_path=sel.ref, task=sel.task,
                                  trust_remote_code=bool(state.get("trust_remote_code")),
                                  quantization=v["train.quantization"]),
        data=data_tab.data_config(v, base.data), lora=sel.settings, train=train_config(v, base.train))
    return cfg.validate()


def refusal(v: Mapping[str, Any]) -> str | None:
    """Why the form cannot start a run: the message `studio train` gives for the same config, or None."""
    try:
        preflight(build_config(v))
    except StudioError as e:
        return str(e)
    return None


def cli_command(run_dir: Path) -> str:
    return f"studio train {shlex.quote(str(run_dir / runs.CONFIG))}"


def start(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Start a run from the FORM values; returns the live view's value for it. Refusals raise
    gr.Error with preflight's reason, before a run folder exists."""
    try:
        cfg = build_config(v)
        preflight(cfg)  # a click can arrive before the gate caught up, or not from this page at all
        run_dir, position = queue.submit(cfg, runs_dir)  # behind the run that trains, if one does
        live.forget_active(runs_dir)
        if position is not None:
            gr.Info(f"Queued at position {position}: {run_dir.name} starts when the slot is free "
                    "(the Runs tab lists the queue).")
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except OSError as e:  # a full disk, a runs folder that is a file or read-only: the server stays up
        raise gr.Error(os_error_message(e, f"cannot write the runs folder {runs_dir}"), print_exception=False) from None
    return {"train.live": {"run": run_dir.name, "active": True}}


def continue_run(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Continue the run the live view shows for train.continue_steps more steps, as a new run that
    records its parent (runs.continuation); a refusal is shown beside the button, nothing is made."""
    run = (v["train.live"] or {}).get("run")
    try:
        if not run:
            raise StudioError("no run to continue: train one to completion first")
        cfg, extra = runs.continuation(runs.RunDir.of(runs_dir, run).path, v["train.continue_steps"])
        preflight(cfg)
        run_dir, position = queue.submit(cfg, runs_dir, extra)
        live.forget_active(runs_dir)
    except StudioError as e:
        return {"train.continue_message": reason_html(str(e))}
    except OSError as e:
        return {"train.continue_message": reason_html(os_error_message(e, f"cannot write the runs folder {runs_dir}"))}
    where = f"queued at position {position}" if position is not None else "started"
    return {"train.continue_message": html.escape(f"{run_dir.name} {where}: {cfg.train.max_steps} more steps from "
                                                  f"{run}'s final adapter"),
            "train.live": {"run": run_dir.name, "active": True}}


def os_error_message(e: OSError, what: str) -> str:
    """One line for a failed write or read: what was being done, the file and the system's reason."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{what}: {e.strerror or e}{where}"


def attach(runs_dir: Path) -> dict:
    """The live view's value after a page load: the active run, else the newest one."""
    d = live.shown_run(runs_dir)
    if d is None:
        return {"run": None, "active": False}
    return {"run": d.name, "active": live.status_view(d)[2]}


def config_view(run_dir: str | None) -> tuple[str, str]:
    if not run_dir:
        return "", ""
    p = Path(run_dir) / runs.CONFIG
    return (p.read_text() if p.is_file() else ""), cli_command(Path(run_dir))


def phase_view(root: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Start-reason, Start button, YAML and CLI line for the run the live view follows
    ({"run", "active"} under "train.live") and the FORM values."""
    followed = v["train.live"] or {}
    reason = refusal(v)
    note = reason or (TRAINING if followed.get("active") else None)  # a busy slot queues, it does not refuse
    yaml_text, cli = config_view(str(root / followed["run"]) if followed.get("run") else None)
    return {"train.start_reason": reason_html(note), "train.train_start": gr.update(interactive=reason is None),
            "train.run_yaml": yaml_text, "train.run_cli": cli}


def reason_html(reason: str | None) -> str:
    return f"⚠ {html.escape(reason)}" if reason else ""


def stop(root: Path, v: Mapping[str, Any]) -> None:
    run = (v["train.live"] or {}).get("run")
    if not run:
        raise gr.Error("no run to stop", print_exception=False)
    try:
        queue.stop(root / run)  # a run still waiting in the queue leaves it
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def build(ui: Registry, ref: str = model_tab.DEFAULT_MODEL) -> None:
    start = starter_config(ref)
    t, help_ = start.train, TRAIN_HELP
    c = {}
    with gr.Row():
        c["learning_rate"] = gr.Number(t.learning_rate, label="learning_rate", info=help_["learning_rate"])
        c["max_steps"] = gr.Number(t.max_steps, precision=0, label="max_steps", info=help_["max_steps"],
                                   elem_id="train-max-steps")
        c["num_train_epochs"] = gr.Number(t.num_train_epochs, label="num_train_epochs",
                                          info=help_["num_train_epochs"])
        c["per_device_train_batch_size"] = gr.Slider(1, 128, value=t.per_device_train_batch_size, step=1,
                                                     label="per_device_train_batch_size",
                                                     info=help_["per_device_train_batch_size"])
        c["gradient_accumulation_steps"] = gr.Slider(1, 64, value=t.gradient_accumulation_steps, step=1,
                                                     label="gradient_accumulation_steps",
                                                     info=help_["gradient_accumulation_steps"])
    with gr.Row():
        c["lr_scheduler_type"] = gr.Dropdown(list(SCHEDULERS), value=t.lr_scheduler_type, label="lr_scheduler_type",
                                             info=help_["lr_scheduler_type"])
        c["warmup_ratio"] = gr.Slider(0.0, 0.5, value=t.warmup_ratio, step=0.01, label="warmup_ratio",
                                      info=help_["warmup_ratio"])
        c["eval_steps"] = gr.Number(t.eval_steps, precision=0, label="eval_steps", info=help_["eval_steps"])
        c["save_steps"] = gr.Number(t.save_steps, precision=0, label="save_steps", info=help_["save_steps"])
        c["seed"] = gr.Number(t.seed, precision=0, label="seed", info=help_["seed"], elem_id="train-seed")
    with gr.Row(elem_id="train-memory"):  # what makes a big model fit: the Model tab's estimate follows these
        c["quantization"] = gr.Radio(list(QUANTIZATIONS), value=start.model.quantization,
                                     label="model.quantization", info=field_help(ModelConfig)["quantization"],
                                     elem_id="train-quantization")
        c["gradient_checkpointing"] = gr.Checkbox(t.gradient_checkpointing, label="gradient_checkpointing",
                                                  info=help_["gradient_checkpointing"], elem_id="train-checkpointing")
        c["precision"] = gr.Radio(list(PRECISIONS), value=t.precision, label="precision", info=help_["precision"],
                                  elem_id="train-precision")
        c["optim"] = gr.Radio(list(OPTIMIZERS), value=t.optim, label="optim", info=help_["optim"],
                              elem_id="train-optim")
    with gr.Row():
        c["train_start"] = gr.Button("Start training", variant="primary", elem_id="train-start", scale=1)
        c["train_stop"] = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1)
        c["start_reason"] = gr.HTML(elem_id="start-reason")
    with gr.Row():
        c["from_run"] = gr.Button("Fill the form from this run", elem_id="train-from-run", size="sm", scale=0,
                                  interactive=False)
        c["form_note"] = gr.HTML(elem_id="train-form-note")
    next_steps.build(ui)  # once the followed run completed: what to do with it
    c["live"] = live.LiveRun(elem_id="run-live")  # run-status, run-progress and loss-plot, polled by the page
    with gr.Row():  # a completed run, trained further as a new run that records it as its parent
        c["continue_steps"] = gr.Number(50, precision=0, minimum=1, label="more steps", elem_id="continue-steps",
                                        scale=0, min_width=120)
        c["train_continue"] = gr.Button("Continue for these steps", elem_id="train-continue", scale=0)
        c["continue_message"] = gr.HTML(elem_id="continue-message")
    with gr.Accordion("Show YAML / CLI", open=False):
        c["run_yaml"] = gr.Code(language="yaml", label=runs.CONFIG, elem_id="run-yaml")
        c["run_cli"] = gr.Textbox(label="Repeat this run from a terminal", elem_id="run-cli", buttons=["copy"])
    ui.add("train", **c)
