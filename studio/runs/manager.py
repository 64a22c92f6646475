"""The runs folder: create, start, stop, resume, watch and list training runs.

Plain Python used by the CLI and the UI alike; nothing here prints or imports torch, so listing
runs stays fast. The run directory is the single source of truth (layout in design.md):

    config.yaml    resolved config           status.json   written by the trainer (atomic)
    metrics.jsonl  one JSON object a line    train.log     the trainer's stdout and stderr
    launch.json    how and by which process the run was started (written here)
    stop.request   present once a stop was asked for; the trainer ends the current step
    checkpoints/   Trainer checkpoints; complete ones hold COMPLETE_MARKER
    adapter/       the final PEFT adapter

status.json keys: state, step, max_steps, pid, pid_started (process start time, so a reused pid
is not mistaken for the trainer), created_at / started_at / updated_at / finished_at (unix
seconds), eta_s, elapsed_s (training time over all attempts), error, phase (starting, loading
data, loading model, training, saving adapter, done), nproc, resumed, last_loss, eval_loss,
eval_accuracy (classification), adapter_step (the step adapter/ holds), and once the data is
ready: trainable_params, total_params, format, train_examples, eval_examples, train_sequences
(packed blocks when packed), packed, train_tokens, warnings. read_status adds alive, id, dir.

metrics.jsonl rows: training logs {step, epoch, loss, learning_rate, grad_norm, tokens (non-
padding tokens since the previous row), tokens_per_s, elapsed_s}; evaluations {step, epoch,
eval_loss, eval_accuracy, elapsed_s}; the last row {train_loss, train_runtime}; a diverged step
has loss null and diverged true; a resume adds {event: "resumed", step, checkpoint} (rows logged
before it with a larger step were lost with the crash and come again after it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from studio.config import RunConfig, load_config
from studio.errors import ConfigError, RunError

STATES = ("queued", "running", "stopping", "stopped", "completed", "failed", "diverged")
ACTIVE_STATES = ("queued", "running", "stopping")
FINAL_STATES = ("stopped", "completed", "failed", "diverged")

CONFIG, STATUS, METRICS, LOG = "config.yaml", "status.json", "metrics.jsonl", "train.log"
LAUNCH, STOP_REQUEST = "launch.json", "stop.request"
CHECKPOINTS, ADAPTER = "checkpoints", "adapter"
# Written into a checkpoint folder by the trainer after Trainer has finished every file of it
# (on every process), so a folder without it is a partial write from a killed process.
COMPLETE_MARKER = "studio-complete.json"
LOG_TAIL_LINES = 20



# --- files --------------------------------------------------------------------------------

def runs_dir(path: str | os.PathLike | None = None) -> Path:
    """The runs folder: `path`, else $STUDIO_RUNS_DIR, else ./runs."""
    return _root(path)


def _root(path) -> Path:
    # The API's parameters are named runs_dir, which hides the function above inside them.
    return Path(path or os.environ.get("STUDIO_RUNS_DIR") or "runs")


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
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
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


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# How long read_status trusts what it last learned about a process. Each check reads
# /proc/PID/stat, for which the kernel adds up the CPU time of every thread of the trainer; every
# open tab reads the status once a second, and 40 such checks a second slowed a trainer on both
# cores of a 2-core machine by 7% (0.9% without them, bench/ui_load.py). Remembered for a second,
# it is one check a second whatever the number of tabs; a crash still shows within about a second.
ALIVE_TTL_S = 1.0
_alive_lock = threading.Lock()
_alive_seen: dict[tuple, tuple[float, bool]] = {}


def process_alive(pid: int | None, started: float | None, max_age_s: float = 0.0) -> bool:
    """Whether `pid` is still the process that started at `started` (guards against pid reuse).
    With `max_age_s`, an answer found within that many seconds is reused."""
    if not pid:
        return False
    if max_age_s <= 0:
        return _process_alive(pid, started)
    key, now = (pid, started), time.monotonic()
    with _alive_lock:
        hit = _alive_seen.get(key)
    if hit is not None and now - hit[0] < max_age_s:
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


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    try:
        with open(Path(run_dir) / LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- reading ------------------------------------------------------------------------------

def read_status(run_dir: str | os.PathLike) -> dict:
    """status.json as plain data, corrected by what the processes say.

    A run in an active state whose processes are gone is reported `failed` with the tail of
    train.log as its error (or `stopped` when a stop had been asked for). A requested stop
    shows as `stopping` at once, before the trainer reaches the end of its step. Never writes.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / STATUS) or {"state": "queued", "step": 0}
    status.setdefault("error", None)
    launch = read_json(run_dir / LAUNCH) or {}
    alive = (process_alive(status.get("pid"), status.get("pid_started"), ALIVE_TTL_S)
             or process_alive(launch.get("pid"), launch.get("pid_started"), ALIVE_TTL_S))
    stop_asked = (run_dir / STOP_REQUEST).exists()
    state = status.get("state")
    if state in ACTIVE_STATES:
        if alive:
            if stop_asked:
                status["state"] = "stopping"
        elif stop_asked:
            status["state"] = "stopped"
        elif launch or status.get("pid"):  # it was started: a dead process without a final state crashed
            status["state"] = "failed"
            status["error"] = status.get("error") or (
                "the trainer process ended without writing a final state; last lines of train.log:\n"
                + (log_tail(run_dir) or "(train.log is empty)"))
    status["alive"] = alive
    status["id"] = run_dir.name
    status["dir"] = str(run_dir)
    return status


def read_metrics(run_dir: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """New complete lines of metrics.jsonl from byte `offset`, and the offset to pass next time.

    A partial last line (the trainer is mid-write) is left for the next call. The file is
    append-only; if it is shorter than `offset` it was recreated and is read from the start.
    """
    path = Path(run_dir) / METRICS
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
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


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every run in the folder, newest first, with its state and the config facts a table shows."""
    root = _root(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not d.is_dir() or not ((d / CONFIG).exists() or (d / STATUS).exists()):
            continue
        st = read_status(d)
        try:
            cfg = load_config(d / CONFIG).to_dict()
        except ConfigError:
            cfg = {}
        model, lora = cfg.get("model", {}), cfg.get("lora", {})
        out.append({
            "id": d.name, "dir": str(d), "state": st.get("state"), "step": st.get("step", 0),
            "max_steps": st.get("max_steps"), "last_loss": st.get("last_loss"), "eval_loss": st.get("eval_loss"),
            "error": st.get("error"), "created": st.get("created_at"), "duration_s": st.get("elapsed_s"),
            "model": model.get("name_or_path"), "task": model.get("task"), "r": lora.get("r"),
            "lora_alpha": lora.get("lora_alpha"), "target_modules": lora.get("target_modules"),
            "trainable_params": st.get("trainable_params"),
        })
    out.sort(key=lambda r: (r["created"] or 0, r["id"]), reverse=True)
    return out


def active_run(runs_dir: str | os.PathLike | None = None) -> Path | None:
    """The run of this folder whose trainer is alive (queued, running or stopping), if any."""
    root = _root(runs_dir)
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir(), reverse=True):
        if d.is_dir() and (d / STATUS).exists():
            st = read_status(d)
            if st["state"] in ACTIVE_STATES and st["alive"]:
                return d
    return None


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint with its marker, trainer_state.json and adapter weights; partial ones are skipped."""
    found = []
    for d in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in
                                    (COMPLETE_MARKER, "trainer_state.json", "adapter_model.safetensors")):
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


# --- starting and stopping ----------------------------------------------------------------

def make_run_id(cfg: RunConfig, when: float | None = None) -> str:
    name = Path(str(cfg.model.name_or_path).rstrip("/")).name.lower()
    slug = re.sub(r"[^a-z0-9.]+", "-", name).strip("-")[:40] or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{slug}-r{cfg.lora.r}"


def create_run(cfg: RunConfig, runs_dir: str | os.PathLike | None = None, run_id: str | None = None) -> Path:
    """A new run folder with config.yaml and a `queued` status; nothing is started."""
    cfg.validate()
    root = _root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = run_id or make_run_id(cfg)
    if run_id is not None and (not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id in (".", "..")):
        raise RunError(f"run id {run_id!r} may only hold letters, digits, '.', '_' and '-'")
    for n in range(1, 1000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()  # atomic: two callers never get the same folder
            break
        except FileExistsError:
            if run_id is not None:
                raise RunError(f"run {run_dir} already exists; pick another run id") from None
    else:
        raise RunError(f"could not find a free run id for {base} in {root}")
    try:
        cfg.save(run_dir / CONFIG)
        write_json_atomic(run_dir / STATUS, {"state": "queued", "step": 0, "max_steps": cfg.train.max_steps,
                                             "pid": None, "created_at": time.time(), "error": None})
    except BaseException:  # a full disk, Ctrl-C: no folder without its config and status is left behind
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def start_run(cfg: RunConfig, runs_dir: str | os.PathLike | None = None, nproc: int = 1,
              accelerate_config: str | os.PathLike | None = None, run_id: str | None = None) -> Path:
    """Create a run and start its trainer as a detached process; returns the run folder.

    Refuses while another run of the same runs folder is active: two trainers would fight
    over the CPU or GPU and both would crawl.
    """
    _check_launch_args(nproc, accelerate_config)
    root = _root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root):
        _refuse_if_active(root)
        run_dir = create_run(cfg, root, run_id)
        _spawn(run_dir, resume=False, nproc=nproc, accelerate_config=accelerate_config)
    return run_dir


def resume_run(run_dir: str | os.PathLike) -> Path:
    """Start the trainer again on a stopped, failed or diverged run, from its last complete checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG})")
    with _folder_lock(run_dir.parent):
        st = read_status(run_dir)
        if st["state"] in ACTIVE_STATES and st["alive"]:
            raise RunError(f"run {run_dir.name} is {st['state']}; stop it before resuming")
        if st["state"] == "completed":
            raise RunError(f"run {run_dir.name} is completed ({st.get('step')} of {st.get('max_steps')} steps); "
                           "nothing to resume")
        _refuse_if_active(run_dir.parent)
        launch = read_json(run_dir / LAUNCH) or {}
        with contextlib.suppress(FileNotFoundError):
            (run_dir / STOP_REQUEST).unlink()
        prev = read_json(run_dir / STATUS) or {}
        write_json_atomic(run_dir / STATUS, {**prev, "state": "queued", "pid": None, "pid_started": None,
                                             "error": None, "eta_s": None, "updated_at": time.time()})
        _spawn(run_dir, resume=True, nproc=int(launch.get("nproc") or 1),
               accelerate_config=launch.get("accelerate_config"), cwd=launch.get("cwd"))
    return run_dir


def stop_run(run_dir: str | os.PathLike, timeout: float | None = None) -> dict:
    """Ask the trainer to stop: it ends the current step, saves a checkpoint and the adapter, ends `stopped`.

    Safe to repeat; a run that is not active is left as it is. With `timeout`, waits that many
    seconds for a final state, then kills the process group and marks the run `failed`.
    Returns the status after the request (or after the wait).
    """
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if st["state"] not in ACTIVE_STATES or not st["alive"]:
        return st
    (run_dir / STOP_REQUEST).write_text(json.dumps({"requested_at": time.time()}))
    _signal_run(run_dir, signal.SIGTERM)
    if timeout is None:
        return read_status(run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = read_status(run_dir)
        if not st["alive"] and st["state"] in FINAL_STATES:
            return st
        time.sleep(0.2)
    _signal_run(run_dir, signal.SIGKILL)
    time.sleep(0.2)
    prev = read_json(run_dir / STATUS) or {}
    if prev.get("state") not in FINAL_STATES:
        write_json_atomic(run_dir / STATUS, {**prev, "state": "failed", "updated_at": time.time(),
                                             "error": f"did not stop within {timeout:g} s of SIGTERM; killed"})
    return read_status(run_dir)


def delete_run(run_dir: str | os.PathLike) -> None:
    """Remove a run folder; refuses while its trainer is alive."""
    run_dir = Path(run_dir)
    if not ((run_dir / CONFIG).exists() or (run_dir / STATUS).exists()):
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG} or {STATUS}); not deleting it")
    st = read_status(run_dir)
    if st["state"] in ACTIVE_STATES and st["alive"]:
        raise RunError(f"run {run_dir.name} is {st['state']}; stop it before deleting")
    shutil.rmtree(run_dir)


def follow(run_dir: str | os.PathLike, on_update: Callable[[dict, list[dict]], None], poll_s: float = 0.5,
           stop_when_final: bool = True) -> dict:
    """Call `on_update(status, new_metric_rows)` every `poll_s` seconds until the run is final."""
    offset = 0
    while True:
        st = read_status(run_dir)
        rows, offset = read_metrics(run_dir, offset)
        on_update(st, rows)
        if stop_when_final and st["state"] in FINAL_STATES and not st["alive"]:
            rows, offset = read_metrics(run_dir, offset)
            if rows:
                on_update(st, rows)
            return st
        time.sleep(poll_s)


def trainer_command(run_dir: Path, resume: bool = False, nproc: int = 1,
                    accelerate_config: str | os.PathLike | None = None) -> list[str]:
    """The command line that runs the trainer; under `accelerate launch` for several processes."""
    target = ["-m", "studio.runs.trainer", str(run_dir)] + (["--resume"] if resume else [])
    if nproc == 1 and accelerate_config is None:
        return [sys.executable, *target]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]  # the file decides the backend, port and machines
        if nproc > 1:
            cmd += ["--num_processes", str(nproc)]
    else:
        # torchrun-style DDP; on a machine without GPUs each process uses the CPU and gloo.
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return cmd + target


def _check_launch_args(nproc, accelerate_config) -> None:
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise RunError(f"nproc must be an integer >= 1, got {nproc!r}")
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise RunError(f"accelerate config {accelerate_config} does not exist")


def _spawn(run_dir: Path, resume: bool, nproc: int, accelerate_config, cwd: str | None = None) -> None:
    run_dir = run_dir.resolve()
    cmd = trainer_command(run_dir, resume, nproc, None if accelerate_config is None else Path(accelerate_config).resolve())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cwd = cwd if cwd and Path(cwd).is_dir() else os.getcwd()
    with open(run_dir / LOG, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        # A new session: the trainer outlives the UI or terminal, and stop signals its whole group.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)
    write_json_atomic(run_dir / LAUNCH, {"pid": proc.pid, "pid_started": process_start_time(proc.pid),
                                         "cmd": cmd, "cwd": cwd, "nproc": nproc, "resume": resume,
                                         "accelerate_config": None if accelerate_config is None else str(accelerate_config),
                                         "launched_at": time.time()})
    # Reap the child when it exits so a long-lived UI does not collect zombies.
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def _signal_run(run_dir: Path, sig: int) -> None:
    st = read_json(run_dir / STATUS) or {}
    launch = read_json(run_dir / LAUNCH) or {}
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if process_alive(launch.get("pid"), launch.get("pid_started")):
            launcher = int(launch["pid"])
            workers = psutil.Process(launcher).children(recursive=True)
            if sig == signal.SIGTERM and workers and "accelerate.commands.launch" in launch.get("cmd", []):
                # Stop the workers only: they agree on a step, save and exit 0, and the launcher then
                # ends cleanly. A signalled launcher would kill them after its own grace period.
                for w in workers:
                    w.send_signal(sig)
                return
            # The launcher leads its own session: the group holds it and every worker it started.
            os.killpg(launcher, sig)
        elif process_alive(st.get("pid"), st.get("pid_started")):
            # A trainer started by hand (python -m studio.runs.trainer) lives in its terminal's group: only it.
            os.kill(int(st["pid"]), sig)


def _refuse_if_active(root: Path) -> None:
    active = active_run(root)
    if active is not None:
        st = read_status(active)
        raise RunError(f"run {active.name} in {root} is {st['state']} (step {st.get('step', 0)} of "
                       f"{st.get('max_steps')}); stop it first (studio stop {active}) or use another runs folder")


@contextlib.contextmanager
def _folder_lock(root: Path):
    """Serializes check-then-start, so two clicks on Start cannot both pass the active-run check."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the check is still made, just not serialized
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    # Port 29500 (accelerate's default) may be held by another job; ask the OS for a free one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
