"""The run queue: runs wait their turn and a detached runner starts them one after another.

A queued run is an ordinary run folder in state `queued` (config.yaml + status.json, no
process); the queue itself is one small JSON file in the runs folder, `.queue/queue.json`:

    {"order": [run ids, first to start first], "slots": {slot: run id now training there}}

Every change to it happens under an exclusive lock (`.queue/lock`), so two UIs pressing Start at
the same moment each append their run once. The runner (`python -m studio.runs.queue RUNS_DIR`)
is started on demand by whoever queues a run, holds `.queue/runner.lock` for as long as it
lives (so there is never a second one), and exits when the queue is empty and every slot is
free. It has one slot per visible GPU (each run gets CUDA_VISIBLE_DEVICES of its slot) and one
slot on a machine without a GPU. A run moves from `order` to a slot, under the lock, in the
same write that precedes its start: a run is started at most once, whoever crashes when.

A runner killed by SIGKILL leaves its slots in the file; the next command that touches the
queue starts a new runner, which adopts a slot's trainer while it is alive and frees the slot
once it is not (read_status then reports the run `failed` with the end of its log, as for any
dead trainer). The runner polls once a second, so a run that dies is followed by the next
queued one within about a second.

The queue is the studio's own: Trainer and accelerate have no notion of runs waiting for a
machine, and a job scheduler (slurm) is more than a studio on one machine should require.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from studio.errors import RunError
from studio.runs import manager

QUEUE_DIR, QUEUE_FILE, LOCK, RUNNER_LOCK, RUNNER_LOG = ".queue", "queue.json", "lock", "runner.lock", "runner.log"
POLL_S = 1.0
CPU_SLOT = "cpu"


# --- the queue file -----------------------------------------------------------------------

def _dir(root: Path) -> Path:
    d = Path(root) / QUEUE_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(root: Path):
    """The queue file, read under an exclusive lock; what the block leaves in it is written back."""
    d = _dir(root)
    with open(d / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            q = _read(d / QUEUE_FILE)
            yield q
            manager.write_json_atomic(d / QUEUE_FILE, q)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    """The queue, checked: a file edited by hand into nonsense is refused with what is wrong in it."""
    if not path.exists():
        return {"order": [], "slots": {}}
    try:
        q = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e}); fix it or delete the file to empty the queue") from None
    order, slots = (q.get("order"), q.get("slots")) if isinstance(q, dict) else (None, None)
    if not isinstance(order, list) or not all(isinstance(r, str) and manager_valid_id(r) for r in order):
        raise RunError(f"{path}: 'order' must be a list of run ids; fix it or delete the file to empty the queue")
    if not isinstance(slots, dict) or not all(isinstance(v, str) and manager_valid_id(v) for v in slots.values()):
        raise RunError(f"{path}: 'slots' must map slot names to run ids; fix it or delete the file to empty the queue")
    return {"order": list(dict.fromkeys(order)), "slots": dict(slots)}


manager_valid_id = manager.is_run_id  # the one run-id rule (studio.runs.rundir)


def entries(root: str | os.PathLike | None = None) -> list[dict]:
    """The queue as plain data: the runs training in a slot, then the waiting ones with their position."""
    root = manager.runs_dir(root)
    path = root / QUEUE_DIR / QUEUE_FILE
    q = _read(path)
    out = [{"run": r, "slot": s, "position": 0, "state": manager.read_status(root / r).get("state")}
           for s, r in q["slots"].items()]
    out += [{"run": r, "slot": None, "position": i + 1, "state": "queued"} for i, r in enumerate(q["order"])]
    return out


def position(root: Path, run_id: str) -> int | None:
    """1 for the next run to start; None when the run is not waiting."""
    q = _read(manager.runs_dir(root) / QUEUE_DIR / QUEUE_FILE)
    return q["order"].index(run_id) + 1 if run_id in q["order"] else None


# --- changing it ----------------------------------------------------------------------------

def enqueue(cfg, root: str | os.PathLike | None = None, run_id: str | None = None,
            extra_status: dict | None = None) -> Path:
    """A new run folder in state `queued`, appended to the queue; the runner is started if needed."""
    root = manager.runs_dir(root)
    run_dir = manager.create_run(cfg, root, run_id)
    if extra_status:
        st = manager.read_json(run_dir / manager.STATUS) or {}
        manager.write_json_atomic(run_dir / manager.STATUS, {**st, **extra_status})
    try:
        with _locked(root) as q:
            q["order"].append(run_dir.name)
    except BaseException:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # a queue that cannot take it keeps no orphan folder
        raise
    ensure_runner(root)
    return run_dir


def submit(cfg, root: str | os.PathLike | None = None, extra_status: dict | None = None) -> tuple[Path, int | None]:
    """Start `cfg` now when nothing trains and nothing waits, else queue it behind the others.

    Returns the run folder and its queue position (None when it started at once). The caller has
    run preflight. Two callers at the same moment: one starts, the other is queued, each once."""
    root = manager.runs_dir(root)
    if manager.active_run(root) is None and not _read(root / QUEUE_DIR / QUEUE_FILE)["order"]:
        try:
            return manager.start_run(cfg, root, extra_status=extra_status), None
        except manager.RunActiveError:
            pass  # another Start won the race: this one waits its turn
    run_dir = enqueue(cfg, root, extra_status=extra_status)
    return run_dir, position(root, run_dir.name)


def cancel(root: str | os.PathLike | None, run_id: str) -> bool:
    """Take a waiting run out of the queue (it ends `stopped` at step 0); False if it was not waiting."""
    root = manager.runs_dir(root)
    with _locked(root) as q:
        if run_id not in q["order"]:
            return False
        q["order"].remove(run_id)
    st = manager.read_json(root / run_id / manager.STATUS) or {}
    manager.write_json_atomic(root / run_id / manager.STATUS, {
        **st, "state": "stopped", "finished_at": time.time(), "updated_at": time.time(),
        "error": None, "note": "removed from the queue before it started"})
    return True


def stop(run_dir: str | os.PathLike, **kwargs) -> dict:
    """Stop as a person means it: a run waiting in the queue leaves it (it never starts); a running
    one is asked to stop (manager.stop_run, with its `kwargs`)."""
    run_dir = Path(run_dir)
    st = manager.read_status(run_dir)
    if st["state"] == "queued" and not st["alive"] and cancel(run_dir.parent, run_dir.name):
        return manager.read_status(run_dir)
    return manager.stop_run(run_dir, **kwargs)


def move(root: str | os.PathLike | None, run_id: str, by: int) -> int:
    """Move a waiting run `by` places (negative: towards the front); returns its new position."""
    root = manager.runs_dir(root)
    with _locked(root) as q:
        if run_id not in q["order"]:
            raise RunError(f"run {run_id} is not waiting in the queue of {root}")
        i = q["order"].index(run_id)
        j = min(max(i + by, 0), len(q["order"]) - 1)
        q["order"].insert(j, q["order"].pop(i))
    return j + 1


# --- the runner ---------------------------------------------------------------------------

def slots() -> list[str]:
    """One slot per visible GPU, else one CPU slot. Read without importing torch (the runner stays small)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return ids or [CPU_SLOT]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        ids = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        ids = []
    return ids or [CPU_SLOT]


def runner_alive(root: Path) -> bool:
    with open(_dir(root) / RUNNER_LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def ensure_runner(root: str | os.PathLike | None = None) -> bool:
    """Start the runner when the queue has work and none is running; True if one was started."""
    root = manager.runs_dir(root).resolve()
    q = _read(root / QUEUE_DIR / QUEUE_FILE)
    if not (q["order"] or q["slots"]) or runner_alive(root):
        return False
    with open(_dir(root) / RUNNER_LOG, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "studio.runs.queue", str(root)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    import threading

    threading.Thread(target=proc.wait, daemon=True, name=f"reap-queue-{proc.pid}").start()
    return True


def step(root: Path, slot_names: list[str]) -> bool:
    """One pass of the runner: free the slots whose trainer is gone, start the next runs in free ones.

    Returns whether anything is left to do (a waiting run or a busy slot)."""
    with manager._folder_lock(root), _locked(root) as q:
        for s, r in list(q["slots"].items()):
            if s not in slot_names or not (root / r).is_dir() or not manager.read_status(root / r)["alive"]:
                del q["slots"][s]
        # A run started by hand (studio train without --queue) holds a slot too.
        outside = [d.name for d in _active(root) if d.name not in q["slots"].values()]
        free = [s for s in slot_names if s not in q["slots"]][len(outside):]
        while free and q["order"]:
            r = q["order"].pop(0)
            st = manager.read_json(root / r / manager.STATUS) or {}
            if not (root / r / manager.CONFIG).is_file() or st.get("state") != "queued":
                continue  # deleted or cancelled while it waited
            s = free.pop(0)
            q["slots"][s] = r
            manager.write_json_atomic(_dir(root) / QUEUE_FILE, q)  # recorded before it starts: never twice
            _start(root / r, s)
        return bool(q["order"] or q["slots"])


def _active(root: Path) -> list[Path]:
    out = []
    for d in root.iterdir():
        if d.is_dir() and (d / manager.STATUS).exists():
            st = manager.read_status(d)
            if st["state"] in manager.ACTIVE_STATES and st["alive"]:
                out.append(d)
    return out


def _start(run_dir: Path, slot: str) -> None:
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if slot != CPU_SLOT:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot
    try:
        manager._spawn(run_dir, resume=False, nproc=1, accelerate_config=None)
    except OSError as e:
        st = manager.read_json(run_dir / manager.STATUS) or {}
        manager.write_json_atomic(run_dir / manager.STATUS, {**st, "state": "failed", "updated_at": time.time(),
                                                             "error": f"the queue could not start it: {e}"})
    finally:
        if slot != CPU_SLOT:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous


def run(root: Path, poll_s: float = POLL_S) -> int:
    """The runner's loop; returns when the queue is empty and every slot is free."""
    root = Path(root).resolve()
    with open(_dir(root) / RUNNER_LOCK, "a+") as me:
        try:
            fcntl.flock(me, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another runner has the queue
        names = slots()
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} queue runner {os.getpid()} on {root}, slots {names}", flush=True)
        while True:
            try:
                if not step(root, names):
                    return 0
            except RunError as e:  # the queue file was edited into nonsense: say so and leave it be
                print(f"queue runner: {e}", flush=True)
                return 2
            time.sleep(poll_s)


if __name__ == "__main__":
    raise SystemExit(run(Path(sys.argv[1])))
