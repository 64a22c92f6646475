"""Train tab: hyperparameters, Start/Stop, and the live view of the run (studio/ui/live.py).

The trainer is a separate process started through the runs manager; this tab only starts and
stops it and reads its run directory.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import runs
from studio.config import SCHEDULERS, DataConfig, ModelConfig, RunConfig, TrainConfig, field_help
from studio.errors import ConfigError, StudioError
from studio.ui import live
from studio.ui.tabs.model import selection

TRAIN_HELP = field_help(TrainConfig)
FINAL = set(runs.FINAL_STATES)


def build_config(model_state: dict, lora_values: list, data_values: list, train_values: list) -> RunConfig:
    """Widget values -> a validated RunConfig (raises ConfigError naming the field)."""
    if model_state.get("explore_only"):
        from studio.models.shards import pickled_files

        ref = model_state.get("ref")
        pickled = pickled_files(Path(str(ref))) if ref else []
        if pickled:
            raise ConfigError(f"{ref} has only pickled weights ({', '.join(pickled[:3])}), which are never loaded "
                              "(a pickle can run code); convert them to safetensors to train")
        raise ConfigError(f"{ref} is explore-only (no weights); pick a built-in or a folder with weights to train")
    sel = selection(model_state, *lora_values)
    if sel.error:
        raise ConfigError(sel.error)
    from studio import lora

    lora.check(sel.tree, sel.settings)  # targets that match nothing never reach a trainer
    path, fmt, eval_fraction, max_length, packing, train_on_prompt = data_values
    (lr, max_steps, epochs, batch, accum, scheduler, warmup, eval_steps, save_steps, seed) = train_values
    cfg = RunConfig(
        model=ModelConfig(name_or_path=sel.ref, task=sel.task,
                          trust_remote_code=bool(model_state.get("trust_remote_code"))),
        data=DataConfig(path=path or "", format=fmt or "auto", eval_fraction=float(eval_fraction),
                        max_length=int(max_length), packing=bool(packing), train_on_prompt=bool(train_on_prompt)),
        lora=sel.settings,
        train=TrainConfig(learning_rate=_num(lr, "learning_rate"), max_steps=int(_num(max_steps, "max_steps")),
                          num_train_epochs=_num(epochs, "num_train_epochs"),
                          per_device_train_batch_size=int(batch), gradient_accumulation_steps=int(accum),
                          lr_scheduler_type=scheduler, warmup_ratio=float(warmup),
                          eval_steps=int(_num(eval_steps, "eval_steps")), save_steps=int(_num(save_steps, "save_steps")),
                          seed=int(_num(seed, "seed"))),
    )
    return cfg.validate()


def _num(v, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"train.{name} must be a number, got {v!r}") from None


def cli_command(run_dir: Path) -> str:
    return f"studio train {shlex.quote(str(run_dir / runs.CONFIG))}"


def start(runs_dir: Path, model_state: dict, lora_values: list, data_values: list, train_values: list) -> dict:
    """Start a run; returns the live view's value for it. Refusals raise gr.Error with the reason."""
    try:
        cfg = build_config(model_state, lora_values, data_values, train_values)
        from studio import data

        data.load_records(cfg.data.path, cfg.data.format)  # bad data is refused before a process starts
        run_dir = runs.start_run(cfg, runs_dir)
        live.forget_active(runs_dir)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except OSError as e:  # a full disk, a runs folder that is a file or read-only: the server stays up
        raise gr.Error(os_error_message(e, f"cannot write the runs folder {runs_dir}"), print_exception=False) from None
    return {"run": run_dir.name, "active": True}


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


def phase_view(root: Path, live: dict | None, model_reason: str | None, data_error: str | None):
    """(start-reason, Start button, YAML, CLI line) for the run the live view follows
    ({"run", "active"}) and the other tabs' verdicts on the model and the data."""
    live = live or {}
    active = bool(live.get("active"))
    reason = ("a run is training: stop it before starting another" if active
              else model_reason or (f"dataset: {data_error}" if data_error else None))
    yaml_text, cli = config_view(str(root / live["run"]) if live.get("run") else None)
    return (f"⚠ {reason}" if reason else ""), gr.update(interactive=reason is None), yaml_text, cli


def stop(root: Path, live: dict | None) -> None:
    run = (live or {}).get("run")
    if not run:
        raise gr.Error("no run to stop", print_exception=False)
    try:
        runs.stop_run(root / run)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def build() -> SimpleNamespace:
    ui = SimpleNamespace()
    d = TrainConfig()
    with gr.Row():
        ui.learning_rate = gr.Number(2e-3, label="learning_rate", info=TRAIN_HELP["learning_rate"])
        ui.max_steps = gr.Number(100, precision=0, label="max_steps", info=TRAIN_HELP["max_steps"])
        ui.epochs = gr.Number(d.num_train_epochs, label="num_train_epochs", info=TRAIN_HELP["num_train_epochs"])
        ui.batch = gr.Slider(1, 128, value=8, step=1, label="per_device_train_batch_size",
                             info=TRAIN_HELP["per_device_train_batch_size"])
        ui.accum = gr.Slider(1, 64, value=1, step=1, label="gradient_accumulation_steps",
                             info=TRAIN_HELP["gradient_accumulation_steps"])
    with gr.Row():
        ui.scheduler = gr.Dropdown(list(SCHEDULERS), value=d.lr_scheduler_type, label="lr_scheduler_type",
                                   info=TRAIN_HELP["lr_scheduler_type"])
        ui.warmup = gr.Slider(0.0, 0.5, value=d.warmup_ratio, step=0.01, label="warmup_ratio",
                              info=TRAIN_HELP["warmup_ratio"])
        ui.eval_steps = gr.Number(d.eval_steps, precision=0, label="eval_steps", info=TRAIN_HELP["eval_steps"])
        ui.save_steps = gr.Number(d.save_steps, precision=0, label="save_steps", info=TRAIN_HELP["save_steps"])
        ui.seed = gr.Number(d.seed, precision=0, label="seed", info=TRAIN_HELP["seed"])
    with gr.Row():
        ui.train_start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=1)
        ui.train_stop = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1)
        ui.start_reason = gr.Markdown(elem_id="start-reason")
    ui.live = live.LiveRun(elem_id="run-live")  # run-status, run-progress and loss-plot, polled by the page
    with gr.Accordion("Show YAML / CLI", open=False):
        ui.run_yaml = gr.Code(language="yaml", label="config.yaml", elem_id="run-yaml")
        ui.run_cli = gr.Textbox(label="Repeat this run from a terminal", elem_id="run-cli", buttons=["copy"])
    ui.inputs = [ui.learning_rate, ui.max_steps, ui.epochs, ui.batch, ui.accum, ui.scheduler, ui.warmup,
                 ui.eval_steps, ui.save_steps, ui.seed]
    return ui
