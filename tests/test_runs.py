"""The runs manager without training: run folders, status rules, metrics offsets, refusals.

Processes are faked with real pids (this test process, or a finished child) so the liveness
rules are exercised exactly as with a trainer, in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig
from studio.errors import ConfigError


def cfg(**train) -> RunConfig:
    c = RunConfig()
    c.train.max_steps = train.get("max_steps", 10)
    return c


def me() -> dict:
    return {"pid": os.getpid(), "pid_started": runs.process_start_time(os.getpid())}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def set_status(run_dir: Path, **fields) -> None:
    st = runs.read_json(run_dir / runs.STATUS) or {}
    runs.write_json_atomic(run_dir / runs.STATUS, {**st, **fields})


def test_runs_dir_default_env_and_argument(monkeypatch, tmp_path):
    monkeypatch.delenv("STUDIO_RUNS_DIR", raising=False)
    assert runs.runs_dir() == Path("runs")
    monkeypatch.setenv("STUDIO_RUNS_DIR", str(tmp_path / "env"))
    assert runs.runs_dir() == tmp_path / "env"
    assert runs.runs_dir(tmp_path / "arg") == tmp_path / "arg"
    run = runs.create_run(cfg())
    assert run.parent == tmp_path / "env"


def test_create_run_writes_config_and_queued_status_with_unique_ids(tmp_path):
    a = runs.create_run(cfg(), tmp_path)
    b = runs.create_run(cfg(), tmp_path)
    assert re.fullmatch(r"\d{8}-\d{6}-tiny-llama-r8(-\d+)?", a.name), a.name
    assert a != b and b.name.startswith(a.name[:15])
    assert (a / runs.CONFIG).is_file()
    st = runs.read_status(a)
    assert st["state"] == "queued" and st["step"] == 0 and st["max_steps"] == 10 and not st["alive"]
    assert st["id"] == a.name and st["dir"] == str(a)
    assert runs.create_run(cfg(), tmp_path, run_id="mine").name == "mine"
    with pytest.raises(runs.RunError, match="already exists"):
        runs.create_run(cfg(), tmp_path, run_id="mine")
    with pytest.raises(runs.RunError, match="may only hold"):
        runs.create_run(cfg(), tmp_path, run_id="../escape")


def test_create_run_validates_the_config(tmp_path):
    bad = cfg()
    bad.lora.r = 0
    with pytest.raises(ConfigError, match="lora.r"):
        runs.create_run(bad, tmp_path)
    assert not any(tmp_path.iterdir())


def test_status_rules_for_live_dead_and_reused_pids(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    set_status(run, state="running", step=3, **me())
    st = runs.read_status(run)
    assert st["state"] == "running" and st["alive"]

    # Same pid, other start time: the pid was reused by an unrelated process.
    set_status(run, pid=os.getpid(), pid_started=me()["pid_started"] - 1000)
    (run / runs.LOG).write_text("step 1\nstep 2\nTraceback: boom\n")
    st = runs.read_status(run)
    assert st["state"] == "failed" and not st["alive"]
    assert st["error"].startswith("the trainer process ended without writing a final state")
    assert st["error"].endswith("step 1\nstep 2\nTraceback: boom")

    set_status(run, pid=dead_pid(), pid_started=None)
    assert runs.read_status(run)["state"] == "failed"

    set_status(run, state="completed", pid=dead_pid())  # a final state stands as written
    assert runs.read_status(run)["state"] == "completed"


def test_status_of_queued_run_with_a_launcher(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    runs.write_json_atomic(run / runs.LAUNCH, me())
    assert runs.read_status(run)["state"] == "queued" and runs.read_status(run)["alive"]
    runs.write_json_atomic(run / runs.LAUNCH, {"pid": dead_pid(), "pid_started": None})
    st = runs.read_status(run)
    assert st["state"] == "failed" and "(train.log is empty)" in st["error"]


def test_stop_request_shows_stopping_then_stopped(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    set_status(run, state="running", **me())
    (run / runs.STOP_REQUEST).write_text("{}")
    assert runs.read_status(run)["state"] == "stopping"
    set_status(run, pid=dead_pid(), pid_started=None)  # died (e.g. during start-up) after the request
    assert runs.read_status(run)["state"] == "stopped"


def test_stop_of_an_inactive_run_is_a_no_op(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    set_status(run, state="completed")
    assert runs.stop_run(run)["state"] == "completed"
    assert not (run / runs.STOP_REQUEST).exists()


def test_start_is_refused_while_another_run_is_active(tmp_path):
    active = runs.create_run(cfg(), tmp_path)
    set_status(active, state="running", step=4, **me())
    assert runs.active_run(tmp_path) == active
    with pytest.raises(runs.RunError, match=rf"run {active.name} in .* is running \(step 4 of 10\); .*stop it first"):
        runs.start_run(cfg(), tmp_path)
    assert len(list(tmp_path.glob("2*"))) == 1, "nothing was created"
    with pytest.raises(runs.RunError, match="stop it before deleting"):
        runs.delete_run(active)
    with pytest.raises(runs.RunError, match="stop it before resuming"):
        runs.resume_run(active)
    # A run whose process is gone no longer blocks anything.
    set_status(active, pid=dead_pid(), pid_started=None)
    assert runs.active_run(tmp_path) is None


def test_resume_refuses_completed_runs(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    set_status(run, state="completed", step=10)
    with pytest.raises(runs.RunError, match="completed .* nothing to resume"):
        runs.resume_run(run)
    with pytest.raises(runs.RunError, match="not a run folder"):
        runs.resume_run(tmp_path)


def test_delete_run(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    runs.delete_run(run)
    assert not run.exists()
    other = tmp_path / "not-a-run"
    other.mkdir()
    with pytest.raises(runs.RunError, match="not a run folder"):
        runs.delete_run(other)
    assert other.exists()


def test_start_run_checks_launch_arguments(tmp_path):
    with pytest.raises(runs.RunError, match="nproc must be an integer >= 1, got 0"):
        runs.start_run(cfg(), tmp_path, nproc=0)
    with pytest.raises(runs.RunError, match="accelerate config .*nope.yaml does not exist"):
        runs.start_run(cfg(), tmp_path, accelerate_config=tmp_path / "nope.yaml")


def test_trainer_command_forms(tmp_path):
    run = tmp_path / "r"
    assert runs.trainer_command(run) == [sys.executable, "-m", "studio.runs.trainer", str(run)]
    assert runs.trainer_command(run, resume=True)[-1] == "--resume"
    ddp = runs.trainer_command(run, nproc=2)
    assert ddp[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--num_processes") + 1] == "2" and "--multi_gpu" in ddp and "--main_process_port" in ddp
    assert ddp[-3:] == ["-m", "studio.runs.trainer", str(run)]
    conf = runs.trainer_command(run, nproc=4, accelerate_config="fsdp.yaml")
    assert conf[conf.index("--config_file") + 1] == "fsdp.yaml" and conf[conf.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" not in conf, "the config file decides the backend"
    assert "--num_processes" not in runs.trainer_command(run, accelerate_config="fsdp.yaml")


def test_read_metrics_by_offset_leaves_a_partial_line(tmp_path):
    run = tmp_path
    assert runs.read_metrics(run) == ([], 0)
    path = run / runs.METRICS
    path.write_bytes(b'{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    rows, off = runs.read_metrics(run)
    assert rows == [{"step": 1, "loss": 2.5}] and off == len(b'{"step": 1, "loss": 2.5}\n')
    assert runs.read_metrics(run, off) == ([], off), "the partial line waits"
    with open(path, "ab") as f:
        f.write(b'ss": 2.25}\n{"step": 3, "loss": NaN}\n')
    rows, off2 = runs.read_metrics(run, off)
    assert [r["step"] for r in rows] == [2, 3] and rows[0]["loss"] == 2.25
    assert off2 == path.stat().st_size
    assert runs.read_metrics(run, off2) == ([], off2)
    path.write_bytes(b'{"step": 1}\n')  # recreated, shorter than the offset: read again from the start
    assert runs.read_metrics(run, off2) == ([{"step": 1}], len(b'{"step": 1}\n'))


def test_status_json_is_strict_json(tmp_path):
    runs.write_json_atomic(tmp_path / "s.json", {"loss": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"loss": None, "x": [None, 1.0]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"], "no temporary file left behind"


def test_list_runs_newest_first_with_config_facts(tmp_path):
    old = runs.create_run(cfg(), tmp_path, run_id="old")
    runs.create_run(cfg(max_steps=20), tmp_path, run_id="new")
    set_status(old, created_at=time.time() - 60, state="completed", step=10, last_loss=1.5, eval_loss=1.7,
               elapsed_s=12.0, trainable_params=20480)
    (tmp_path / "stray").mkdir()  # not a run: ignored
    rows = runs.list_runs(tmp_path)
    assert [r["id"] for r in rows] == ["new", "old"]
    r = rows[1]
    assert r["state"] == "completed" and r["last_loss"] == 1.5 and r["eval_loss"] == 1.7 and r["duration_s"] == 12.0
    assert (r["model"], r["task"], r["r"], r["lora_alpha"], r["target_modules"]) == \
        ("tiny-llama", "causal_lm", 8, 16, ["q_proj", "v_proj"])
    assert r["trainable_params"] == 20480 and r["dir"] == str(old)
    assert rows[0]["max_steps"] == 20 and rows[0]["state"] == "queued"
    assert runs.list_runs(tmp_path / "missing") == []


def test_last_complete_checkpoint_skips_partial_ones(tmp_path):
    assert runs.last_complete_checkpoint(tmp_path) is None
    ck = tmp_path / runs.CHECKPOINTS

    def make(step, files):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_text("{}")
    full = (runs.COMPLETE_MARKER, "trainer_state.json", "adapter_model.safetensors")
    make(5, full)
    make(10, full)
    make(15, ("trainer_state.json", "adapter_model.safetensors"))  # killed before the marker
    make(20, (runs.COMPLETE_MARKER, "trainer_state.json"))  # weights missing
    (ck / "checkpoint-x").mkdir()
    assert runs.last_complete_checkpoint(tmp_path).name == "checkpoint-10"


def test_follow_reports_until_final(tmp_path):
    run = runs.create_run(cfg(), tmp_path)
    (run / runs.METRICS).write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    set_status(run, state="completed", step=2)
    seen = []
    st = runs.follow(run, lambda s, rows: seen.append((s["state"], [r["step"] for r in rows])), poll_s=0.01)
    assert st["state"] == "completed" and seen[0] == ("completed", [1, 2])


def test_stop_estimate_is_judged_from_the_runs_own_times():
    slow = {"phase": "training", "step_s": 50.0, "save_s": 4.0, "adapter_save_s": 1.5, "eval_s": None}
    est = runs.stop_estimate(slow)
    assert est["measured"] and est["expected_s"] == pytest.approx(50 + 4 + 1.5 + runs.manager.STOP_EXIT_S)
    assert runs.stop_estimate({**slow, "eval_s": 20.0})["expected_s"] == pytest.approx(est["expected_s"] + 20)
    assert runs.stop_budget(est["expected_s"]) > est["expected_s"], "a busier machine gets room"
    # Saves not measured yet are guessed from the adapter's size (weights and two Adam moments, float32).
    big = runs.stop_estimate({"phase": "training", "step_s": 1.0, "trainable_params": 100_000_000})
    small = runs.stop_estimate({"phase": "training", "step_s": 1.0, "trainable_params": 1_000})
    assert big["save_s"] > small["save_s"] + 20
    first = runs.stop_estimate({"phase": "training"})  # the first step is not measured yet
    assert not first["measured"] and first["expected_s"] >= runs.manager.STOP_STARTUP_S
    assert runs.stop_estimate({"phase": "loading model"})["expected_s"] == runs.manager.STOP_STARTUP_S
    assert runs.stop_estimate({"phase": "saving adapter", "adapter_save_s": 2.0})["expected_s"] == \
        pytest.approx(2.0 + runs.manager.STOP_EXIT_S)


@pytest.fixture
def deaf_trainer(tmp_path):
    """A run whose 'trainer' ignores SIGTERM, as one busy in a long step does for a while."""
    run = runs.create_run(cfg(), tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"ready"
    who = {"pid": proc.pid, "pid_started": runs.process_start_time(proc.pid)}
    runs.write_json_atomic(run / runs.LAUNCH, {**who, "cmd": ["python", "-m", "studio.runs.trainer"]})
    set_status(run, state="running", phase="training", step=7, step_s=0.1, save_s=0.1, **who)
    yield run, proc
    proc.kill()
    proc.wait()


def test_stop_waits_without_killing_unless_asked(deaf_trainer, monkeypatch):
    run, proc = deaf_trainer
    monkeypatch.setattr(runs.manager, "stop_budget", lambda expected: 0.5)  # keep the wait short here
    seen = []
    st = runs.stop_run(run, wait=True, on_wait=seen.append)
    assert seen and seen[0]["measured"] and seen[0]["step_s"] == 0.1
    assert st["state"] == "stopping" and st["alive"], "waited, then left it stopping: not killed"
    assert proc.poll() is None
    assert runs.read_json(run / runs.STATUS)["state"] == "running", "nothing marked failed"

    st = runs.stop_run(run, timeout=0.3)  # an explicit wait the caller chose: then it is killed
    assert st["state"] == "failed" and not st["alive"]
    assert st["error"].startswith("did not stop within 0.3 s of SIGTERM; killed as asked")
    assert not runs.read_status(run)["alive"], "a remembered 'alive' does not outlive the kill"
    assert proc.wait(timeout=5) == -9


def test_stop_kill_ends_the_trainer_at_once(deaf_trainer):
    run, proc = deaf_trainer
    t0 = time.monotonic()
    st = runs.stop_run(run, kill=True)
    assert time.monotonic() - t0 < 5
    assert st["state"] == "failed" and "killed on request at step 7" in st["error"]
    assert "no checkpoint had been saved" in st["error"]
    assert not runs.read_status(run)["alive"]
    assert proc.wait(timeout=5) == -9


def test_cli_stop_says_what_it_waits_for_and_refuses_a_negative_wait(deaf_trainer, capsys):
    from studio.cli import main

    run, proc = deaf_trainer
    assert main(["stop", str(run), "--wait", "-1"]) == 2
    assert "--wait must be a number of seconds >= 0, got -1" in capsys.readouterr().err
    assert main(["stop", str(run), "--wait", "0"]) == 0  # only asks
    out = capsys.readouterr().out
    assert re.match(rf"{run.name}: stop asked at step 7; it ends after the step in progress and its save, about "
                    r"\d+ s \(a step ~0\.1 s, checkpoint save ~0\.1 s, adapter save ~[\d.]+ s\)", out), out
    assert proc.poll() is None and (run / runs.STOP_REQUEST).exists()
    assert main(["stop", str(run), "--kill"]) == 0
    assert "killed at step 7; killed on request" in capsys.readouterr().out
    assert main(["stop", str(run)]) == 0
    assert "(not running; nothing to stop)" in capsys.readouterr().out
    assert main(["stop", str(run.parent / "nope")]) == 2
