"""The run folder: every path and file name in it, the run-id rule, status and metrics files.

The one module that knows how a run folder is laid out (design.md, "Run directory"); everyone
else asks a `RunDir` for a path instead of joining names of their own:

    config.yaml    resolved config           status.json   written by the trainer (atomic)
    metrics.jsonl  one JSON object a line    train.log     the trainer's stdout and stderr
    launch.json    how and by which process the run was started
    stop.request   present once a stop was asked for; the trainer ends the current step
    checkpoints/   Trainer checkpoints; complete ones hold COMPLETE_MARKER
    adapter/       the final PEFT adapter     merged/       the merged model (studio merge)
    exports/       zips offered for download  eval/         evaluation results, NAME.json

status.json keys: state, step, max_steps, pid, pid_started (process start time, so a reused pid
is not mistaken for the trainer), created_at / started_at / updated_at / finished_at (unix
seconds), eta_s, elapsed_s (training time over all attempts), error, phase (starting, loading
data, loading model, training, saving adapter, done), nproc, resumed, last_loss, eval_loss,
eval_accuracy (classification), adapter_step (the step adapter/ holds), parent (a continued run:
{run, dir, step, adapter_step} of the completed run whose final adapter it starts from), and once the data is
ready: trainable_params, total_params, format, train_examples, eval_examples, train_sequences
(packed blocks when packed), packed, train_tokens, warnings, id2label (classification: the
class names by id, as the trainer numbered them). Measured while training, for a stop to know
how long the step in progress and the save take: step_s (the slowest of the recent optimizer
steps), save_s (the last checkpoint save), eval_s (the last evaluation), adapter_save_s (the
final adapter save). Memory: peak_rss_mb (and peak_gpu_mb on a GPU), the trainer's peaks so far,
and memory = {limit_bytes, limit_source, mechanism, estimate_bytes, advice, cgroup_events,
cgroup_oom_kill} (studio.runs.memory_guard). `RunDir.status()` adds alive, id, dir.

metrics.jsonl rows: training logs {step, epoch, loss, learning_rate, grad_norm, tokens (non-
padding tokens since the previous row), tokens_per_s, peak_rss_mb, peak_gpu_mb (GPU), elapsed_s}; evaluations {step, epoch,
eval_loss, eval_accuracy, elapsed_s}; the last row {train_loss, train_runtime}; a diverged step
has loss null and diverged true; a resume adds {event: "resumed", step, checkpoint} (rows logged
before it with a larger step were lost with the crash and come again after it).

Nothing here imports torch, so listing runs stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

import psutil

from studio.errors import RunError
from studio.adapters import names as adapter_names
from studio.runs.memory_guard import killed_for_memory

STATES = ("queued", "running", "stopping", "stopped", "completed", "failed", "diverged")
ACTIVE_STATES = ("queued", "running", "stopping")
FINAL_STATES = ("stopped", "completed", "failed", "diverged")

CONFIG, STATUS, METRICS, LOG = "config.yaml", "status.json", "metrics.jsonl", "train.log"
LAUNCH, STOP_REQUEST = "launch.json", "stop.request"
CHECKPOINTS, ADAPTER, MERGED, EXPORTS, EVAL = "checkpoints", "adapter", "merged", "exports", "eval"
TRACKERS = "trackers"  # what experiment trackers (train.report_to) write, one folder each
PARENT = "parent"  # status.json key of a run that continues another (RunDir.continuation)
CHECKPOINT_PREFIX = "checkpoint-"
# Written into a checkpoint folder by the trainer after Trainer has finished every file of it
# (on every process), so a folder without it is a partial write from a killed process.
COMPLETE_MARKER = "studio-complete.json"
LOG_TAIL_LINES = 20
MAX_RUN_ID = 255  # the longest file name common file systems allow


# --- the run-id rule ------------------------------------------------------------------------

def is_run_id(name) -> bool:
    """Whether `name` can name a run: a plain folder name directly in the runs folder.

    No separators or NUL, not `.` or `..`, 1 to 255 characters. Anything in the runs folder can
    be a run (a copy made by hand too), so nothing stricter is asked; ids come from browsers and
    command lines, and this is what keeps them inside the runs folder.
    """
    return (isinstance(name, str) and 0 < len(name) <= MAX_RUN_ID and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def check_run_id(name) -> str:
    """`name` if it is a run id (is_run_id), else RunError naming it and the rule."""
    if not is_run_id(name):
        shown = repr(name[:80]) if isinstance(name, str) else repr(name)
        raise RunError(f"run id {shown} may only hold the characters of a plain folder name: no '/', '\\' or NUL, "
                       f"not '.' or '..', 1 to {MAX_RUN_ID} characters")
    return name


# --- JSON files -----------------------------------------------------------------------------

def write_json_atomic(path: Path, obj: dict) -> None:
    """Readers never see half a file: write a unique temporary name, then rename over."""
    path = Path(path)
    # pid + thread id in the name: two writers (the trainer, a UI thread) never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(finite_json(obj), indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def finite_json(obj):
    """NaN/inf become null: strict JSON readers (browsers) reject them."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


# --- processes ------------------------------------------------------------------------------

def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# How long a status read trusts what it last learned about a process. Each check reads
# /proc/PID/stat, for which the kernel adds up the CPU time of every thread of the trainer; every
# open tab reads the status once a second, and 40 such checks a second slowed a trainer on both
# cores of a 2-core machine by 7% (0.9% without them, bench/ui_load.py). Remembered for a second,
# it is one check a second whatever the number of tabs; a crash still shows within about a second.
ALIVE_TTL_S = 1.0
_alive_lock = threading.Lock()
_alive_seen: dict[tuple, tuple[float, bool]] = {}


def process_alive(pid: int | None, started: float | None, max_age_s: float = 0.0) -> bool:
    """Whether `pid` is still the process that started at `started` (guards against pid reuse).
    With `max_age_s`, an answer found within that many seconds is reused; a fresh answer (0)
    replaces the remembered one, so a process just killed does not look alive for another second."""
    if not pid:
        return False
    key, now = (pid, started), time.monotonic()
    with _alive_lock:
        hit = _alive_seen.get(key)
    if max_age_s > 0 and hit is not None and now - hit[0] < max_age_s:
        return hit[1]
    alive = _process_alive(pid, started)
    with _alive_lock:
        if len(_alive_seen) > 256:
            _alive_seen.clear()
        _alive_seen[key] = (now, alive)
    return alive


def _process_alive(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is None:  # no start time recorded: fall back to the command line
            return "studio" in " ".join(proc.cmdline())
        return abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


# --- the folder -----------------------------------------------------------------------------

class RunDir:
    """One run folder: its paths, its status and metrics files, its checkpoints and class names."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, root: str | os.PathLike, run_id: str) -> RunDir:
        """The run `run_id` of the runs folder `root`; RunError when `run_id` is not a run id."""
        return cls(Path(root) / check_run_id(run_id))

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def id(self) -> str:
        return self.path.name

    # paths
    config = property(lambda self: self.path / CONFIG)
    status_file = property(lambda self: self.path / STATUS)
    metrics = property(lambda self: self.path / METRICS)
    log = property(lambda self: self.path / LOG)
    launch = property(lambda self: self.path / LAUNCH)
    stop_request = property(lambda self: self.path / STOP_REQUEST)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    adapter = property(lambda self: self.path / ADAPTER)
    merged = property(lambda self: self.path / MERGED)
    exports = property(lambda self: self.path / EXPORTS)
    eval_dir = property(lambda self: self.path / EVAL)
    trackers = property(lambda self: self.path / TRACKERS)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{int(step)}"

    @property
    def adapter_zip(self) -> Path:
        return self.exports / f"{self.id}-adapter.zip"

    @property
    def merged_zip(self) -> Path:
        return self.exports / f"{self.id}-merged.zip"

    def eval_file(self, name: str) -> Path:
        """eval/NAME.json; `name` follows the run-id rule (it comes from users)."""
        try:
            check_run_id(name)
        except RunError:
            raise RunError(f"evaluation name {name!r} must be a plain file name") from None
        return self.eval_dir / f"{name}.json"

    def eval_files(self) -> list[Path]:
        return sorted(self.eval_dir.glob("*.json")) if self.eval_dir.is_dir() else []

    def exists(self) -> bool:
        """Whether this is a run folder: it holds a config or a status."""
        return self.config.is_file() or self.status_file.is_file()

    # status
    def read_status_file(self) -> dict | None:
        """status.json as written, or None when it is missing or unreadable."""
        return read_json(self.status_file)

    def write_status(self, status: dict) -> None:
        write_json_atomic(self.status_file, status)

    def update_status(self, **fields) -> dict:
        """Read, change and write status.json back (for writers other than the trainer)."""
        status = {**(self.read_status_file() or {}), **fields}
        self.write_status(status)
        return status

    def read_launch(self) -> dict:
        return read_json(self.launch) or {}

    def write_launch(self, info: dict) -> None:
        write_json_atomic(self.launch, info)

    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def request_stop(self) -> None:
        self.stop_request.write_text(json.dumps({"requested_at": time.time()}))

    def clear_stop_request(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.stop_request.unlink()

    def status(self, max_age_s: float = ALIVE_TTL_S) -> dict:
        """status.json as plain data, corrected by what the processes say.

        A run in an active state whose processes are gone is reported `failed` with "out of memory
        at step N" when the kernel or its cgroup killed it for memory (memory_guard), else the tail of
        train.log as its error (or `stopped` when a stop had been asked for). A requested stop
        shows as `stopping` at once, before the trainer reaches the end of its step. Never writes.
        `max_age_s`: how old a remembered answer about the processes may be (0: ask them now).
        """
        status = self.read_status_file() or {"state": "queued", "step": 0}
        status.setdefault("error", None)
        launch = self.read_launch()
        alive = (process_alive(status.get("pid"), status.get("pid_started"), max_age_s)
                 or process_alive(launch.get("pid"), launch.get("pid_started"), max_age_s))
        stop_asked = self.stop_requested()
        if status.get("state") in ACTIVE_STATES:
            if alive:
                if stop_asked:
                    status["state"] = "stopping"
            elif stop_asked:
                status["state"] = "stopped"
            elif launch or status.get("pid"):  # it was started: a dead process without a final state crashed
                status["state"] = "failed"
                status["error"] = status.get("error") or killed_for_memory(
                    {**status, "pid": status.get("pid") or launch.get("pid")}) or (
                    "the trainer process ended without writing a final state; last lines of train.log:\n"
                    + (self.log_tail() or "(train.log is empty)"))
        status["alive"] = alive
        status["id"] = self.id
        status["dir"] = str(self.path)
        return status

    def parent(self) -> dict | None:
        """status.json `parent` of a continued run ({run, dir, step, adapter_step}), else None."""
        p = (self.read_status_file() or {}).get(PARENT)
        return p if isinstance(p, dict) and p.get("dir") else None

    def parent_adapter(self) -> Path | None:
        """The adapter a continued run starts from (its parent's adapter/), None for a run that is not
        one; RunError when the parent's adapter is gone."""
        p = self.parent()
        if p is None:
            return None
        adapter = RunDir(p["dir"]).adapter
        if not (adapter / adapter_names.WEIGHTS_NAME).is_file():
            raise RunError(f"run {self.id} continues run {p.get('run')}, whose adapter {adapter} is gone; "
                           "it cannot start without it")
        return adapter

    def continuation(self, steps) -> dict:
        """status.json `parent` for a new run that continues this one for `steps` more steps; RunError
        unless this run is completed with its final adapter and `steps` is a whole number >= 1."""
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise RunError(f"steps to continue for must be a whole number >= 1, got {steps!r}")
        if not self.config.is_file():
            raise RunError(f"{self.path} is not a run folder (no {CONFIG})")
        st = self.status()
        if st["state"] != "completed":
            hint = (f"resume it instead: studio train --resume {self.path}" if st["state"] in FINAL_STATES
                    else "wait until it completes")
            raise RunError(f"run {self.id} is {st['state']} (step {st.get('step') or 0} of {st.get('max_steps')}); "
                           f"only a completed run can be continued; {hint}")
        if not (self.adapter / adapter_names.WEIGHTS_NAME).is_file():
            raise RunError(f"run {self.id} is completed but has no {ADAPTER}/{adapter_names.WEIGHTS_NAME} "
                           "to continue from")
        return {"run": self.id, "dir": str(self.path.resolve()), "step": st.get("step"),
                "adapter_step": st.get("adapter_step", st.get("step"))}

    def id2label(self) -> dict[int, str] | None:
        """The class names by id of a classification run, as the trainer recorded them in status.json."""
        raw = (self.read_status_file() or {}).get("id2label")
        if not isinstance(raw, dict) or not raw:
            return None
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            return None

    # metrics and log
    def read_metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        """New complete lines of metrics.jsonl from byte `offset`, and the offset to pass next time.

        A partial last line (the trainer is mid-write) is left for the next call. The file is
        append-only; if it is shorter than `offset` it was recreated and is read from the start.
        """
        try:
            with open(self.metrics, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() < offset:
                    offset = 0
                f.seek(offset)
                chunk = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return [], offset
        end = chunk.rfind(b"\n")
        if end < 0:
            return [], offset
        rows = []
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn line can only come from a crash mid-write; the next lines are whole
            if isinstance(row, dict):
                rows.append(row)
        return rows, offset + end + 1

    def open_metrics(self):
        """metrics.jsonl opened for appending (the trainer's one writer)."""
        return open(self.metrics, "a", encoding="utf-8")

    def log_tail(self, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                text = f.read().decode("utf-8", "replace")
        except (FileNotFoundError, NotADirectoryError):
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # checkpoints
    def checkpoint_folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint folder, complete or not, by step."""
        found = []
        for d in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):
            m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def is_complete_checkpoint(self, folder: Path) -> bool:
        return all((Path(folder) / f).is_file()
                   for f in (COMPLETE_MARKER, "trainer_state.json", adapter_names.WEIGHTS_NAME))

    def last_complete_checkpoint(self) -> Path | None:
        """The newest checkpoint with its marker, trainer_state.json and adapter weights; partial ones are skipped."""
        done = [d for _, d in self.checkpoint_folders() if self.is_complete_checkpoint(d)]
        return done[-1] if done else None

    def partial_checkpoints(self) -> list[Path]:
        """Checkpoint folders without the completion marker: what a process killed mid-save left."""
        return [d for _, d in self.checkpoint_folders() if not (d / COMPLETE_MARKER).is_file()]

    def mark_checkpoint_complete(self, step: int) -> None:
        write_json_atomic(self.checkpoint(step) / COMPLETE_MARKER, {"step": int(step), "saved_at": time.time()})

    @staticmethod
    def checkpoint_step(folder: Path) -> int:
        return int(Path(folder).name[len(CHECKPOINT_PREFIX):])
