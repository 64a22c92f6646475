"""The run folder's one owner: paths and names, the run-id rule, status and metrics files, id2label."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig
from studio.errors import RunError
from studio.runs.rundir import RunDir, check_run_id, is_run_id


def test_every_path_of_the_layout(tmp_path):
    rd = RunDir(tmp_path / "r1")
    assert rd.id == "r1" and os.fspath(rd) == str(tmp_path / "r1")
    expected = {"config": "config.yaml", "status_file": "status.json", "metrics": "metrics.jsonl", "log": "train.log",
                "launch": "launch.json", "stop_request": "stop.request", "checkpoints": "checkpoints",
                "adapter": "adapter", "merged": "merged", "exports": "exports", "eval_dir": "eval"}
    for attr, name in expected.items():
        assert getattr(rd, attr) == tmp_path / "r1" / name, attr
    assert rd.checkpoint(5) == tmp_path / "r1" / "checkpoints" / "checkpoint-5"
    assert rd.checkpoint_step(rd.checkpoint(12)) == 12
    assert rd.adapter_zip == tmp_path / "r1" / "exports" / "r1-adapter.zip"
    assert rd.merged_zip == tmp_path / "r1" / "exports" / "r1-merged.zip"
    assert rd.eval_file("heldout") == tmp_path / "r1" / "eval" / "heldout.json"
    with pytest.raises(RunError, match="plain file name"):
        rd.eval_file("../x")
    # The runs API names are the same objects: one definition.
    assert (runs.CONFIG, runs.STATUS, runs.METRICS, runs.ADAPTER, runs.COMPLETE_MARKER) == \
        ("config.yaml", "status.json", "metrics.jsonl", "adapter", "studio-complete.json")


@pytest.mark.parametrize("name", ["20260101-120000-tiny-llama-r8", "mine", "my run (copy)", "a.b_c-d", "x" * 255,
                                  "...", ".hidden", "ünïcode"])
def test_run_id_rule_accepts_plain_folder_names(name):
    assert is_run_id(name) and check_run_id(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", "a\\b", "a\0b", "x" * 256, None, 3, b"r"])
def test_run_id_rule_refuses_what_could_leave_the_runs_folder(name):
    assert not is_run_id(name)
    with pytest.raises(RunError, match="may only hold the characters of a plain folder name"):
        check_run_id(name)


def test_of_checks_the_id_and_every_surface_uses_the_same_rule(tmp_path):
    import gradio as gr

    from studio.ui import live
    from studio.ui.tabs import runs as runs_tab

    assert RunDir.of(tmp_path, "ok").path == tmp_path / "ok"
    with pytest.raises(RunError):
        RunDir.of(tmp_path, "../escape")
    assert live.valid_run_id is is_run_id
    with pytest.raises(RunError, match="may only hold"):
        runs.create_run(RunConfig(), tmp_path, run_id="a\\b")
    hand_made = runs.create_run(RunConfig(), tmp_path, run_id="my run (copy)")  # what the UI shows, it can create
    assert runs_tab.run_folder(tmp_path, hand_made.name) == hand_made
    for bad in ("a\\b", "x" * 256, "a\0b"):
        with pytest.raises(gr.Error):
            runs_tab.run_folder(tmp_path, bad)
    assert [r["id"] for r in runs.list_runs(tmp_path)] == ["my run (copy)"]


def test_status_round_trip_and_corrections(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    assert not rd.exists() and rd.read_status_file() is None
    assert rd.status()["state"] == "queued" and not rd.status()["alive"], "a folder without status is queued"
    rd.write_status({"state": "running", "step": 3, "loss": float("nan"), "pid": os.getpid(),
                     "pid_started": runs.process_start_time(os.getpid())})
    assert rd.exists()
    assert rd.read_status_file() == {"state": "running", "step": 3, "loss": None, "pid": os.getpid(),
                                     "pid_started": runs.process_start_time(os.getpid())}
    st = rd.status()
    assert st["state"] == "running" and st["alive"] and st["id"] == "r" and st["dir"] == str(rd.path)
    assert rd.update_status(step=4)["step"] == 4 and rd.read_status_file()["state"] == "running"
    assert sorted(p.name for p in rd.path.iterdir()) == ["status.json"], "no temporary file left behind"

    rd.request_stop()
    assert rd.stop_requested() and rd.status()["state"] == "stopping"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    rd.update_status(pid=p.pid, pid_started=None)
    assert rd.status()["state"] == "stopped", "a stop was asked and the process is gone"
    rd.clear_stop_request()
    rd.clear_stop_request()  # safe to repeat
    rd.log.write_text("line 1\nboom\n")
    st = rd.status()
    assert st["state"] == "failed" and st["error"].endswith("line 1\nboom")
    assert rd.read_status_file()["state"] == "running", "reading never writes"
    assert runs.read_status(rd.path) == rd.status(), "the runs API is a thin user of RunDir"


def test_metrics_round_trip_by_offset(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.read_metrics() == ([], 0)
    with rd.open_metrics() as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    rows, off = rd.read_metrics()
    assert rows == [{"step": 1, "loss": 2.0}] and off == len('{"step": 1, "loss": 2.0}\n')
    with rd.open_metrics() as f:
        f.write('ss": 1.5}\n')
    assert rd.read_metrics(off) == ([{"step": 2, "loss": 1.5}], rd.metrics.stat().st_size)
    assert runs.read_metrics(tmp_path, off) == rd.read_metrics(off)


def test_id2label_comes_from_status_as_the_trainer_records_it(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.id2label() is None
    rd.write_status({"state": "completed"})
    assert rd.id2label() is None
    rd.write_status({"state": "completed", "id2label": {"0": "negative", "1": "positive"}})  # JSON keys are strings
    assert rd.id2label() == {0: "negative", 1: "positive"}
    rd.write_status({"state": "completed", "id2label": {"zero": "negative"}})
    assert rd.id2label() is None, "a hand-edited status with odd keys is not trusted"


def test_checkpoints_complete_and_partial(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.last_complete_checkpoint() is None and rd.partial_checkpoints() == []
    for step in (5, 10, 15):
        d = rd.checkpoint(step)
        d.mkdir(parents=True)
        for f in ("trainer_state.json", "adapter_model.safetensors"):
            (d / f).write_text("{}")
    rd.mark_checkpoint_complete(5)
    rd.mark_checkpoint_complete(10)
    (rd.checkpoints / "checkpoint-x").mkdir()
    assert rd.last_complete_checkpoint() == rd.checkpoint(10)
    assert rd.partial_checkpoints() == [rd.checkpoint(15)]
    assert [s for s, _ in rd.checkpoint_folders()] == [5, 10, 15]
    assert runs.last_complete_checkpoint(tmp_path) == rd.checkpoint(10)


def test_no_module_but_rundir_spells_the_run_folder_names():
    """The literal names of the run folder live in rundir.py only (other uses of the same words, a
    JSON key or a dict key, are not paths and are listed here)."""
    root = Path(__file__).resolve().parent.parent / "studio"
    names = ('"status.json"', '"config.yaml"', '"metrics.jsonl"', '"train.log"', '"launch.json"', '"stop.request"',
             '"exports"', '"checkpoints"', '"studio-complete.json"')
    found = []
    for path in root.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(root)}: {n}" for n in names if n in text]
    assert found == []
