"""The background trainer process: `python -m studio.runs.trainer RUN_DIR [--resume]`.

Reads RUN_DIR/config.yaml, builds the tokenizer, datasets, model and PEFT model, and runs
transformers' `Trainer`. Everything it reports goes into the run directory (studio.runs.rundir):
status.json (rewritten atomically), metrics.jsonl (one line per Trainer log event, flushed),
train.log (this process's stdout and stderr, redirected by the launcher). Started by
`runs.start_run` / `runs.resume_run`, by `studio train`, or by hand.

Stopping. SIGTERM or SIGINT (what `studio stop` sends): the current step finishes, a checkpoint
of that step is saved (so a resume continues from exactly there), the adapter is written and
the run ends `stopped`, within about one step plus a save. A signal that comes while the model
or data are still loading stops at once, without an adapter. So that a stop knows how long to
wait, status.json carries the times measured on this run: step_s (the slowest of the last
STEP_WINDOW optimizer steps), eval_s (the last evaluation), save_s (the last checkpoint save) and
adapter_save_s (the last adapter write); studio.runs.stop_estimate reads them.

Divergence. A non-finite training loss stops the run as `diverged`. That step's update is
skipped and never checkpointed, so the checkpoints all hold finite weights. adapter/ then holds
the adapter of the last complete checkpoint before the divergence (status.json `adapter_step`
says which step); if none had been saved yet there is no adapter/. The completed and stopped
states write the adapter from the weights in memory, after checking they are finite.

Resume (`--resume`): continues from the newest complete checkpoint (one whose folder holds
runs.COMPLETE_MARKER, written after Trainer finished every file of it); partial checkpoint
folders from a killed process are deleted. A `{"event": "resumed", "step": N}` line goes into
metrics.jsonl: points logged earlier with a step above N were lost with the crash and are
logged again; a chart should drop them. Trainer's own checkpoint files (optimizer, scheduler,
rng state) are torch-pickled by Trainer itself and read only by Trainer, from checkpoints this
process wrote; the studio never unpickles any other file.

Several processes. `studio train CONFIG --nproc N` (runs.start_run(..., nproc=N)) runs this
module under `accelerate launch --multi_gpu --num_processes N` (DDP: one process per GPU; on a
machine without GPUs, N CPU processes talking over gloo). Only the main process writes status,
metrics and the adapter. For multi-node, FSDP or DeepSpeed, write an accelerate config file
(`accelerate config --config_file my.yaml`, or by hand) and pass it along:

    studio train run.yaml --accelerate-config my.yaml [--nproc N]
    runs.start_run(cfg, accelerate_config="my.yaml", nproc=N)

which becomes `accelerate launch --config_file my.yaml [--num_processes N] -m studio.runs.trainer RUN_DIR`;
the file then decides backend, machines, ports, FSDP or DeepSpeed settings and mixed precision.

Switches (config.py has their help texts). model.quantization 8bit/4bit loads the frozen base
through bitsandbytes and readies it with peft.prepare_model_for_kbit_training; the adapter still
trains in float32 and merges into the full-precision base (studio merge reads the base's own
files). train.gradient_checkpointing is Trainer's activation checkpointing with use_reentrant
False (no input-gradient hook needed, works with a frozen base). train.precision: auto is bf16
on a CUDA GPU that supports it (fp16 when the weights are float16), fp32 otherwise. train.optim
adamw / adamw_8bit are Trainer's adamw_torch / adamw_bnb_8bit. The KV cache is off for training:
with a cache transformers does not derive the per-example mask of a packed block from its
position_ids, and packed examples would attend to each other.

Loss. While training on one process, the causal-LM loss is studio.runs.loss.labelled_loss: the
output head only at labelled positions, the same loss to float rounding (tests compare the first
steps' losses with the model's own forward). Evaluation, DDP (whose gradient sync needs its own
forward) and architectures loss.py does not cover use the model's own forward.

Best checkpoint and early stopping. train.early_stopping_patience > 0 turns on Trainer's
EarlyStoppingCallback with load_best_model_at_end on train.metric_for_best_model; config
validation requires save_steps to be a multiple of eval_steps (a checkpoint at every
evaluation that can be the best, Trainer's own rule) and an eval split. The final adapter is
then the best checkpoint's. status.json records best_step / best_metric / best_metric_name
(the best evaluation so far, whether or not early stopping is on) and, at the end, stop_reason:
completed, early_stopping, stopped or diverged.

Trackers. train.report_to goes to TrainingArguments.report_to (Trainer's own integrations). Each
tracker writes under RUN/trackers/: tensorboard event files in trackers/tensorboard, an MLflow
file store in trackers/mlflow (experiment "lora-studio", run name = run id; MLflow 3 wants
MLFLOW_ALLOW_FILE_STORE=true for it, set here and in the `open` command), wandb in offline
mode under trackers/wandb, trackio under trackers/trackio. A variable the user already set
(MLFLOW_TRACKING_URI, WANDB_MODE, ...) wins. status.json `trackers` maps each tracker to its
`path` and the `open` command that shows it.

Memory (studio.runs.memory_guard). The trainer holds itself under a limit a margin below the RAM
available when it starts ($STUDIO_TRAINER_MEMORY_LIMIT_BYTES sets it, `off` lifts it); running out
of memory there, on the GPU, or being killed for it by the kernel ends the run `failed` with "out
of memory at step N (peak X GB)" and preflight's suggestions (status.json `memory` holds them from
the start). Each training row of metrics.jsonl carries peak_rss_mb (and peak_gpu_mb on a GPU).

Test hooks: the environment variable STUDIO_INJECT_NAN_AT_STEP=N multiplies the training loss
of optimizer step N by NaN, as a real divergence would look; STUDIO_SLOW_STEP_S=SECONDS makes
every optimizer step that much longer, as a big model or a busy machine would. They exist for
the tests.
"""

from __future__ import annotations

import signal


class StopRequested(BaseException):
    """A stop signal came before training began; there is nothing to save.

    A BaseException, like KeyboardInterrupt, so library code catching Exception cannot swallow it.
    """


class _Stop:
    requested = False
    # While loading the model or data the handler raises, so a stop does not wait for setup.
    raise_now = False


def _on_signal(signum, frame):
    first = not _Stop.requested
    _Stop.requested = True
    if first and _Stop.raise_now:
        raise StopRequested(signal.Signals(signum).name)
    if not first and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl+C in a terminal: give up without saving


if __name__ == "__main__":
    # Installed before the heavy imports below, which take seconds: a stop then is not lost.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from studio import _compat, runs  # noqa: E402
from studio.config import RunConfig, load_config  # noqa: E402
from studio.errors import ConfigError, StudioError  # noqa: E402
from studio.runs import memory_guard  # noqa: E402
from studio.runs.preflight import memory_status, resolve_precision  # noqa: E402
from studio.runs.loss import labelled_loss  # noqa: E402
from studio.runs.rundir import RunDir  # noqa: E402

NAN_HOOK_ENV = "STUDIO_INJECT_NAN_AT_STEP"
SLOW_HOOK_ENV = "STUDIO_SLOW_STEP_S"
STEP_WINDOW = 20  # step_s is the slowest of this many recent steps: one slow step is not forgotten at once
# Trainer's own files in a checkpoint; everything else there (adapter, tokenizer) is the adapter.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                 runs.COMPLETE_MARKER}
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}  # train.optim -> Trainer's names
TRACKER_PROJECT = "lora-studio"  # MLflow experiment, wandb / trackio project
METRIC_KEYS = ("loss", "eval_loss", "eval_accuracy", "learning_rate", "grad_norm", "train_loss", "train_runtime")


class Reporter:
    """Owns status.json and metrics.jsonl of one run; does nothing on processes other than the main one."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.rd = RunDir(run_dir)
        self.status = self.rd.read_status_file() or {}
        self.guard: memory_guard.Guard | None = None  # the memory limit main() set, if any
        self._metrics = self.rd.open_metrics() if enabled else None

    def update(self, **fields) -> None:
        self.status.update(fields)
        self.status["updated_at"] = time.time()
        if self.enabled:
            self.rd.write_status(self.status)

    def metrics(self, row: dict) -> None:
        if self.enabled:
            # One write of a whole line, then flush: a reader sees whole lines or a torn last one.
            self._metrics.write(json.dumps(runs.finite_json(row)) + "\n")
            self._metrics.flush()


class StudioTrainer(_compat.DeferCheckpointRotation, Trainer):
    """Trainer plus two things done inside a step: non-padding token counting and loss checks.

    The token count stays on the device between logs (no sync per step); the loss check costs
    nothing extra because Trainer already syncs on the loss value for its NaN log filter.
    """

    def __init__(self, *args, inject_nan_at: int | None = None, slow_step_s: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.inject_nan_at, self.slow_step_s = inject_nan_at, slow_step_s
        self.save_t0 = self.eval_t0 = None  # when the checkpoint save or evaluation in progress began
        tok = self.processing_class
        pad, eos = getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)
        self.pad_id = pad if pad != eos else None  # a pad that doubles as EOS cannot tell padding apart
        self.tokens = 0
        self.bad_loss: tuple[int, float] | None = None  # (step, value) of the first non-finite loss
        self.use_labelled_loss = True  # causal LM only; build() turns it off for classifiers
        self.labelled_steps = 0  # micro-batches whose loss came from labelled_loss (tests read it)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens = self.tokens + count_tokens(inputs, self.pad_id)
        if self.slow_step_s > 0:
            time.sleep(self.slow_step_s / self.args.gradient_accumulation_steps)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.bad_loss is None and not bool(torch.isfinite(loss).all()):
            self.bad_loss = (self.state.global_step + 1, float(loss.float().mean()))
        return loss

    def checkpoint_save_started(self):
        # Saving runs with rotation off (DeferCheckpointRotation); StudioCallback.on_save rotates
        # once the new checkpoint is marked complete, so a kill in between never leaves none.
        self.save_t0 = time.time()

    def evaluate(self, *args, **kwargs):
        self.eval_t0 = time.time()
        return super().evaluate(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = None
        if model.training and not return_outputs:
            out = self._labelled_loss(model, inputs, num_items_in_batch)
        if out is None:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if model.training and self.inject_nan_at == self.state.global_step + 1:
            if return_outputs:
                return out[0] * float("nan"), out[1]
            return out * float("nan")
        return out


    def _labelled_loss(self, model, inputs, num_items_in_batch):
        """labelled_loss where it gives what Trainer.compute_loss would: one process, no custom loss."""
        if (not self.use_labelled_loss or self.label_smoother is not None or self.compute_loss_func is not None
                or self.accelerator.unwrap_model(model) is not model):  # DDP / DataParallel need their forward
            return None
        # Trainer's rule: the model divides by num_items_in_batch only when it accepts loss kwargs;
        # otherwise it takes the mean and Trainer divides by the accumulation steps.
        n = num_items_in_batch if self.model_accepts_loss_kwargs else None
        batch = {k: v for k, v in inputs.items() if k != "use_cache"}
        with self.accelerator.autocast():  # accelerate autocasts the wrapped forward; this bypasses it
            loss = labelled_loss(model, batch, n)
        if loss is None:
            return None
        self.labelled_steps += 1
        if self.args.average_tokens_across_devices and n is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss does
        return loss


def count_tokens(inputs, pad_id: int | None = None) -> torch.Tensor | int:
    """Tokens that are not padding: the attention mask's ones; for packed blocks (no mask) the ids
    that are not the pad id. Stays a device tensor: summed without a sync."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.sum()
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return 0
    return (ids != pad_id).sum() if pad_id is not None else ids.numel()


class StudioCallback(TrainerCallback):
    """Streams metrics and status, turns a stop request or a bad loss into the end of training."""

    def __init__(self, report: Reporter, world_size: int, best_metric: str = "eval_loss"):
        self.report, self.world = report, world_size
        self.trainer: StudioTrainer | None = None
        self.stop = self.diverged = False
        self.best_key, self.higher_better = best_metric, best_metric == "eval_accuracy"
        self.early: EarlyStoppingCallback | None = None
        self.elapsed_before = float(report.status.get("elapsed_s") or 0.0)
        self.step_t0, self.step_times = None, deque(maxlen=STEP_WINDOW)

    def _elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def on_train_begin(self, args, state, control, **kw):
        _Stop.raise_now = False  # from here a stop waits for the end of the step
        if self.report.guard is not None:
            self.report.guard.apply()  # the room left, measured again now that the model is in memory
        self.t0 = self.mark = self.last_status = time.time()
        self.step0, self.train_time = state.global_step, 0.0
        self.report.update(state="stopping" if _Stop.requested else "running", phase="training",
                           step=state.global_step, max_steps=state.max_steps)

    def on_step_begin(self, args, state, control, **kw):
        self.step_t0 = time.time()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        stop, bad = _Stop.requested, self.trainer.bad_loss is not None
        if self.world > 1:
            # Every process must stop at the same step or DDP waits forever: agree on it (8 bytes a step).
            flags = torch.tensor([float(stop), float(bad)], device=args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, bad = bool(flags[0]), bool(flags[1])
        self.stop, self.diverged = stop, bad
        if bad:
            # Skip this update: with no gradients AdamW leaves every weight as it was.
            model.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kw):
        now = time.time()
        self.train_time += now - self.mark
        self.mark = now
        if self.step_t0 is not None:
            self.step_times.append(now - self.step_t0)
            self.report.status["step_s"] = round(max(self.step_times), 3)
        if self.world == 1 and _Stop.requested and not self.diverged:
            # A signal during the optimizer step itself: one process needs no agreement, so this step
            # is the last rather than the next one.
            self.stop = True
        if self.diverged:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False  # never checkpoint the step that went bad
        elif self.stop:
            control.should_training_stop = True
            control.should_save = True  # a checkpoint of this very step: resume continues from here
            control.should_evaluate = False
        self.report.status["step"] = state.global_step  # an out-of-memory report names the step after it
        if now - self.last_status >= 1.0 or control.should_training_stop:
            self.last_status = now
            done = state.global_step - self.step0
            eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else None
            self.report.update(state="stopping" if self.stop else "running", step=state.global_step,
                               eta_s=eta, elapsed_s=self._elapsed(), **memory_guard.peaks())

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.mark = time.time()  # evaluation time is not training time (tokens/s)
        if self.trainer.eval_t0 is not None:
            self.report.status["eval_s"] = round(self.mark - self.trainer.eval_t0, 3)
        value = (metrics or {}).get(self.best_key)
        if isinstance(value, (int, float)) and value == value:
            best = self.report.status.get("best_metric")  # survives a resume in status.json
            # Strict improvement, as Trainer's _determine_best_metric: a tie keeps the earlier step.
            if best is None or (value > best if self.higher_better else value < best):
                self.report.status.update(best_step=state.global_step, best_metric=float(value),
                                          best_metric_name=self.best_key)

    def on_save(self, args, state, control, **kw):
        if self.world > 1:
            torch.distributed.barrier()  # every process has written its share (rng state) of the checkpoint
        if self.report.enabled:
            self.report.rd.mark_checkpoint_complete(state.global_step)
            if args.save_total_limit:
                # Only now that the new checkpoint is marked complete (see DeferCheckpointRotation).
                _compat.rotate_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint)
        self.mark = time.time()
        if self.trainer.save_t0 is not None:
            self.report.status["save_s"] = round(self.mark - self.trainer.save_t0, 3)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        row = {"step": state.global_step, "epoch": state.epoch}
        if "loss" in logs:
            # Collective on every process (they all log the same events), so only here, never per step.
            tokens = torch.as_tensor(self.trainer.tokens, device=args.device, dtype=torch.int64)
            if self.world > 1:
                torch.distributed.all_reduce(tokens)
            self.trainer.tokens = 0
            row["tokens"] = int(tokens)  # non-padding tokens since the previous training log line
            row["tokens_per_s"] = float(tokens) / self.train_time if self.train_time > 0 else None
            self.train_time = 0.0
            row.update(memory_guard.peaks())  # peak_rss_mb (and peak_gpu_mb): how close the run is to the limit
        for k in METRIC_KEYS:
            if k in logs:
                row[k] = logs[k]
        bad = self.trainer.bad_loss
        if "loss" in row and bad is not None and bad[0] <= state.global_step:
            row["loss"] = None  # Trainer's log filter put an average in place of the non-finite loss
            row["diverged"] = True
        row["elapsed_s"] = self._elapsed()
        self.report.metrics(row)
        # Into status.json with the next (throttled) status write, not a file write per log line.
        self.report.status.update({"last_loss" if k == "loss" else k: row[k]
                                   for k in ("loss", "eval_loss", "eval_accuracy") if k in row})


# --- building the pieces --------------------------------------------------------------------

def tracker_setup(report_to: list[str], run_dir: Path) -> dict:
    """Point each tracker into RUN/trackers/ (through the variables Trainer's integrations read);
    returns status.json's `trackers`: {name: {"path": ..., "open": command}}. Variables the user set win."""
    root = RunDir(run_dir).trackers
    out = {}
    for name in report_to:
        path = root / name
        if name == "tensorboard":
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(path))
            path = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
            out[name] = {"path": str(path), "open": f"tensorboard --logdir {path}"}
        elif name == "mlflow":
            os.environ.setdefault("MLFLOW_TRACKING_URI", path.resolve().as_uri())
            os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", TRACKER_PROJECT)
            uri = os.environ["MLFLOW_TRACKING_URI"]
            # MLflow 3 keeps its file store (a plain folder, nothing to run or migrate) behind an opt-in.
            allow = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") else ""
            if allow:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out[name] = {"path": uri, "experiment": os.environ["MLFLOW_EXPERIMENT_NAME"],
                         "open": f"{allow}mlflow ui --backend-store-uri {uri}"}
        elif name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
            os.environ.setdefault("WANDB_DIR", str(root))  # wandb writes its own wandb/ folder in it
            os.environ.setdefault("WANDB_PROJECT", TRACKER_PROJECT)
            path = Path(os.environ["WANDB_DIR"]) / "wandb"
            out[name] = {"path": str(path), "mode": os.environ["WANDB_MODE"],
                         "open": f"wandb sync {path}/offline-run-*  (uploads the offline run; then open it on wandb.ai)"}
        elif name == "trackio":
            os.environ.setdefault("TRACKIO_DIR", str(path))
            out[name] = {"path": os.environ["TRACKIO_DIR"],
                         "open": f"TRACKIO_DIR={os.environ['TRACKIO_DIR']} trackio show --project {TRACKER_PROJECT}"}
        path.mkdir(parents=True, exist_ok=True)
    return out


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool, group_by_length: bool = False) -> TrainingArguments:
    t = cfg.train
    cuda = torch.cuda.is_available()
    precision = resolve_precision(t.precision, cfg.model.dtype, cuda)
    best = t.early_stopping_patience > 0 and has_eval
    return TrainingArguments(
        output_dir=str(RunDir(run_dir).checkpoints),
        learning_rate=t.learning_rate, max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float below 1 is Trainer's share-of-steps form
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        seed=t.seed, disable_tqdm=True,
        report_to=list(t.report_to) or "none", run_name=RunDir(run_dir).id, project=TRACKER_PROJECT,
        dataloader_num_workers=0, use_cpu=not cuda, label_names=["labels"],
        # LoRA leaves the frozen base without gradients by design; the unused-parameter search costs a pass.
        ddp_find_unused_parameters=False,
        fp16=precision == "fp16", bf16=precision == "bf16",
        optim=OPTIMIZERS[t.optim],
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        # The best checkpoint becomes the final adapter; config validation lines saves up with evaluations.
        load_best_model_at_end=best, metric_for_best_model=t.metric_for_best_model if best else None,
        greater_is_better=(t.metric_for_best_model == "eval_accuracy") if best else None,
        # Unpacked examples come with a `length` column: batches of similar lengths waste less on padding.
        train_sampling_strategy="group_by_length" if group_by_length else "random", length_column_name="length",
    )


def _accuracy(eval_pred) -> dict:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    return {"accuracy": float((preds == labels).mean())}


def _argmax(logits, labels):
    # Keep only the predicted class per example, not the logits of the whole eval set.
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def build(cfg: RunConfig, run_dir: Path, report: Reporter) -> tuple[StudioTrainer, StudioCallback]:
    from peft import get_peft_model

    from studio.data.prepare import build_datasets
    from studio.lora.targets import build_lora_config
    from studio.models.registry import load_model, load_tokenizer

    m = cfg.model
    set_seed(cfg.train.seed)
    report.update(phase="loading data")
    tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = build_datasets(cfg, tokenizer, world_batch=cfg.train.per_device_train_batch_size * world)
    report.update(phase="loading model")
    seq_cls = m.task == "seq_cls"
    model = load_model(m.name_or_path, m.task, num_labels=data.num_labels if seq_cls else None,
                       id2label=data.id2label if seq_cls else None, dtype=m.dtype,
                       trust_remote_code=m.trust_remote_code, quantization=m.quantization)
    # No KV cache while training: with one, transformers ignores the packed blocks' position_ids
    # for the mask and examples in one block attend to each other.
    model.config.use_cache = False
    if m.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched on by Trainer (use_reentrant False), not here a second time.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    set_seed(cfg.train.seed)  # the adapter's initial lora_A draws from this: same seed, same adapter
    parent = RunDir(run_dir).parent_adapter()
    if parent is not None:  # a continued run: its parent's final adapter, trainable (runs.continuation)
        from peft import PeftModel

        print(f"studio: continuing from {parent}", flush=True)
        model = PeftModel.from_pretrained(model, str(parent), is_trainable=True)
    else:
        model = get_peft_model(model, build_lora_config(cfg.lora, m.task))
    trainable, total = model.get_nb_trainable_parameters()
    for w in data.warnings:
        print(f"studio: warning: {w}", flush=True)
    report.update(trainable_params=int(trainable), total_params=int(total), format=data.format,
                  id2label={str(k): v for k, v in data.id2label.items()} if seq_cls and data.id2label else None,
                  train_examples=data.train_examples or len(data.train), eval_examples=data.eval_examples,
                  train_sequences=len(data.train), packed=data.packed, train_tokens=data.train_tokens,
                  warnings=list(data.warnings))
    t = cfg.train
    if t.early_stopping_patience and data.eval is None:
        raise ConfigError(f"train.early_stopping_patience {t.early_stopping_patience} needs an eval split, and "
                          f"{cfg.data.path} gave none; raise data.eval_fraction or set the patience to 0")
    cb = StudioCallback(report, world, t.metric_for_best_model)
    callbacks: list[TrainerCallback] = [cb]
    if t.early_stopping_patience:
        cb.early = EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience)
        callbacks.append(cb.early)
    trackers = tracker_setup(t.report_to, run_dir) if report.enabled else {}
    if trackers:
        report.update(trackers=trackers)
    nan_at, slow = os.environ.get(NAN_HOOK_ENV), os.environ.get(SLOW_HOOK_ENV)
    trainer = StudioTrainer(
        model=model, args=training_arguments(cfg, run_dir, data.eval is not None, data.group_by_length),
        train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator, processing_class=tokenizer,
        compute_metrics=_accuracy if seq_cls else None, preprocess_logits_for_metrics=_argmax if seq_cls else None,
        callbacks=callbacks, inject_nan_at=int(nan_at) if nan_at else None, slow_step_s=float(slow) if slow else 0.0)
    cb.trainer = trainer
    trainer.use_labelled_loss = not seq_cls
    return trainer, cb


# --- the adapter ------------------------------------------------------------------------------

def publish_adapter(run_dir: Path, write) -> Path:
    """Write the adapter into a temporary folder of the run, then rename it to adapter/."""
    final = RunDir(run_dir).adapter
    tmp = final.with_name(f".{final.name}-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # a directory cannot be renamed over a non-empty one
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def copy_checkpoint_adapter(ckpt: Path, dest: Path) -> None:
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in TRAINER_FILES and not f.name.startswith("rng_state"):
            shutil.copy2(f, dest / f.name)


def adapter_is_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def drop_partial_checkpoints(run_dir: Path) -> list[str]:
    dropped = []
    for d in RunDir(run_dir).partial_checkpoints():
        shutil.rmtree(d, ignore_errors=True)
        dropped.append(d.name)
    return dropped


# --- the run ----------------------------------------------------------------------------------

def train(run_dir: Path, resume: bool, report: Reporter) -> str:
    rd = RunDir(run_dir)
    cfg = load_config(rd.config)
    if report.enabled:
        report.update(memory=memory_status(cfg, report.guard, torch.cuda.is_available()))
    ckpt = None
    if resume:
        ckpt = rd.last_complete_checkpoint()
        if report.enabled:
            dropped = drop_partial_checkpoints(run_dir)
            if dropped:
                print(f"studio: deleted partial checkpoints {', '.join(dropped)}", flush=True)
            print(f"studio: resuming from {ckpt.name if ckpt else 'the start (no complete checkpoint)'}", flush=True)
    trainer, cb = build(cfg, run_dir, report)
    if ckpt is not None:
        report.metrics({"event": "resumed", "step": rd.checkpoint_step(ckpt), "checkpoint": ckpt.name})
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

    step = trainer.state.global_step
    state, error, adapter_step = ("diverged" if cb.diverged else "stopped" if cb.stop else "completed"), None, None
    early = (state == "completed" and cb.early is not None and step < trainer.state.max_steps
             and cb.early.early_stopping_patience_counter >= cb.early.early_stopping_patience)
    # Trainer has loaded the best checkpoint into the model (load_best_model_at_end) when there is one.
    best_ckpt = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    best_ckpt = Path(best_ckpt) if best_ckpt and rd.is_complete_checkpoint(Path(best_ckpt)) else None
    if report.enabled:
        report.update(phase="saving adapter", state="stopping" if state == "stopped" else "running")
        if state != "diverged" and not adapter_is_finite(trainer.model):
            state, error = "diverged", f"adapter weights became non-finite by step {step}"
        if state == "diverged":
            bad = trainer.bad_loss
            why = error or f"loss became {bad[1]} at step {bad[0]}"
            good = best_ckpt or rd.last_complete_checkpoint()
            if good is not None:
                publish_adapter(run_dir, lambda d: copy_checkpoint_adapter(good, d))
                adapter_step = rd.checkpoint_step(good)
                error = f"{why}; adapter/ holds {good.name}, the last good checkpoint"
            else:
                error = f"{why}; no checkpoint had been saved yet, so there is no adapter"
        else:
            def write(d: Path):
                trainer.model.save_pretrained(d)
                trainer.processing_class.save_pretrained(d)
            t0 = time.time()
            publish_adapter(run_dir, write)
            adapter_step = rd.checkpoint_step(best_ckpt) if best_ckpt is not None else step
            report.status["adapter_save_s"] = round(time.time() - t0, 3)
    if best_ckpt is not None:  # Trainer's own record of the best, the checkpoint the adapter came from
        report.status.update(best_step=rd.checkpoint_step(best_ckpt), best_metric=trainer.state.best_metric,
                             best_metric_name=trainer.args.metric_for_best_model)
    report.update(state=state, phase="done", step=step, eta_s=0.0, error=error, adapter_step=adapter_step,
                  stop_reason="early_stopping" if early else state, elapsed_s=cb._elapsed(), finished_at=time.time())
    trainer.end()
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.runs.trainer", description="Run one LoRA training run (a run folder).")
    p.add_argument("run_dir", help="run folder holding config.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()
    if not RunDir(run_dir).config.is_file():
        print(f"error: {run_dir} has no {runs.CONFIG}; create runs with `studio train CONFIG.yaml`", file=sys.stderr)
        return 2
    main_process = int(os.environ.get("RANK", "0")) == 0
    # Trainer's own summary ("Running training", example counts) into train.log, without the
    # info-level config dumps every checkpoint save would add from the rest of transformers.
    hf_logging.get_logger("transformers.trainer").setLevel(hf_logging.INFO if main_process else hf_logging.WARNING)
    hf_logging.disable_progress_bar()  # carriage-return bars only garble a log file
    datasets.disable_progress_bars()
    report = Reporter(run_dir, enabled=main_process)
    report.update(state="running", phase="starting", pid=os.getpid(), pid_started=runs.process_start_time(os.getpid()),
                  started_at=time.time(), nproc=int(os.environ.get("WORLD_SIZE", "1")), error=None, resumed=a.resume,
                  stop_reason=None)
    _Stop.raise_now = True
    try:
        report.guard = memory_guard.Guard.start(cuda=torch.cuda.is_available())
        if _Stop.requested:
            raise StopRequested("signal during start-up")
        state = train(run_dir, a.resume, report)
        if main_process:
            print(f"studio: run ended {state}", flush=True)
        return 0
    except StopRequested as e:
        report.update(state="stopped", phase="done", error=None, eta_s=None, finished_at=time.time())
        print(f"studio: stopped before training began ({e})", flush=True)
        return 0
    except KeyboardInterrupt:
        report.update(state="failed", phase="done", error="interrupted twice; ended without saving",
                      finished_at=time.time())
        return 130
    except StudioError as e:  # bad data, model reference or config: the message names it
        report.update(state="failed", phase="done", error=str(e), finished_at=time.time())
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if memory_guard.is_oom(e):
            if report.guard is not None:
                report.guard.release()  # the report and the traceback need memory too
            error = memory_guard.failure_message(report.status, e)
            report.update(state="failed", phase="done", error=error, finished_at=time.time(),
                          **memory_guard.peaks())
            traceback.print_exc()
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        traceback.print_exc()
        report.update(state="failed", phase="done", error=f"{type(e).__name__}: {e}", finished_at=time.time())
        return 1


if __name__ == "__main__":
    sys.exit(main())
