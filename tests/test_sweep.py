"""Sweeps: grid parsing and checks (no process), then a real 2-run sweep through `studio sweep`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.config import RunConfig
from studio.errors import ConfigError, StudioError
from studio.runs import queue, sweep

ROOT = Path(__file__).resolve().parent.parent


def test_grid_values_are_typed_and_target_sets_split_on_bars():
    g = sweep.parse_grid(["lora.r=1,4,16", "lora.target_modules=q_proj|q_proj,v_proj|all-linear",
                          "train.learning_rate=2e-4,1e-3", "data.packing=true,false"])
    assert g == {"lora.r": [1, 4, 16], "lora.target_modules": [["q_proj"], ["q_proj", "v_proj"], "all-linear"],
                 "train.learning_rate": [2e-4, 1e-3], "data.packing": [True, False]}
    assert len(sweep.points(g)) == 3 * 3 * 2 * 2


def test_each_point_is_a_whole_validated_config():
    todo = sweep.plan(RunConfig(), sweep.parse_grid(["lora.r=2,8", "lora.target_modules=q_proj|all-linear"]))
    assert [(p["lora.r"], c.lora.r, c.lora.target_modules) for p, c in todo] == [
        (2, 2, ["q_proj"]), (2, 2, "all-linear"), (8, 8, ["q_proj"]), (8, 8, "all-linear")]


@pytest.mark.parametrize("specs,message", [
    (["lora.rank=4"], "--grid lora.rank: no such config field; did you mean lora.r?"),
    (["lora.r"], "expected KEY=V1,V2"),
    ([], "a sweep needs at least one --grid"),
    (["lora.r=1", "lora.r=2"], "given twice"),
    (["lora.rank_pattern=q_proj"], "no such config field"),
])
def test_bad_grid_keys_are_named(specs, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        sweep.parse_grid(specs)


def test_every_invalid_value_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        sweep.plan(RunConfig(), sweep.parse_grid(["lora.r=0,4,x", "train.lr_scheduler_type=cosine,bogus"]))
    msg = str(e.value)
    assert "got 0" in msg and "got 'x'" in msg and "'bogus' is not one of" in msg and "cosine_with_restarts" in msg


def test_more_than_64_points_is_refused():
    with pytest.raises(ConfigError, match=r"has 81 points \(9 x 9\); a sweep may have at most 64"):
        sweep.plan(RunConfig(), sweep.parse_grid(["lora.r=1,2,3,4,5,6,7,8,9", "train.seed=1,2,3,4,5,6,7,8,9"]))


def test_a_point_that_cannot_start_queues_nothing(tmp_path):
    base = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"},
                                "data": {"path": "assets/datasets/instructions.jsonl"}})
    with pytest.raises(StudioError, match="matched no module"):
        sweep.start(base, sweep.parse_grid(["lora.target_modules=q_proj|no_such_proj"]), tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any(d for d in (tmp_path / "runs").iterdir()
                                                       if d.name != queue.QUEUE_DIR)


@pytest.mark.slow
def test_cli_sweep_queues_runs_that_train_one_at_a_time_and_show_compares_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Reverse.", "input": w, "output": w[::-1]}) + "\n"
                            for w in ["apple", "river", "stone", "cloud"] * 10))
    cfg = tmp_path / "run.yaml"
    RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"},
                         "data": {"path": str(data), "max_length": 64, "eval_fraction": 0.2},
                         "train": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "learning_rate": 1e-3,
                                   "per_device_train_batch_size": 2}}).save(cfg)
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "studio", "sweep", str(cfg), "--grid", "lora.r=2,8", "--name", "rtest",
           "--runs-dir", str(root), "--json"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    assert started["sweep"] == "rtest" and len(started["runs"]) == 2
    assert time.monotonic() - t0 < 120  # returns once queued, not when trained
    deadline = time.monotonic() + 300
    rows = []
    while time.monotonic() < deadline:
        rows = sweep.rows("rtest", root)
        if all(r["state"] == "completed" for r in rows):
            break
        time.sleep(1)
    assert [r["state"] for r in rows] == ["completed", "completed"], rows
    assert [r["grid"] for r in rows] == [{"lora.r": 2}, {"lora.r": 8}]
    assert rows[0]["trainable"] < rows[1]["trainable"]
    assert all(isinstance(r["best_eval_loss"], float) and isinstance(r["final_loss"], float) for r in rows)
    show = subprocess.run([sys.executable, "-m", "studio", "sweep", "show", "rtest", "--runs-dir", str(root),
                           "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert show.returncode == 0, show.stderr
    assert set(json.loads(show.stdout)["rows"][0]) == {"run", "state", "grid", "trainable", "final_loss",
                                                       "best_eval_loss", "best_eval_accuracy", "seconds"}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
