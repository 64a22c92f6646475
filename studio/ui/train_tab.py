"""Train tab: hyperparameters, Start/Stop, and the live view of the run.

The trainer is a separate process started through the runs manager; this tab only reads the
run directory. A timer calls `poll`, which reads the metrics file from the byte offset it
reached last time, once for every open tab (Curve), so a tick costs the same at step 10 and at
step 10,000, and about the same with one tab open or twenty.
"""

from __future__ import annotations

import html
import shlex
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import runs
from ..config import SCHEDULERS, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, field_help
from .charts import Series, loss_plot
from .model_tab import selection

TRAIN_HELP = field_help(TrainConfig)
FINAL = set(runs.FINAL_STATES)


def build_config(model_state: dict, lora_values: list, data_values: list, train_values: list) -> RunConfig:
    """Widget values -> a validated RunConfig (raises ConfigError naming the field)."""
    if model_state.get("explore_only"):
        from ..shards import pickled_files

        ref = model_state.get("ref")
        pickled = pickled_files(Path(str(ref))) if ref else []
        if pickled:
            raise ConfigError(f"{ref} has only pickled weights ({', '.join(pickled[:3])}), which are never loaded "
                              "(a pickle can run code); convert them to safetensors to train")
        raise ConfigError(f"{ref} is explore-only (no weights); pick a built-in or a folder with weights to train")
    sel = selection(model_state, *lora_values)
    if sel.error:
        raise ConfigError(sel.error)
    from .. import lora

    lora.check(sel.tree, sel.settings)  # targets that match nothing never reach a trainer
    path, fmt, eval_fraction, max_length, packing, train_on_prompt = data_values
    (lr, max_steps, epochs, batch, accum, scheduler, warmup, eval_steps, save_steps, seed) = train_values
    cfg = RunConfig(
        model=ModelConfig(name_or_path=sel.ref, task=sel.task),
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
    """Start a run; returns the new run state. Refusals raise gr.Error with the reason."""
    try:
        cfg = build_config(model_state, lora_values, data_values, train_values)
        from .. import data

        data.load_records(cfg.data.path, cfg.data.format)  # bad data is refused before a process starts
        run_dir = runs.start_run(cfg, runs_dir)
        forget_active(runs_dir)
    except ConfigError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except OSError as e:  # a full disk, a runs folder that is a file or read-only: the server stays up
        raise gr.Error(os_error_message(e, f"cannot write the runs folder {runs_dir}"), print_exception=False) from None
    return {"dir": str(run_dir), "seen": 0}


def os_error_message(e: OSError, what: str) -> str:
    """One line for a failed write or read: what was being done, the file and the system's reason."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{what}: {e.strerror or e}{where}"


def attach(runs_dir: Path, run_dir: str | None = None) -> dict:
    """Re-attach after a page load: the active run, else the newest one; the whole curve so far."""
    d = Path(run_dir) if run_dir else runs.active_run(runs_dir)
    if d is None:
        listed = runs.list_runs(runs_dir)
        d = Path(listed[0]["dir"]) if listed else None
    if d is None:
        return {"dir": None, "seen": 0}
    return {"dir": str(d), "seen": curve_of(d).update()}


# Which run is active, shared by every open tab for ACTIVE_TTL_S: finding it reads the status of
# every run folder (12 ms with 200 runs and none active), and each tab polls once a second.
ACTIVE_TTL_S = 1.0
_active_lock = threading.Lock()
_active_seen: dict[str, tuple[float, Path | None]] = {}


def active_run(runs_dir: Path) -> Path | None:
    key = str(runs_dir)
    with _active_lock:
        hit = _active_seen.get(key)
        if hit is not None and time.monotonic() - hit[0] < ACTIVE_TTL_S:
            return hit[1]
    found = runs.active_run(runs_dir)
    with _active_lock:
        _active_seen[key] = (time.monotonic(), found)
    return found


def forget_active(runs_dir: Path) -> None:
    """A run was just started here: the next poll looks again."""
    with _active_lock:
        _active_seen.pop(str(runs_dir), None)


class Curve:
    """One run's metrics as the Train tab shows them, read once for every open tab.

    Each tab used to keep its own copy of every metrics row and rebuild the chart from all of
    them at every tick: O(steps) per tab per second (28 ms a tick at 10,000 steps, 125 ms at
    50,000), and as many copies of the rows as tabs. One Curve per run reads only what is new
    (by byte offset), extends the chart's series by the new rows, and serializes the chart once
    per version for every tab; a tab's own state is the run folder and the version it shows.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset, self.version = 0, getattr(self, "version", 0) + 1
        self.series = Series()
        self.last: dict = {}  # newest tokens_per_s, loss and eval_accuracy seen
        self._plot = (None, None)

    def update(self) -> int:
        """Read what is new; the version, which changes whenever the curve does."""
        with self.lock:
            rows, offset = runs.read_metrics(self.dir, self.offset)
            if offset < self.offset:  # the file was recreated: start over
                self._reset()
                rows, offset = runs.read_metrics(self.dir, 0)
            self.offset = offset
            if rows:
                self.series.extend(rows)
                for r in rows:
                    self.last.update({k: r[k] for k in ("tokens_per_s", "loss", "eval_accuracy")
                                      if r.get(k) is not None})
                self.version += 1
            return self.version

    def plot(self):
        with self.lock:
            version, plot = self._plot
            if version != self.version:
                plot = loss_plot({self.dir.name: self.series})
                self._plot = (self.version, plot)
            return plot


CURVES_KEPT = 16  # runs whose curves stay in memory (the ones tabs looked at last)
_curves_lock = threading.Lock()
_curves: OrderedDict[str, Curve] = OrderedDict()


def curve_of(run_dir) -> Curve:
    key = str(run_dir)
    with _curves_lock:
        c = _curves.get(key)
        if c is None:
            c = _curves[key] = Curve(Path(run_dir))
            while len(_curves) > CURVES_KEPT:
                _curves.popitem(last=False)
        _curves.move_to_end(key)
        return c


def advance(state: dict, runs_dir: Path) -> tuple[dict, bool]:
    """Read what is new; switch to a newer active run (started from another tab). (state, changed)."""
    active = active_run(runs_dir)
    if active is not None and str(active) != state.get("dir"):
        return attach(runs_dir, str(active)), True
    if not state.get("dir"):
        return state, False
    version = curve_of(state["dir"]).update()
    if version == state.get("seen"):
        return state, False
    return {"dir": state["dir"], "seen": version}, True


def status_view(state: dict) -> tuple[str, str, bool]:
    """(run-status HTML, run-progress HTML, whether the run is active)."""
    if not state.get("dir"):
        return "<div class='rs'>No run yet: press <b>Start training</b>.</div>", _bar(0, 0), False
    st = runs.read_status(state["dir"])
    last = curve_of(state["dir"]).last
    step, total = st.get("step") or 0, st.get("max_steps") or 0
    state_name = st.get("state", "queued")
    bits = [f"<span class='badge st-{state_name}'>{state_name}</span>",
            f"<b>{html.escape(Path(state['dir']).name)}</b>", f"step {step} / {total}"]
    elapsed = st.get("elapsed_s")
    if elapsed is None and st.get("started_at"):
        elapsed = (st.get("updated_at") or time.time()) - st["started_at"]
    if elapsed:
        bits.append(f"elapsed {_dur(elapsed)}")
    if st.get("eta_s") is not None and state_name == "running":
        bits.append(f"ETA {_dur(st['eta_s'])}")
    if last.get("tokens_per_s"):
        bits.append(f"{last['tokens_per_s']:,.0f} tokens/s")
    loss = st.get("last_loss", last.get("loss"))
    if loss is not None:
        bits.append(f"loss {loss:.4f}")
    if st.get("eval_loss") is not None:
        bits.append(f"eval loss {st['eval_loss']:.4f}")
    if last.get("eval_accuracy") is not None:
        bits.append(f"eval accuracy {last['eval_accuracy']:.1%}")
    out = "<div class='rs'>" + " · ".join(bits) + "</div>"
    if st.get("error") and state_name in ("failed", "diverged"):
        out += f"<pre class='rs-err'>{html.escape(str(st['error'])[-3000:])}</pre>"
    active = state_name in runs.ACTIVE_STATES and st.get("alive", False)
    return out, _bar(step, total), active


def _bar(step: int, total: int) -> str:
    pct = 100.0 * step / total if total else 0.0
    return (f"<div class='pbar' data-step='{step}' data-total='{total}'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='pbar-text'>{step} / {total} steps ({pct:.0f}%)</div>")


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def figure(state: dict):
    if not state.get("dir"):
        return loss_plot({"run": []})
    return curve_of(state["dir"]).plot()


def config_view(state: dict) -> tuple[str, str]:
    if not state.get("dir"):
        return "", ""
    p = Path(state["dir"]) / runs.CONFIG
    return (p.read_text() if p.is_file() else ""), cli_command(Path(state["dir"]))


def stop(state: dict) -> None:
    if not state.get("dir"):
        raise gr.Error("no run to stop", print_exception=False)
    try:
        runs.stop_run(state["dir"])
    except ConfigError as e:
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
    ui.run_status = gr.HTML(elem_id="run-status")
    ui.run_progress = gr.HTML(elem_id="run-progress")
    ui.loss_plot = gr.Plot(elem_id="loss-plot", label="Loss")
    with gr.Accordion("Show YAML / CLI", open=False):
        ui.run_yaml = gr.Code(language="yaml", label="config.yaml", elem_id="run-yaml")
        ui.run_cli = gr.Textbox(label="Repeat this run from a terminal", elem_id="run-cli", buttons=["copy"])
    ui.run_state = gr.State({"dir": None, "seen": 0})
    ui.timer = gr.Timer(1.0)
    ui.inputs = [ui.learning_rate, ui.max_steps, ui.epochs, ui.batch, ui.accum, ui.scheduler, ui.warmup,
                 ui.eval_steps, ui.save_steps, ui.seed]
    return ui
