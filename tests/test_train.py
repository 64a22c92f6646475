"""The trainer process, for real: tiny-llama on CPU, a few dozen steps per run.

Each test starts `python -m studio.runs.trainer` the way the UI does (runs.start_run) and reads only
the run directory, as the UI does. OMP_NUM_THREADS=1 keeps a step at tens of milliseconds on
a shared 2-core machine, where several OpenMP threads per process slow everything to a crawl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio import runs
from studio.config import RunConfig

# Measured: resuming from a stop checkpoint gives bit-identical adapters on CPU (max |diff| 0.0).
# The bound leaves room for other BLAS builds, far below what one optimizer step changes (~1e-3).
RESUME_TOLERANCE = 1e-6
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit"]


@pytest.fixture(scope="module")
def env():
    """Environment of the spawned trainers (start_run copies os.environ)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("STUDIO_INJECT_NAN_AT_STEP", raising=False)
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small alpaca set tiny-llama learns quickly (regular answers to three instructions)."""
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = []
    for i in range(300):
        w = WORDS[(i * 7) % len(WORDS)]
        rows.append([{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]},
                     {"instruction": "Write the word in capitals.", "input": w, "output": w.upper()},
                     {"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}][i % 3])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(dataset: Path, **train) -> RunConfig:
    t = dict(learning_rate=1e-2, max_steps=30, per_device_train_batch_size=4, logging_steps=1, eval_steps=10,
             save_steps=10, warmup_ratio=0.0, seed=7)
    t.update(train)
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama", "task": "causal_lm"},
        "data": {"path": str(dataset), "max_length": 64, "packing": True, "eval_fraction": 0.1},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "train": t,
    })


def wait_until(pred, timeout: float, what: str, run_dir: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    tail = runs.log_tail(run_dir, 40) if run_dir else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def wait_final(run_dir: Path, timeout: float = 120) -> dict:
    def final():
        st = runs.read_status(run_dir)
        return st if st["state"] in runs.FINAL_STATES and not st["alive"] else None
    return wait_until(final, timeout, f"{run_dir.name} to end", run_dir)


def wait_step(run_dir: Path, step: int, timeout: float = 90) -> int:
    """Waits for a metrics line of `step` or later (metrics are written every step; status once a second)."""
    def reached():
        rows, _ = runs.read_metrics(run_dir)
        steps = [r["step"] for r in rows if "loss" in r]
        if runs.read_status(run_dir)["state"] in runs.FINAL_STATES:
            raise AssertionError(f"run ended before step {step}: {runs.read_status(run_dir)}")
        return max(steps) if steps and max(steps) >= step else None
    return wait_until(reached, timeout, f"step {step}", run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    rows, _ = runs.read_metrics(run_dir)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def completed(env, dataset, tmp_path_factory) -> Path:
    """Run A: 30 uninterrupted steps. Several tests read it."""
    run_dir = runs.start_run(make_cfg(dataset), tmp_path_factory.mktemp("runs-a"))
    st = wait_final(run_dir)
    assert st["state"] == "completed", (st, runs.log_tail(run_dir, 40))
    return run_dir


@pytest.mark.slow
def test_run_completes_and_loss_falls(completed):
    st = runs.read_status(completed)
    assert st["step"] == st["max_steps"] == 30 and st["error"] is None
    # 4 layers x r=8 x (q_proj 192->192 + v_proj 192->64, two KV heads of 32)
    assert st["trainable_params"] == 4 * 8 * ((192 + 192) + (192 + 64))
    assert st["format"] == "alpaca" and st["train_examples"] > 0 and st["eval_examples"] > 0
    assert st["adapter_step"] == 30 and st["elapsed_s"] > 0
    loss = losses(completed)
    assert sorted(loss) == list(range(1, 31)), "one loss line per step"
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < first - 0.4, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    rows, _ = runs.read_metrics(completed)
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["learning_rate"] > 0 and "grad_norm" in r for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20, 30]
    assert st["last_loss"] == pytest.approx(loss[30]) and st["eval_loss"] is not None
    for step in (20, 30):  # save_total_limit 2 keeps the last two, both marked complete
        assert (completed / "checkpoints" / f"checkpoint-{step}" / runs.COMPLETE_MARKER).is_file()
    listed = runs.list_runs(completed.parent)
    assert listed[0]["id"] == completed.name and listed[0]["state"] == "completed"
    assert listed[0]["last_loss"] == pytest.approx(loss[30]) and listed[0]["trainable_params"] == st["trainable_params"]


@pytest.mark.slow
def test_adapter_loads_in_peft_and_changes_output(completed):
    from peft import PeftModel

    from studio.models import load_model

    adapter = completed / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert not list(completed.glob(".adapter-*")), "temporary adapter folders are cleaned up"
    ids = torch.tensor([[256, *b"Spell the word backwards."]])
    base = load_model("tiny-llama").eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        tuned_logits = tuned(ids).logits
        tuned.disable_adapter_layers()
        again = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3, "the trained adapter must change the output"
    assert torch.equal(again, base_logits), "disabling the adapter gives the base model back"
    after = tuned.get_base_model().state_dict()
    for k, v in before.items():  # LoRA training never touches the base weights
        key = next(n for n in after if n.replace(".base_layer", "") == k)
        assert torch.equal(after[key], v), k


@pytest.mark.slow
def test_stop_then_resume_equals_uninterrupted(completed, env, dataset, tmp_path):
    run_dir = runs.start_run(make_cfg(dataset), tmp_path / "runs-b")
    wait_step(run_dir, 3)
    st = runs.stop_run(run_dir, timeout=60)
    assert st["state"] == "stopped", (st, runs.log_tail(run_dir, 40))
    stopped_at = st["step"]
    assert 3 <= stopped_at < 30, f"stopped at {stopped_at}"
    assert st["adapter_step"] == stopped_at and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert runs.last_complete_checkpoint(run_dir).name == f"checkpoint-{stopped_at}", "stop saves its step"
    assert runs.stop_run(run_dir)["state"] == "stopped", "stopping twice is a no-op"

    runs.resume_run(run_dir)
    st = wait_final(run_dir)
    assert st["state"] == "completed" and st["step"] == 30, (st, runs.log_tail(run_dir, 40))
    rows, _ = runs.read_metrics(run_dir)
    assert {"event": "resumed", "step": stopped_at, "checkpoint": f"checkpoint-{stopped_at}"} in rows
    a, b = adapter_tensors(completed / "adapter"), adapter_tensors(run_dir / "adapter")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume equality: stopped at step {stopped_at}, max |A - B| over adapter tensors = {diff:.3g}")
    assert diff <= RESUME_TOLERANCE
    # The loss curves agree too, step for step after the resume point.
    la, lb = losses(completed), {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert max(abs(la[s] - lb[s]) for s in range(stopped_at + 1, 31)) < 1e-5


@pytest.mark.slow
def test_kill9_fails_with_log_tail_then_resume_skips_partial(env, dataset, tmp_path):
    run_dir = runs.start_run(make_cfg(dataset, max_steps=40, save_steps=4, eval_steps=100), tmp_path / "runs")
    wait_until(lambda: runs.last_complete_checkpoint(run_dir), 90, "a complete checkpoint", run_dir)
    pid = runs.read_status(run_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    st = wait_until(lambda: (s := runs.read_status(run_dir))["state"] == "failed" and s, 10, "failed state")
    assert not st["alive"]
    assert "ended without writing a final state" in st["error"]
    tail = runs.log_tail(run_dir)
    assert tail and st["error"].endswith(tail), "the error carries the tail of train.log"
    assert runs.active_run(run_dir.parent) is None

    good = runs.last_complete_checkpoint(run_dir)
    partial = run_dir / "checkpoints" / "checkpoint-999"  # what a kill during a save leaves behind
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    assert runs.last_complete_checkpoint(run_dir) == good
    runs.resume_run(run_dir)
    st = wait_final(run_dir)
    assert st["state"] == "completed" and st["step"] == 40, (st, runs.log_tail(run_dir, 40))
    assert not partial.exists(), "partial checkpoints are removed on resume"
    rows, _ = runs.read_metrics(run_dir)
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] >= int(good.name.split("-")[1])


@pytest.mark.slow
def test_nan_loss_diverges_and_keeps_last_good_checkpoint(env, dataset, tmp_path):
    env.setenv("STUDIO_INJECT_NAN_AT_STEP", "8")
    try:
        run_dir = runs.start_run(make_cfg(dataset, max_steps=20, save_steps=5, eval_steps=100), tmp_path / "runs")
    finally:
        env.delenv("STUDIO_INJECT_NAN_AT_STEP")
    st = wait_final(run_dir)
    assert st["state"] == "diverged", (st, runs.log_tail(run_dir, 40))
    assert st["step"] == 8 and "step 8" in st["error"] and "checkpoint-5" in st["error"]
    assert st["adapter_step"] == 5
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-5"], "the step that went bad is never checkpointed"
    adapter = adapter_tensors(run_dir / "adapter")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    ref = adapter_tensors(run_dir / "checkpoints" / "checkpoint-5")
    assert all(torch.equal(adapter[k], ref[k]) for k in ref)
    rows, _ = runs.read_metrics(run_dir)
    bad = [r for r in rows if r.get("step") == 8 and "loss" in r]
    assert bad and bad[0]["loss"] is None and bad[0]["diverged"] is True
    assert all(r["loss"] is not None for r in rows if "loss" in r and r["step"] < 8)


@pytest.mark.slow
def test_stop_during_startup_ends_stopped_without_adapter(env, dataset, tmp_path):
    run_dir = runs.start_run(make_cfg(dataset), tmp_path / "runs")
    wait_until(lambda: runs.read_status(run_dir)["alive"], 10, "the process", run_dir)
    st = runs.stop_run(run_dir, timeout=60)
    assert st["state"] == "stopped", (st, runs.log_tail(run_dir, 40))
    assert st["step"] == 0 and not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_two_process_ddp_run_has_one_metrics_writer(env, dataset, tmp_path):
    t0 = time.monotonic()
    run_dir = runs.start_run(make_cfg(dataset, max_steps=6, eval_steps=3, save_steps=3), tmp_path / "runs", nproc=2)
    st = wait_final(run_dir, timeout=150)
    print(f"2-process DDP run: 6 steps, {time.monotonic() - t0:.1f} s wall including start-up")
    assert st["state"] == "completed" and st["step"] == 6, (st, runs.log_tail(run_dir, 60))
    assert st["nproc"] == 2
    launch = json.loads((run_dir / runs.LAUNCH).read_text())
    assert "accelerate.commands.launch" in launch["cmd"] and "--num_processes" in launch["cmd"]
    rows, _ = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6], "exactly one writer"
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    ckpt = run_dir / "checkpoints" / "checkpoint-6"
    assert {"rng_state_0.pth", "rng_state_1.pth", runs.COMPLETE_MARKER} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_two_process_ddp_stop_agrees_on_a_step(env, dataset, tmp_path):
    run_dir = runs.start_run(make_cfg(dataset, max_steps=300, eval_steps=1000, save_steps=1000), tmp_path / "runs",
                             nproc=2)
    wait_step(run_dir, 2, timeout=120)
    st = runs.stop_run(run_dir, timeout=60)
    assert st["state"] == "stopped", (st, runs.log_tail(run_dir, 40))
    step = st["step"]
    rows, _ = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, step + 1))
    assert runs.last_complete_checkpoint(run_dir).name == f"checkpoint-{step}"
    assert "SignalException" not in (run_dir / runs.LOG).read_text(), "the launcher ends cleanly"


@pytest.mark.slow
def test_classification_run_reports_eval_accuracy(env, tmp_path):
    """minilm-l6 + LoRA on a small labelled set: compute_metrics path, label mapping, head saved."""
    data = tmp_path / "sentiment.jsonl"
    pos, neg = ["great", "wonderful", "excellent", "superb"], ["terrible", "awful", "boring", "dreadful"]
    data.write_text("".join(json.dumps({"text": f"The film was {(pos if i % 2 else neg)[i % 4]}.",
                                        "label": "positive" if i % 2 else "negative"}) + "\n" for i in range(80)))
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "minilm-l6", "task": "seq_cls"},
        "data": {"path": str(data), "max_length": 32, "eval_fraction": 0.25},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "train": {"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 8, "eval_steps": 2,
                  "save_steps": 4, "warmup_ratio": 0.0},
    })
    run_dir = runs.start_run(cfg, tmp_path / "runs")
    st = wait_final(run_dir)
    assert st["state"] == "completed", (st, runs.log_tail(run_dir, 40))
    assert st["format"] == "classification" and st["eval_examples"] == 20
    rows, _ = runs.read_metrics(run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert st["eval_accuracy"] == evals[-1]["eval_accuracy"]
    keys = adapter_tensors(run_dir / "adapter")
    assert any("classifier" in k for k in keys), "the new head is trained and saved with the adapter"


@pytest.mark.slow
def test_stop_waits_for_a_slow_step_and_its_save(env, dataset, tmp_path, capsys):
    """Steps made slow (STUDIO_SLOW_STEP_S): `studio stop` says how long it expects from the run's own
    step and save times, waits for them and ends `stopped` with the step saved; nothing is killed.
    Killing happens only when asked (--wait SECONDS)."""
    from studio.cli import main

    slow = 2.5
    env.setenv("STUDIO_SLOW_STEP_S", str(slow))
    try:
        run_dir = runs.start_run(make_cfg(dataset, max_steps=200, save_steps=2, eval_steps=1000), tmp_path / "runs")
    finally:
        env.delenv("STUDIO_SLOW_STEP_S")
    wait_until(lambda: (runs.read_json(run_dir / runs.STATUS) or {}).get("save_s") is not None, 120,
               "a measured step and save", run_dir)
    st = runs.read_status(run_dir)
    assert st["step_s"] >= slow and st["save_s"] > 0 and st["state"] == "running"
    t0 = time.monotonic()
    rc = main(["stop", str(run_dir)])
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert rc == 0, (out, err, runs.log_tail(run_dir, 40))
    expected = float(re.search(r"waiting for the step in progress and the save, about (\d+) s", err).group(1))
    assert expected >= slow and "a step ~" in err and "never killed" in err
    st = runs.read_status(run_dir)
    with capsys.disabled():
        print(f"\nslow-step stop: step_s {st['step_s']:.2f} s, save_s {st['save_s']:.3f} s, expected {expected:.0f} s, "
              f"took {took:.1f} s")
    assert st["state"] == "stopped" and out.strip() == f"{run_dir.name}: stopped at step {st['step']}"
    assert st["adapter_step"] == st["step"] and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert runs.last_complete_checkpoint(run_dir).name == f"checkpoint-{st['step']}", "the step in progress is saved"
    assert st["adapter_save_s"] > 0

    env.setenv("STUDIO_SLOW_STEP_S", str(slow))
    try:
        runs.resume_run(run_dir)  # the same slow run again, now stopped with a wait shorter than its step
    finally:
        env.delenv("STUDIO_SLOW_STEP_S")
    wait_until(lambda: runs.read_status(run_dir)["phase"] == "training" and runs.read_status(run_dir)["alive"], 120,
               "training again", run_dir)
    rc = main(["stop", str(run_dir), "--wait", "0.2"])
    out, err = capsys.readouterr()
    st = runs.read_status(run_dir)
    assert rc == 0 and "killed if it has not stopped after 0.2 s" in err
    assert st["state"] == "failed" and "killed as asked" in st["error"] and not st["alive"]


@pytest.mark.slow
def test_continue_a_completed_run_from_its_final_adapter(completed, env, tmp_path, capsys):
    """`studio train --continue RUN --steps N`: a new run that records its parent and starts from the
    parent's final adapter, so its first loss is where the parent ended, not the untrained value."""
    from studio import cli

    assert cli.main(["train", "--continue", str(completed), "--steps", "6", "--runs-dir", str(tmp_path),
                     "--detach"]) == 0
    child = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert child.parent == tmp_path and child != completed
    st = wait_final(child)
    assert st["state"] == "completed" and st["step"] == 6, (st, runs.log_tail(child, 40))
    parent_st = runs.read_status(completed)
    assert st["parent"] == {"run": completed.name, "dir": str(completed.resolve()), "step": parent_st["step"],
                            "adapter_step": parent_st["adapter_step"]}
    assert runs.RunDir(child).parent()["run"] == completed.name
    assert (child / runs.CONFIG).read_text().count("max_steps: 6") == 1
    before, after = losses(completed), losses(child)
    untrained, ended = before[1], sum(before[s] for s in range(26, 31)) / 5
    print(f"parent step 1 {untrained:.3f}, parent last 5 {ended:.3f}, continued step 1 {after[1]:.3f}")
    # the continued run's first batch is the parent's first batch (same seed, same order)
    assert after[1] < untrained - 0.4 and abs(after[1] - ended) < abs(after[1] - untrained) / 3
    assert "continuing from" in runs.log_tail(child, 80)


def test_continue_refuses_runs_that_are_not_completed_and_bad_step_counts(tmp_path, capsys):
    from studio import cli

    run_dir = runs.create_run(make_cfg(tmp_path / "none.jsonl"), tmp_path)
    cases = [
        (["--continue", str(run_dir), "--steps", "5"], "is queued (step 0 of 30); only a completed run can be continued"),
        (["--continue", str(tmp_path / "nope"), "--steps", "5"], "is not a run folder (no config.yaml)"),
        (["--continue", str(run_dir)], "--continue RUN_DIR needs --steps N"),
        (["--steps", "5", "x.yaml"], "--steps goes with --continue RUN_DIR"),
    ]
    runs.write_json_atomic(run_dir / runs.STATUS, {**runs.read_json(run_dir / runs.STATUS), "state": "stopped"})
    cases[0] = (cases[0][0], "is stopped (step 0 of 30); only a completed run can be continued; resume it instead: "
                             f"studio train --resume {run_dir}")
    for args, needle in cases:
        assert cli.main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    runs.write_json_atomic(run_dir / runs.STATUS, {**runs.read_json(run_dir / runs.STATUS), "state": "completed"})
    for steps in ("0", "-3"):
        assert cli.main(["train", "--continue", str(run_dir), "--steps", steps]) == 2
        assert f"steps to continue for must be a whole number >= 1, got {steps}" in capsys.readouterr().err
    assert cli.main(["train", "--continue", str(run_dir), "--steps", "4"]) == 2  # completed, but no adapter
    assert "has no adapter/adapter_model.safetensors to continue from" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [run_dir.name]  # nothing was created
