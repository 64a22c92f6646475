"""The trainer's memory limit, its peaks, and out-of-memory reports, for real: tiny-llama trainers on
CPU, one under a limit it cannot fit in. Nothing here fakes the failure: the allocation really fails
under the trainer's RLIMIT_DATA, or the kernel really kills the trainer in a small cgroup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from studio import runs
from studio.cli import main
from studio.config import RunConfig
from studio.runs import memory_guard as mg
from studio.runs import preflight as pf

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit"]
# tiny-llama's step at micro-batch 16 x 1024 holds about 2.2 GB (preflight's estimate); the trainer
# itself, loaded, about 0.7 GB. This limit lets it load and start, and not finish the first step.
LIMIT = 1_300_000_000


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(mg.LIMIT_ENV, raising=False)
    monkeypatch.delenv(pf.MEMORY_ENV, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Enough text to pack 16 blocks of 1024 tokens (byte-level tokenizer: about a token a character)."""
    path = tmp_path_factory.mktemp("data") / "words.jsonl"
    rows = [{"instruction": "Repeat the words.", "input": " ".join(WORDS[(i + k) % 10] for k in range(8)),
             "output": " ".join(WORDS[(i * 3 + k) % 10] for k in range(8))} for i in range(600)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_file(tmp_path: Path, dataset: Path, batch: int, max_length: int, steps: int) -> tuple[Path, RunConfig]:
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(dataset), "max_length": max_length, "packing": True, "eval_fraction": 0.0},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": steps, "per_device_train_batch_size": batch, "logging_steps": 1,
                  "save_steps": 1000, "seed": 3},
    })
    path = tmp_path / "run.yaml"
    cfg.save(path)
    return path, cfg


def only_run(root: Path) -> Path:
    (run_dir,) = [d for d in root.iterdir() if d.is_dir()]
    return run_dir


def test_a_run_over_the_trainers_memory_limit_fails_out_of_memory_with_step_peak_and_advice(
        env, dataset, tmp_path, capsys):
    path, cfg = cfg_file(tmp_path, dataset, batch=16, max_length=1024, steps=3)
    env.setenv(mg.LIMIT_ENV, str(LIMIT))
    root = tmp_path / "runs"
    # preflight compares with the trainer's limit and refuses first; --ignore-memory insists
    assert main(["train", str(path), "--runs-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"(the trainer's memory limit ({mg.LIMIT_ENV}))" in err and "will not fit" in err
    assert main(["train", str(path), "--runs-dir", str(root), "--ignore-memory"]) == 1
    err = capsys.readouterr().err

    run_dir = only_run(root)
    st = runs.read_status(run_dir)
    assert st["state"] == "failed" and not st["alive"], st
    m = re.fullmatch(r"out of memory at step 1 \(peak (\d+\.\d\d) GB\): (?:an allocation of [\d,.]+ MB failed|MemoryError: .*?) under "
                     rf"the trainer's memory limit of {LIMIT / 2**30:.2f} GB \({mg.LIMIT_ENV}\)\. (.*)", st["error"])
    assert m, st["error"]
    peak = float(m.group(1)) * 2**30
    assert 0.3 * LIMIT < peak < LIMIT + 64 * 2**20, "the trainer held itself under its limit"
    # the suggestions are preflight's, against the same limit, and each of them fits it
    _, advice = pf.advice_for_limit(cfg, LIMIT, "cpu")
    assert m.group(2) == advice and advice.startswith("Any of these would fit: ")
    assert "train.per_device_train_batch_size 4 + train.gradient_accumulation_steps 4" in advice
    sizes = [float(x) * 2**30 for x in re.findall(r": ([\d.]+) GB", advice)]
    assert sizes and all(s <= LIMIT for s in sizes), advice
    assert st["memory"]["mechanism"] == "RLIMIT_DATA" and st["memory"]["limit_bytes"] == LIMIT
    # the CLI said it on exit, and `studio runs` says it
    assert f"run failed: {st['error']}" in err
    assert main(["runs", "--runs-dir", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert listed[0]["state"] == "failed" and listed[0]["error"] == st["error"]
    assert main(["runs", "--runs-dir", str(root)]) == 0
    assert f"\n    {st['error']}\n" in capsys.readouterr().out
    assert not runs.RunDir(run_dir).adapter.exists(), "nothing half-written"
    # and the UI's status line shows status.json's error
    from studio.ui.live import status_view

    html, _, active = status_view(run_dir)
    assert not active and "out of memory at step 1 (peak" in html and "Any of these would fit" in html


def test_peaks_are_logged_every_step_and_shown_in_the_status_line(env, dataset, tmp_path):
    _, cfg = cfg_file(tmp_path, dataset, batch=2, max_length=128, steps=4)
    run_dir = runs.start_run(cfg, tmp_path / "runs")
    deadline = time.monotonic() + 180
    while (st := runs.read_status(run_dir))["state"] not in runs.FINAL_STATES or st["alive"]:
        assert time.monotonic() < deadline, runs.log_tail(run_dir, 30)
        time.sleep(0.2)
    assert st["state"] == "completed", (st, runs.log_tail(run_dir, 30))
    rows = [r for r in runs.read_metrics(run_dir)[0] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    peaks = [r["peak_rss_mb"] for r in rows]
    assert all(200 < p < 8000 for p in peaks) and peaks == sorted(peaks), peaks
    assert not any("peak_gpu_mb" in r for r in rows), "no GPU here"
    assert st["peak_rss_mb"] >= peaks[-1]
    mem = st["memory"]
    assert mem["mechanism"] == "RLIMIT_DATA" and mem["limit_source"].startswith(("RAM available", "room under"))
    assert mem["estimate_bytes"] > 0 and mem["advice"]
    from studio.ui.live import status_view

    html, _, _ = status_view(run_dir)
    assert f"peak RAM {st['peak_rss_mb'] / 1024:.2f} of {mem['limit_bytes'] / 2**30:.2f} GB" in html


def test_a_bad_limit_is_one_line_naming_it(env, dataset, tmp_path, capsys):
    path, _ = cfg_file(tmp_path, dataset, batch=2, max_length=128, steps=2)
    env.setenv(mg.LIMIT_ENV, "8G")
    assert main(["train", str(path), "--runs-dir", str(tmp_path / "runs"), "--ignore-memory"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"studio train: {mg.LIMIT_ENV}='8G': give the trainer's memory limit as a whole number of bytes, "
                   "e.g. 8000000000, or off; unset, it is the RAM available less a margin")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_real_allocation_failures_count_as_out_of_memory():
    # a child process under RLIMIT_DATA, as the trainer is: both ways an allocation fails there
    code = ("import resource, torch\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (resource.getrlimit(resource.RLIMIT_DATA)[0], -1))\n"
            "from studio.runs import memory_guard as mg\n"
            "g = mg.Guard(mg._proc_status('VmRSS') + 200 * 2**20, 'test'); g.apply()\n"
            "out = []\n"
            "for make in (lambda: torch.empty(2**28).fill_(1), lambda: bytearray(2**30)):\n"
            "    try:\n        make(); out.append('no error')\n"
            "    except BaseException as e:\n        out.append(f'{mg.is_oom(e)} {type(e).__name__} {mg.failure_detail(e, None)[:60]}')\n"
            "print('\\n'.join(out))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    torch_line, python_line = p.stdout.strip().splitlines()
    assert torch_line == "True RuntimeError an allocation of 1,024.0 MB failed", torch_line
    assert python_line.startswith("True MemoryError"), python_line
    assert not mg.is_oom(RuntimeError("shape mismatch")) and not mg.is_oom(ValueError("out of range"))


def _cgroup_v1_dir() -> Path | None:
    """A fresh memory cgroup (v1) under this process's own, when this machine lets us make one."""
    files = mg.cgroup_files()
    if "limit" not in files or "memory.limit_in_bytes" != files["limit"].name or os.geteuid() != 0:
        return None
    d = files["limit"].parent / f"studio-test-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir()
    except OSError:
        return None
    return d


def test_a_trainer_killed_by_its_cgroups_oom_killer_is_reported_out_of_memory(env, dataset, tmp_path):
    cg = _cgroup_v1_dir()
    if cg is None:
        pytest.skip("needs root and a cgroup v1 memory controller to give a trainer a small cgroup")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(LIMIT))
        with open(cg / "memory.memsw.limit_in_bytes", "w") as f:  # no swap to escape to, when swap is accounted
            f.write(str(LIMIT))
    except OSError:
        pass
    try:
        env.setenv(mg.LIMIT_ENV, "off")  # the trainer's own limit off: the kernel's OOM killer acts
        _, cfg = cfg_file(tmp_path, dataset, batch=16, max_length=1024, steps=3)
        run_dir = runs.start_run(cfg, tmp_path / "runs")
        pid = runs.RunDir(run_dir).read_launch()["pid"]
        (cg / "cgroup.procs").write_text(str(pid))  # before its imports: what it allocates is charged here
        deadline = time.monotonic() + 180
        while (st := runs.read_status(run_dir))["alive"] or st["state"] not in runs.FINAL_STATES:
            assert time.monotonic() < deadline, runs.log_tail(run_dir, 30)
            time.sleep(0.2)
        assert st["state"] == "failed", st
        assert re.match(r"out of memory at step [01] \(peak \d+\.\d\d GB\): (the kernel's|its cgroup's) OOM killer "
                        r"ended the trainer", st["error"]), st["error"]
        assert "Any of these would fit" in st["error"] or "These together would fit" in st["error"]
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
