"""The runs folder: create, start, stop, resume, watch and list training runs.

Plain Python used by the CLI and the UI alike; nothing here prints or imports torch, so listing
runs stays fast. The run folder's layout, its status and metrics files and the run-id rule
belong to studio.runs.rundir (RunDir); the functions here that read a run are thin users of it.

Stopping is graceful: stop_run asks the trainer to end the step in progress, save a checkpoint
of it and the adapter. How long that takes comes from the run's own measured step, evaluation
and save times (status.json step_s, eval_s, save_s; see stop_estimate); the process is killed
only when the caller asks for it (kill=True, or an explicit timeout).
"""

from __future__ import annotations

import contextlib
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
from studio.runs.rundir import (  # noqa: F401  (the runs API re-exports these names)
    ACTIVE_STATES,
    ADAPTER,
    ALIVE_TTL_S,
    CHECKPOINTS,
    COMPLETE_MARKER,
    CONFIG,
    EVAL,
    EXPORTS,
    FINAL_STATES,
    LAUNCH,
    LOG,
    LOG_TAIL_LINES,
    MERGED,
    METRICS,
    STATES,
    STATUS,
    STOP_REQUEST,
    RunDir,
    check_run_id,
    finite_json,
    is_run_id,
    process_alive,
    process_start_time,
    read_json,
    write_json_atomic,
)


# --- files --------------------------------------------------------------------------------

def runs_dir(path: str | os.PathLike | None = None) -> Path:
    """The runs folder: `path`, else $STUDIO_RUNS_DIR, else ./runs."""
    return _root(path)


def _root(path) -> Path:
    # The API's parameters are named runs_dir, which hides the function above inside them.
    return Path(path or os.environ.get("STUDIO_RUNS_DIR") or "runs")


def log_tail(run_dir: str | os.PathLike, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    return RunDir(run_dir).log_tail(lines, max_bytes)


# --- reading ------------------------------------------------------------------------------

def read_status(run_dir: str | os.PathLike) -> dict:
    """status.json corrected by what the processes say (RunDir.status); never writes."""
    return RunDir(run_dir).status()


def read_metrics(run_dir: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """New complete lines of metrics.jsonl from byte `offset`, and the next offset (RunDir.read_metrics)."""
    return RunDir(run_dir).read_metrics(offset)


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every run in the folder, newest first, with its state and the config facts a table shows."""
    root = _root(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        rd = RunDir(d)
        if not d.is_dir() or not is_run_id(d.name) or not rd.exists():
            continue
        st = rd.status()
        try:
            cfg = load_config(rd.config).to_dict()
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
        if d.is_dir() and RunDir(d).status_file.exists():
            st = RunDir(d).status()
            if st["state"] in ACTIVE_STATES and st["alive"]:
                return d
    return None


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint with its marker, trainer_state.json and adapter weights; partial ones are skipped."""
    return RunDir(run_dir).last_complete_checkpoint()


# --- starting and stopping ----------------------------------------------------------------

def make_run_id(cfg: RunConfig, when: float | None = None) -> str:
    name = Path(str(cfg.model.name_or_path).rstrip("/")).name.lower()
    slug = re.sub(r"[^a-z0-9.]+", "-", name).strip("-")[:40] or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{slug}-r{cfg.lora.r}"


def create_run(cfg: RunConfig, runs_dir: str | os.PathLike | None = None, run_id: str | None = None,
               extra_status: dict | None = None) -> Path:
    """A new run folder with config.yaml and a `queued` status (plus `extra_status`); nothing is started."""
    cfg.validate()
    root = _root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = run_id or make_run_id(cfg)
    if run_id is not None:
        check_run_id(run_id)
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
    rd = RunDir(run_dir)
    try:
        cfg.save(rd.config)
        rd.write_status({"state": "queued", "step": 0, "max_steps": cfg.train.max_steps, "pid": None,
                         "created_at": time.time(), "error": None, **(extra_status or {})})
    except BaseException:  # a full disk, Ctrl-C: no folder without its config and status is left behind
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def start_run(cfg: RunConfig, runs_dir: str | os.PathLike | None = None, nproc: int = 1,
              accelerate_config: str | os.PathLike | None = None, run_id: str | None = None,
              extra_status: dict | None = None) -> Path:
    """Create a run and start its trainer as a detached process; returns the run folder.

    Refuses while another run of the same runs folder is active: two trainers would fight
    over the CPU or GPU and both would crawl.
    """
    _check_launch_args(nproc, accelerate_config)
    root = _root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root):
        _refuse_if_active(root)
        run_dir = create_run(cfg, root, run_id, extra_status)
        _spawn(run_dir, resume=False, nproc=nproc, accelerate_config=accelerate_config)
    return run_dir


def continuation(parent_dir: str | os.PathLike, steps) -> tuple[RunConfig, dict]:
    """(config, status fields) of a new run that trains the completed run `parent_dir` for `steps`
    more steps: the parent's config with train.max_steps = steps, and status.json `parent`.

    The new run starts from the parent's final adapter (the trainer loads it with PEFT, trainable)
    with a fresh optimizer and a learning-rate schedule of its own over the new steps: the parent's
    schedule has ended (cosine and linear reach 0 there), its last checkpoint is often not at the
    final step (save_steps need not divide max_steps) or is the best one rather than the last, and
    AdamW's bias correction makes fresh moments safe from the first step. RunError names what is
    wrong: not completed, no adapter, steps not a whole number >= 1."""
    import dataclasses

    rd = RunDir(Path(parent_dir))
    record = rd.continuation(steps)
    cfg = load_config(rd.config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=int(steps)))
    return cfg.validate(), {"parent": record}


def resume_run(run_dir: str | os.PathLike) -> Path:
    """Start the trainer again on a stopped, failed or diverged run, from its last complete checkpoint."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG})")
    with _folder_lock(run_dir.parent):
        st = rd.status()
        if st["state"] in ACTIVE_STATES and st["alive"]:
            raise RunError(f"run {run_dir.name} is {st['state']}; stop it before resuming")
        if st["state"] == "completed":
            raise RunError(f"run {run_dir.name} is completed ({st.get('step')} of {st.get('max_steps')} steps); "
                           "nothing to resume")
        _refuse_if_active(run_dir.parent)
        launch = rd.read_launch()
        rd.clear_stop_request()
        rd.update_status(state="queued", pid=None, pid_started=None, error=None, eta_s=None, updated_at=time.time())
        _spawn(run_dir, resume=True, nproc=int(launch.get("nproc") or 1),
               accelerate_config=launch.get("accelerate_config"), cwd=launch.get("cwd"))
    return run_dir


# A stop asked before the first step is measured (loading the model or data, or still queued):
# the trainer leaves at once, as soon as the library call in progress returns to Python.
STOP_STARTUP_S = 15.0
# Exit after the adapter is written: trainer.end(), interpreter shutdown, the launcher's exit.
STOP_EXIT_S = 5.0
# Checkpoint writes not measured yet, guessed from their size (adapter + two Adam moments, float32).
GUESS_WRITE_MB_S, GUESS_WRITE_FIXED_S = 50.0, 2.0


def stop_estimate(status: dict) -> dict:
    """How long a graceful stop takes from now, at most, judged from the run's own measured times.

    The trainer ends the optimizer step in progress (or an evaluation in progress and then one
    step), saves a checkpoint of that step, writes the adapter and exits. status.json carries what
    it measured (step_s, eval_s, save_s, adapter_save_s); a save not measured yet is guessed from
    the trainable parameter count. Returns {"expected_s", "step_s", "eval_s", "save_s",
    "adapter_save_s", "measured"} (measured: whether the step time is the run's own).
    """
    phase, trainable = status.get("phase"), status.get("trainable_params") or 0
    guess = GUESS_WRITE_FIXED_S + trainable * 4 * 3 / 1e6 / GUESS_WRITE_MB_S
    step_s, eval_s = _seconds(status.get("step_s")), _seconds(status.get("eval_s")) or 0.0
    save_s = _seconds(status.get("save_s")) or guess
    adapter_s = _seconds(status.get("adapter_save_s")) or min(save_s, guess)
    if phase == "saving adapter":
        expected = adapter_s + STOP_EXIT_S
    elif phase != "training":  # queued, starting, loading: nothing to save yet
        expected = STOP_STARTUP_S
    else:  # a first step not measured yet counts as long as a start-up
        expected = eval_s + (STOP_STARTUP_S if step_s is None else step_s) + save_s + adapter_s + STOP_EXIT_S
    return {"expected_s": round(expected, 1), "step_s": step_s, "eval_s": eval_s or None, "save_s": save_s,
            "adapter_save_s": adapter_s, "measured": step_s is not None}


def stop_budget(expected_s: float) -> float:
    """How long stop_run(wait=True) waits before it gives up waiting (it never kills): twice the
    expectation and half a minute, since a machine that got busier makes every step slower."""
    return 2 * expected_s + 30.0


def _seconds(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def stop_run(run_dir: str | os.PathLike, timeout: float | None = None, *, wait: bool = False,
             kill: bool = False, on_wait: Callable[[dict], None] | None = None) -> dict:
    """Ask the trainer to stop: it ends the current step, saves a checkpoint and the adapter, ends `stopped`.

    Safe to repeat; a run that is not active is left as it is. Without `timeout`, `wait` or `kill`
    it only asks and returns. With `wait`, it waits for the stop as long as the run's own step and
    save times say (stop_estimate, stop_budget) and never kills: a run still stopping then is
    returned as it is. Killing is only ever asked for: with `timeout`, the caller's own number of
    seconds, after which the process group is killed and the run marked `failed`; with `kill`
    alone, at once. `on_wait(estimate)` is called before waiting, so a caller can say how long.
    Returns the status after the request (or after the wait).
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    st = rd.status()
    if st["state"] not in ACTIVE_STATES or not st["alive"]:
        return st
    if kill and timeout is None:
        return _kill(rd, f"killed on request at step {st.get('step', 0)}, without saving that step")
    rd.request_stop()
    _signal_run(run_dir, signal.SIGTERM)
    if timeout is None and not wait:
        return rd.status()
    estimate = stop_estimate(st)
    if on_wait is not None:
        on_wait(estimate)
    limit = float(timeout) if timeout is not None else stop_budget(estimate["expected_s"])
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        st = rd.status()
        if not st["alive"] and st["state"] in FINAL_STATES:
            return st
        time.sleep(0.2)
    if timeout is None:
        return rd.status()  # still stopping: it ends by itself; killing was not asked for
    return _kill(rd, f"did not stop within {timeout:g} s of SIGTERM; killed as asked")


def _kill(rd: RunDir, why: str) -> dict:
    _signal_run(rd.path, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # the kernel frees a killed process at once; a busy machine may lag
    while rd.status(max_age_s=0)["alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    prev = rd.read_status_file() or {}
    if prev.get("state") not in FINAL_STATES:
        ckpt = rd.last_complete_checkpoint()
        rd.write_status({**prev, "state": "failed", "updated_at": time.time(), "error": why + (
            f"; resume continues from {ckpt.name}" if ckpt else "; no checkpoint had been saved")})
    return rd.status(max_age_s=0)


def delete_run(run_dir: str | os.PathLike) -> None:
    """Remove a run folder; refuses while its trainer is alive."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    if not (rd.config.exists() or rd.status_file.exists()):
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG} or {STATUS}); not deleting it")
    st = rd.status()
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
    rd = RunDir(run_dir)
    with open(rd.log, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        # A new session: the trainer outlives the UI or terminal, and stop signals its whole group.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)
    rd.write_launch({"pid": proc.pid, "pid_started": process_start_time(proc.pid),
                     "cmd": cmd, "cwd": cwd, "nproc": nproc, "resume": resume,
                     "accelerate_config": None if accelerate_config is None else str(accelerate_config),
                     "launched_at": time.time()})
    # Reap the child when it exits so a long-lived UI does not collect zombies.
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def _signal_run(run_dir: Path, sig: int) -> None:
    st = RunDir(run_dir).read_status_file() or {}
    launch = RunDir(run_dir).read_launch()
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


class RunActiveError(RunError):
    """Another run of the runs folder is training (the queue takes the new run instead)."""


def _refuse_if_active(root: Path) -> None:
    active = active_run(root)
    if active is not None:
        st = RunDir(active).status()
        raise RunActiveError(f"run {active.name} in {root} is {st['state']} (step {st.get('step', 0)} of "
                             f"{st.get('max_steps')}); queue this one behind it (studio train CONFIG --queue), "
                             f"stop it first (studio stop {active}) or use another runs folder")


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
