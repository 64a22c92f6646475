"""train.report_to through Trainer's own integrations, read back from what the trackers wrote:
tensorboard's event files (EventAccumulator) and MLflow's local file store (MlflowClient), both
inside the run folder; trackers that are not installed are refused by preflight with the pip command."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig
from studio.errors import ConfigError
from studio.runs.preflight import check_switches
from studio.runs.rundir import RunDir

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit"]


def make_cfg(dataset: Path, report_to) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(dataset), "max_length": 64, "eval_fraction": 0.1},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"learning_rate": 1e-2, "max_steps": 4, "per_device_train_batch_size": 2, "eval_steps": 2,
                  "save_steps": 100, "warmup_ratio": 0.0, "report_to": report_to},
    })


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]}) + "\n"
                            for w in WORDS * 12))
    return path


@pytest.mark.slow
def test_tensorboard_and_mlflow_get_the_runs_metrics_inside_the_run_folder(dataset, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)  # the trainer's defaults, into the run folder
    run_dir = runs.start_run(make_cfg(dataset, ["tensorboard", "mlflow"]), tmp_path / "runs")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st = runs.read_status(run_dir)
        if st["state"] in runs.FINAL_STATES and not st["alive"]:
            break
        time.sleep(0.2)
    assert st["state"] == "completed", (st, runs.log_tail(run_dir, 40))
    rows, _ = runs.read_metrics(run_dir)
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    eval_loss = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(loss) == [1, 2, 3, 4] and sorted(eval_loss) == [2, 4]
    trackers = RunDir(run_dir).trackers

    # tensorboard: the event file in RUN/trackers/tensorboard, and status.json says how to open it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = st["trackers"]["tensorboard"]
    assert Path(tb["path"]) == trackers / "tensorboard" and tb["open"] == f"tensorboard --logdir {tb['path']}"
    acc = EventAccumulator(tb["path"])
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert got.keys() == loss.keys() and all(got[s] == pytest.approx(loss[s], rel=1e-4) for s in loss)
    assert {e.step for e in acc.Scalars("eval/loss")} == set(eval_loss)

    # mlflow: a local file store in RUN/trackers/mlflow, one run named after the studio run
    import mlflow

    ml = st["trackers"]["mlflow"]
    assert ml["path"] == (trackers / "mlflow").resolve().as_uri() and ml["path"] in ml["open"]
    assert ml["open"].startswith("MLFLOW_ALLOW_FILE_STORE=true mlflow ui")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the open command says
    client = mlflow.MlflowClient(tracking_uri=ml["path"])
    exp = client.get_experiment_by_name(ml["experiment"])
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == RunDir(run_dir).id
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history.keys() == loss.keys() and all(history[s] == pytest.approx(loss[s], rel=1e-4) for s in loss)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")} == set(eval_loss)
    assert run.data.params["learning_rate"] == "0.01"  # Trainer logs its arguments as parameters


@pytest.mark.parametrize("tracker", ["wandb", "trackio", "tensorboard", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_command(dataset, tracker):
    cfg = make_cfg(dataset, [tracker])
    if importlib.util.find_spec(tracker) is not None:
        check_switches(cfg)  # installed: nothing to refuse
        return
    with pytest.raises(ConfigError, match=rf"train.report_to {tracker}: {tracker} is not installed: pip install {tracker}"):
        check_switches(cfg)


def test_report_to_names_the_allowed_trackers(dataset):
    with pytest.raises(ConfigError, match="train.report_to = 'neptune' is not one of: tensorboard, mlflow, trackio, wandb"):
        make_cfg(dataset, ["neptune"])
