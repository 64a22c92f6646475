"""The run queue: real trainer processes (tiny-llama, a few steps each), a real detached runner.

The runner is started the way the UI and the CLI start it (queue.enqueue), so these tests also
prove it works with no UI or CLI process open: the test process only reads the run folders.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig
from studio.errors import RunError
from studio.runs import queue

pytestmark = pytest.mark.slow
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = [{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]} for w in WORDS * 10]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # one CPU slot, whatever the machine has
    d = tmp_path / "runs"
    yield d
    try:
        for r in queue.entries(d):
            queue.cancel(d, r["run"])
    except RunError:
        pass  # the test left a queue file it broke on purpose
    if d.is_dir():
        for run in d.iterdir():
            if (run / runs.STATUS).exists():
                runs.stop_run(run, timeout=10)
    _wait(lambda: not queue.runner_alive(d), 30, "the runner to exit")


def config(dataset: Path, max_steps: int = 4, seed: int = 1) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(dataset), "max_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"learning_rate": 1e-3, "max_steps": max_steps, "per_device_train_batch_size": 2,
                  "save_steps": 2, "warmup_ratio": 0.0, "seed": seed}})


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _state(run_dir: Path) -> str:
    return runs.read_status(run_dir)["state"]


def _starts(run_dir: Path) -> int:
    """How many times a trainer was launched for this run (one log header line per launch)."""
    log = run_dir / runs.LOG
    return sum(1 for line in log.read_text().splitlines() if line.startswith("# ")) if log.exists() else 0


def test_queued_runs_train_one_at_a_time_then_the_runner_leaves(root, dataset):
    dirs = [queue.enqueue(config(dataset, seed=i), root) for i in range(3)]
    assert [e["run"] for e in queue.entries(root) if e["slot"] is None][-1] == dirs[-1].name
    _wait(lambda: all(_state(d) == "completed" for d in dirs), 240, "all three runs to complete")
    spans = sorted((runs.read_json(d / runs.STATUS)["started_at"], runs.read_json(d / runs.STATUS)["finished_at"])
                   for d in dirs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.5, spans  # never two trainers in the one slot
    assert all(_starts(d) == 1 for d in dirs)
    _wait(lambda: not queue.runner_alive(root), 15, "the runner to exit on an empty queue")
    assert queue.entries(root) == []


def test_sigkill_of_the_running_run_starts_the_next_within_10_s(root, dataset):
    first = queue.enqueue(config(dataset, max_steps=100_000), root)
    waiting = [queue.enqueue(config(dataset, seed=i), root) for i in (2, 3)]
    _wait(lambda: runs.read_status(first).get("step", 0) >= 2, 120, "the first run to train")
    assert [queue.position(root, d.name) for d in waiting] == [1, 2]
    pid = runs.read_status(first)["pid"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    killed = time.monotonic()
    _wait(lambda: _state(first) == "failed", 10, "the killed run to read failed")
    _wait(lambda: runs.read_status(waiting[0])["alive"], 10, "the next run to start")
    assert time.monotonic() - killed < 10
    _wait(lambda: all(_state(d) == "completed" for d in waiting), 240, "the waiting runs to complete")


def test_a_killed_runner_is_restarted_and_adopts_its_trainer_without_running_it_twice(root, dataset):
    first = queue.enqueue(config(dataset, max_steps=30), root)
    second = queue.enqueue(config(dataset, seed=5), root)
    _wait(lambda: runs.read_status(first)["alive"], 60, "the first run to start")
    runner_pid = next(int(p) for p in _runner_pids(root))
    os.kill(runner_pid, signal.SIGKILL)
    _wait(lambda: not queue.runner_alive(root), 10, "the runner to be gone")
    assert queue.ensure_runner(root)  # what the next UI or CLI command does
    _wait(lambda: all(_state(d) == "completed" for d in (first, second)), 300, "both runs to complete")
    assert _starts(first) == 1 and _starts(second) == 1


def _runner_pids(root: Path) -> list[str]:
    import psutil

    return [str(p.pid) for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "studio.runs.queue" in p.info["cmdline"] and str(root.resolve()) in p.info["cmdline"]]


def test_two_starts_at_the_same_moment_queue_each_run_once(root, dataset):
    first = queue.enqueue(config(dataset, max_steps=100_000), root)  # holds the slot
    _wait(lambda: queue.position(root, first.name) is None, 60, "the first run to take the slot")
    got, barrier = [], threading.Barrier(2)

    def press():
        barrier.wait()
        got.append(queue.enqueue(config(dataset), root).name)

    threads = [threading.Thread(target=press) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = [e["run"] for e in queue.entries(root) if e["slot"] is None]
    assert sorted(order) == sorted(got) and len(set(got)) == 2
    runs.stop_run(first)


def test_cancel_and_move_waiting_runs(root, dataset):
    first = queue.enqueue(config(dataset, max_steps=100_000), root)
    _wait(lambda: queue.position(root, first.name) is None, 60, "the first run to take the slot")
    a, b, c = (queue.enqueue(config(dataset, seed=i), root).name for i in range(3))
    assert queue.move(root, c, -5) == 1 and queue.move(root, a, 1) == 3
    assert [e["run"] for e in queue.entries(root) if e["slot"] is None] == [c, b, a]
    assert queue.cancel(root, b) and not queue.cancel(root, b)
    assert runs.read_status(root / b)["state"] == "stopped" and _starts(root / b) == 0
    with pytest.raises(RunError, match="is not waiting"):
        queue.move(root, b, 1)
    runs.stop_run(first)


def test_a_queue_file_edited_into_nonsense_is_refused_by_name(root, dataset):
    (root / queue.QUEUE_DIR).mkdir(parents=True)
    path = root / queue.QUEUE_DIR / queue.QUEUE_FILE
    for text, what in (("{not json", "not valid JSON"), ('{"order": 3, "slots": {}}', "'order' must be a list"),
                       ('{"order": ["../x"], "slots": {}}', "'order' must be a list of run ids")):
        path.write_text(text)
        with pytest.raises(RunError, match=f"{path}: {what}"):
            queue.entries(root)
        with pytest.raises(RunError):
            queue.enqueue(config(dataset), root)
        assert not [d for d in root.iterdir() if d.name != queue.QUEUE_DIR]  # nothing half-queued


def test_start_while_a_run_trains_queues_and_stop_takes_a_waiting_run_out(root, dataset, tmp_path, capsys):
    first, pos = queue.submit(config(dataset, max_steps=100_000), root)
    assert pos is None and runs.read_status(first)["alive"]  # nothing trained: it started at once
    second, pos = queue.submit(config(dataset, seed=7), root)
    assert pos == 1 and runs.read_status(second)["state"] == "queued"
    from studio import cli

    cfg = tmp_path / "third.yaml"
    config(dataset, seed=8).save(cfg)
    assert cli.main(["train", str(cfg), "--queue", "--runs-dir", str(root)]) == 0
    captured = capsys.readouterr()
    third = Path(captured.out.strip())
    assert "queued at position 2" in captured.err and queue.position(root, third.name) == 2
    assert cli.main(["stop", str(second)]) == 0  # Stop on a queued run: out of the queue, never started
    assert "removed from the queue" in capsys.readouterr().out
    assert runs.read_status(second)["state"] == "stopped" and _starts(second) == 0
    assert queue.position(root, third.name) == 1
    st = queue.stop(third)  # the UI's Stop does the same
    assert st["state"] == "stopped" and queue.position(root, third.name) is None
    runs.stop_run(first)
