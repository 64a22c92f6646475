"""Faults: killed trainers, stops during a save, a UI restarted mid-run, unwritable runs folders
and interrupted merges. Real trainer processes (tiny-llama, max_length 64, batch 2), real
signals, a real server on 127.0.0.1.

Saves are caught mid-way deterministically: a `sitecustomize.py` put on the trainer's
PYTHONPATH (studio.runs passes PYTHONPATH on) pauses `Trainer._save_checkpoint` at a chosen
step, after the adapter weights are written but before the optimizer, trainer_state.json and
the completion marker, or right after Trainer deleted older checkpoints (save_total_limit).
It touches a sentinel file when it pauses, so the test signals exactly then.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import load_file

import studio.ui.app  # noqa: F401  (imported before any run starts: the import takes seconds)
from studio import cli, runs
from studio.config import RunConfig
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import train as train_tab

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
DETECT_LIMIT_S = 3.0

HOOK = '''\
"""Fault-test hook (tests/test_faults.py): pause the trainer inside a checkpoint save."""
import os

_where = os.environ.get("STUDIO_TEST_PAUSE")
if _where:
    import time
    from pathlib import Path

    import transformers.trainer as _tt

    _step = int(os.environ["STUDIO_TEST_PAUSE_STEP"])
    _secs = float(os.environ["STUDIO_TEST_PAUSE_S"])
    _flag = Path(os.environ["STUDIO_TEST_SENTINEL"])

    def _pause():
        if not _flag.exists():  # once: a resumed trainer saving the same step again does not stop
            _flag.write_text(str(_step))
            time.sleep(_secs)

    if _where == "save":  # adapter files written; optimizer, trainer_state.json and marker not yet
        _orig = _tt.Trainer._save_optimizer_and_scheduler

        def _save_opt(self, output_dir):
            if self.state.global_step == _step:
                _pause()
            return _orig(self, output_dir)

        _tt.Trainer._save_optimizer_and_scheduler = _save_opt
    elif _where == "rotate":  # older checkpoints deleted; the new one has no marker yet
        _orig_rot = _tt.rotate_checkpoints

        def _rotate(output_dir, *a, **kw):
            _orig_rot(output_dir, *a, **kw)
            if os.path.isdir(os.path.join(output_dir, f"checkpoint-{_step}")):
                _pause()

        _tt.rotate_checkpoints = _rotate
'''


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = [{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]} for w in WORDS * 25]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def trainer_env(monkeypatch, tmp_path):
    """Environment for spawned trainers: one thread each, the pause hook importable (inactive)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.delenv("STUDIO_INJECT_NAN_AT_STEP", raising=False)
    monkeypatch.delenv("STUDIO_TEST_PAUSE", raising=False)

    def pause(where: str, step: int, seconds: float) -> Path:
        sentinel = tmp_path / f"paused-{where}-{step}"
        monkeypatch.setenv("STUDIO_TEST_PAUSE", where)
        monkeypatch.setenv("STUDIO_TEST_PAUSE_STEP", str(step))
        monkeypatch.setenv("STUDIO_TEST_PAUSE_S", str(seconds))
        monkeypatch.setenv("STUDIO_TEST_SENTINEL", str(sentinel))
        return sentinel

    return pause


def config(dataset: Path, **train) -> RunConfig:
    t = dict(learning_rate=1e-3, max_steps=100_000, per_device_train_batch_size=2, logging_steps=1, save_steps=10,
             warmup_ratio=0.0, seed=1)
    t.update(train)
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(dataset), "max_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": t})


def wait_until(pred, timeout: float, what: str, run_dir: Path | None = None, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                         + (runs.log_tail(run_dir, 30) if run_dir else ""))


def kill_all(root: Path) -> None:
    """Teardown: no trainer outlives its test (a paused one is killed after 5 s)."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d / runs.STATUS).exists():
                runs.stop_run(d, timeout=5)


def kill9(run_dir: Path) -> float:
    """SIGKILL the trainer; the monotonic time of the kill."""
    pid = runs.read_status(run_dir)["pid"]
    assert pid, runs.read_status(run_dir)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def wait_failed(run_dir: Path, killed_at: float) -> tuple[dict, float]:
    st = wait_until(lambda: (s := runs.read_status(run_dir))["state"] == "failed" and s, DETECT_LIMIT_S,
                    "the failed state", run_dir, step=0.005)
    return st, time.monotonic() - killed_at


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / runs.CHECKPOINTS / f"checkpoint-{step}"


def assert_valid_checkpoint(folder: Path, step: int) -> None:
    """Complete and usable: marker, trainer state of that step, finite adapter weights."""
    assert (folder / runs.COMPLETE_MARKER).is_file(), sorted(p.name for p in folder.iterdir())
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file()


# --- a live run, a UI started while it trains, then SIGKILL ------------------------------------

@pytest.fixture(scope="module")
def live(dataset, tmp_path_factory, free_port):
    """A training run and a UI server built after it started (a restart of the UI, in effect)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.delenv("STUDIO_INJECT_NAN_AT_STEP", raising=False)
    mp.delenv("STUDIO_TEST_PAUSE", raising=False)
    root = tmp_path_factory.mktemp("live") / "runs"
    run_dir = runs.start_run(config(dataset), root)
    demo = None
    try:
        wait_until(lambda: runs.read_status(run_dir)["step"] >= 5, 90, "step 5", run_dir)
        from gradio_client import Client

        from studio.ui.app import launch

        port = free_port()
        demo = launch(port=port, runs_dir=root, prevent_thread_lock=True, quiet=True)
        yield run_dir, Client(f"http://127.0.0.1:{port}", verbose=False), port
    finally:
        kill_all(root)
        if demo is not None:
            demo.close()
        mp.undo()


def metric_steps(run_dir: Path) -> list[int]:
    rows, _ = runs.read_metrics(run_dir)
    return [r["step"] for r in rows if "loss" in r]


def plotted_steps(fig) -> list[int]:
    trace = next(t for t in fig["data"] if t.get("name") == "train loss")
    return [int(x) for x in trace["x"]]


def poll(port: int) -> tuple[str, dict | None]:
    """What the Train tab's live view asks a fresh page: (run-status HTML, the whole chart)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/studio/live", timeout=30) as r:
        d = json.loads(r.read())
    return d["status"], d.get("plot")


@pytest.mark.slow
def test_new_ui_finds_the_running_run_and_its_whole_curve(live):
    run_dir, client, port = live
    attached = client.predict(api_name="/page_load")[-1]  # what a fresh page does first: re-attach to the active run
    assert attached == {"run": run_dir.name, "active": True}, attached
    before = metric_steps(run_dir)
    status, plot = poll(port)
    assert run_dir.name in status and "st-running" in status, status
    shown = plotted_steps(plot)
    # the whole curve from step 1, not only what was logged after the UI came up
    assert shown[:5] == [1, 2, 3, 4, 5] and len(shown) >= len(before)
    assert shown == metric_steps(run_dir)[:len(shown)]
    wait_until(lambda: runs.read_status(run_dir)["step"] >= shown[-1] + 3, 30, "more steps", run_dir)
    status, plot = poll(port)
    again = plotted_steps(plot)
    assert len(again) > len(shown) and again[:len(shown)] == shown  # it keeps following


@pytest.mark.slow
def test_unwritable_runs_folder_is_a_clear_error_and_the_server_stays_up(live, tmp_path):
    run_dir, client, port = live
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    root = run_dir.parent
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(4)))
    (root / "uploads").write_text("a file where the uploads folder should be")  # root ignores chmod: this fails for root too
    try:
        with pytest.raises(AppError, match="cannot save the upload in .*uploads"):
            client.predict(handle_file(str(good)), api_name="/upload_dataset")
    finally:
        (root / "uploads").unlink()
    status, _ = poll(port)  # the app is still up and answering
    assert run_dir.name in status
    # Start and upload handlers, in-process, with the whole runs folder a file
    blocked = tmp_path / "runs-is-a-file"
    blocked.write_text("")
    form = train_tab.form_for("tiny-llama", module_tree=["model.layers.0-3.self_attn.q_proj"], lora_r=4,
                              lora_alpha=8, dataset_select=str(good), max_length=64, max_steps=5)
    with pytest.raises(gr.Error, match=f"cannot write the runs folder {blocked}"):
        train_tab.start(blocked, form)
    with pytest.raises(gr.Error, match="cannot save the upload"):
        data_tab.save_upload(str(good), blocked)
    assert blocked.read_text() == ""


@pytest.mark.slow
def test_sigkill_mid_step_shows_failed_with_log_tail_then_resumes(live, capsys):
    run_dir, client, port = live
    wait_until(lambda: runs.last_complete_checkpoint(run_dir), 60, "a complete checkpoint", run_dir)
    step_before = runs.read_status(run_dir)["step"]
    killed_at = kill9(run_dir)
    st, took = wait_failed(run_dir, killed_at)
    with capsys.disabled():
        print(f"\nfault timing: SIGKILL mid-step -> read_status 'failed' in {took * 1000:.1f} ms (step {step_before})")
    tail = runs.log_tail(run_dir)
    assert tail and st["error"].endswith(tail) and "ended without writing a final state" in st["error"]

    # studio runs, text and JSON
    assert cli.main(["runs", "--runs-dir", str(run_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert any(run_dir.name in line and " failed " in line for line in out.splitlines()), out
    assert cli.main(["runs", "--runs-dir", str(run_dir.parent), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert listed[0]["state"] == "failed" and listed[0]["error"].endswith(tail)
    # the UI, through the server: failed badge and the log tail in place
    status, _ = poll(port)
    assert "st-failed" in status and "rs-err" in status and "ended without writing a final state" in status
    assert time.monotonic() - killed_at < DETECT_LIMIT_S + 2  # well within a poll or two

    # partial checkpoints of every kind, numbered above the real ones: never picked
    good = runs.last_complete_checkpoint(run_dir)
    n = int(good.name.split("-")[1])
    import shutil

    partial = {}
    for k, drop in ((1000, runs.COMPLETE_MARKER), (2000, "adapter_model.safetensors"), (3000, "trainer_state.json")):
        partial[drop] = d = ckpt(run_dir, n + k)
        shutil.copytree(good, d)
        (d / drop).unlink()
    (run_dir / runs.CHECKPOINTS / f"checkpoint-{n + 4000}").write_text("not a folder")
    assert runs.last_complete_checkpoint(run_dir) == good
    assert_valid_checkpoint(good, n)

    runs.resume_run(run_dir)
    resumed = wait_until(lambda: [r for r in runs.read_metrics(run_dir)[0] if r.get("event") == "resumed"],
                         60, "the resumed event", run_dir)
    assert resumed[0]["step"] == n and resumed[0]["checkpoint"] == good.name
    wait_until(lambda: runs.read_status(run_dir)["step"] > n, 30, "a step after the resume", run_dir)
    log = (run_dir / runs.LOG).read_text()
    assert f"resuming from {good.name}" in log and "deleted partial checkpoints" in log
    # a folder without the marker (what a kill mid-save leaves) is deleted; the marked ones with a
    # file missing cannot come from a kill, only from outside: they stay, never picked
    assert not partial[runs.COMPLETE_MARKER].exists(), "partial checkpoints are removed on resume"
    st = runs.stop_run(run_dir, timeout=60)
    assert st["state"] == "stopped" and st["step"] > n, st


# --- signals during a checkpoint save ----------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(dataset, trainer_env, tmp_path):
    sentinel = trainer_env("save", 20, 60)
    root = tmp_path / "runs"
    run_dir = runs.start_run(config(dataset), root)
    try:
        wait_until(sentinel.exists, 90, "the save of checkpoint-20 to begin", run_dir)
        partial = ckpt(run_dir, 20)
        assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
        killed_at = kill9(run_dir)
        st, took = wait_failed(run_dir, killed_at)
        print(f"\nfault timing: SIGKILL during a save -> 'failed' in {took * 1000:.1f} ms")
        assert runs.last_complete_checkpoint(run_dir) == ckpt(run_dir, 10)
        assert_valid_checkpoint(ckpt(run_dir, 10), 10)
        assert not (partial / runs.COMPLETE_MARKER).exists()
    finally:
        kill_all(root)


@pytest.mark.slow
def test_stop_during_a_save_finishes_it_and_ends_stopped(dataset, trainer_env, tmp_path):
    sentinel = trainer_env("save", 20, 2.0)
    root = tmp_path / "runs"
    run_dir = runs.start_run(config(dataset), root)
    try:
        wait_until(sentinel.exists, 90, "the save of checkpoint-20 to begin", run_dir)
        st = runs.stop_run(run_dir)  # the UI's Stop: stop.request + SIGTERM, mid-save
        assert st["state"] == "stopping"
        assert runs.last_complete_checkpoint(run_dir) == ckpt(run_dir, 10)  # valid all along
        st = runs.stop_run(run_dir, timeout=60)
        assert st["state"] == "stopped", st
        assert st["step"] in (20, 21), st  # the step after the save ends training (or the save's own step)
        for d in (run_dir / runs.CHECKPOINTS).iterdir():
            assert_valid_checkpoint(d, int(d.name.split("-")[1]))  # nothing half-written is left
        assert_valid_checkpoint(ckpt(run_dir, 20), 20)
        assert runs.last_complete_checkpoint(run_dir) == ckpt(run_dir, st["step"])
        assert (run_dir / runs.ADAPTER / "adapter_model.safetensors").is_file()
    finally:
        kill_all(root)


@pytest.mark.slow
def test_sigkill_after_rotation_before_the_marker_keeps_a_complete_checkpoint(dataset, trainer_env, tmp_path):
    sentinel = trainer_env("rotate", 20, 60)
    root = tmp_path / "runs"
    run_dir = runs.start_run(config(dataset, save_total_limit=1), root)
    try:
        wait_until(sentinel.exists, 90, "the rotation at checkpoint-20", run_dir)
        kill9(run_dir)
        wait_failed(run_dir, time.monotonic())
        assert runs.last_complete_checkpoint(run_dir) is not None, \
            sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir())
    finally:
        kill_all(root)


# --- an unwritable runs folder from the CLI ---------------------------------------------------

def test_cli_runs_folder_that_is_a_file_exits_2_with_one_line(dataset, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    config(dataset, max_steps=5).save(cfg)
    blocked = tmp_path / "runs"
    blocked.write_text("")
    assert cli.main(["train", str(cfg), "--runs-dir", str(blocked), "--detach"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"runs folder {blocked} is a file, not a folder" in err[0], err
    assert cli.main(["train", str(cfg), "--runs-dir", str(blocked / "sub"), "--detach"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert blocked.read_text() == ""


@pytest.mark.slow
def test_cli_disk_full_exits_1_with_one_line(dataset, tmp_path):
    """RLIMIT_FSIZE makes every write past 64 bytes fail with EFBIG, for root too: a full disk."""
    cfg = tmp_path / "run.yaml"
    config(dataset, max_steps=5).save(cfg)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    p = subprocess.run([sys.executable, "-m", "studio", "train", str(cfg), "--runs-dir", str(tmp_path / "runs"),
                        "--detach"], preexec_fn=limit, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0] == f"studio train: failed: cannot write the runs folder {tmp_path / 'runs'}: File too large"
    assert runs.list_runs(tmp_path / "runs") == []  # nothing half-made is listed as a run
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")] == []  # nor left as a folder
    assert runs.active_run(tmp_path / "runs") is None  # and no trainer was started


# --- merges interrupted half-way --------------------------------------------------------------

@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from studio.models import load_model, model_dir

    base = model_dir("tiny-llama")
    model = load_model("tiny-llama", dtype="float32")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(adapter)
    return base, adapter


class Cancelled(Exception):
    pass


def looks_complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def test_merge_cancelled_from_progress_leaves_nothing(base_and_adapter, tmp_path):
    from studio.export.merge import merge

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    seen = []

    def cancel_half_way(done, total, what):
        seen.append(done)
        if done == total // 2:
            raise Cancelled(what)

    for exc in (Cancelled, KeyboardInterrupt):  # a cancel button, and Ctrl-C
        def progress(done, total, what, exc=exc):
            if done == total // 2:
                raise exc(what)
        with pytest.raises(exc):
            merge(base, adapter, out, progress=progress)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output and no hidden partial"

    # over an earlier complete merge (overwrite): the earlier one stays whole
    report = merge(base, adapter, out, progress=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(Cancelled):
        merge(base, adapter, out, overwrite=True, progress=cancel_half_way)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and report.tensors_merged == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


MERGE_DRIVER = """
import sys, time
from pathlib import Path
from studio.export.merge import merge
base, adapter, out, flag = sys.argv[1:5]
def slow(done, total, what):
    Path(flag).write_text(f"{done} {total}")
    time.sleep(0.05)
merge(base, adapter, out, progress=slow)
"""


@pytest.mark.slow
def test_merge_process_killed_half_way_leaves_only_a_hidden_partial(base_and_adapter, tmp_path):
    from studio.export.merge import merge

    base, adapter = base_and_adapter
    out, flag = tmp_path / "merged", tmp_path / "progress"
    proc = subprocess.Popen([sys.executable, "-c", MERGE_DRIVER, str(base), str(adapter), str(out), str(flag)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE)
    try:
        def half():
            parts = flag.read_text().split() if flag.exists() else []
            return len(parts) == 2 and int(parts[0]) >= int(parts[1]) // 2
        wait_until(half, 90, "the merge to reach half way")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "progress")
    assert not out.exists() and left and all(n.startswith(".merged.partial-") for n in left), left
    assert not any(looks_complete(tmp_path / n) for n in left)
    merge(base, adapter, out)  # the next merge clears what the killed one left
    assert looks_complete(out) and (out / "merge_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "progress") == ["merged"]
