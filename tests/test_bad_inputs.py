"""The bad-input corpus (tests/data/bad/cases.yaml) through the CLI and the UI handlers.

Every case must give one line naming the problem, exit status 2 from the CLI and a gr.Error in
the UI, and leave nothing behind: no run folder, no upload, no merged folder (not even a hidden
partial one). Most CLI calls run in-process (`studio.cli.main`); the cases marked `subprocess`
also go through a real `python -m studio`, all at once, to prove the exit status and that no
traceback or progress bar reaches stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import yaml

from studio import cli, runs
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import export as export_tab
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import train as train_tab

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "data" / "bad"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text())["cases"]
GOOD_DATA = "assets/datasets/instructions.jsonl"
LLAMA = {"ref": "tiny-llama", "task": "causal_lm", "explore_only": False}
# A good run config; each case swaps in its bad piece.
GOOD = {"model": {"name_or_path": "tiny-llama", "task": "causal_lm"},
        "data": {"path": GOOD_DATA, "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"learning_rate": 0.002, "max_steps": 5, "per_device_train_batch_size": 2}}


def case_id(c: dict) -> str:
    return c["file"]


def by_use(*uses: str) -> list[dict]:
    return [pytest.param(c, id=case_id(c)) for c in CASES if c["use"] in uses]


# --- the corpus itself ----------------------------------------------------------------------

def test_corpus_has_every_kind_and_every_file_is_listed():
    listed = {c["file"] for c in CASES if not c.get("generate")}
    on_disk = {p.name for p in BAD.iterdir() if p.name != "cases.yaml"}
    assert listed == on_disk, f"not in cases.yaml: {on_disk - listed}; missing on disk: {listed - on_disk}"
    assert len(on_disk) >= 25
    uses = {c["use"] for c in CASES}
    assert uses == {"dataset", "config", "model", "adapter"}
    assert (BAD / "empty.jsonl").stat().st_size == 0


def materialize(case: dict, tmp: Path) -> Path:
    """The case's file: from the corpus, or generated into tmp."""
    if case.get("generate") == "huge_line":
        # 3 MB on one line between two good ones: kept out of git, made here.
        p = tmp / case["file"]
        with open(p, "w") as f:
            f.write(json.dumps({"text": "short one"}) + "\n")
            f.write(json.dumps({"text": "word " * (3 * 2**20 // 5)}) + "\n")
            f.write(json.dumps({"text": "short two"}) + "\n")
        return p
    return BAD / case["file"]


def cli_config(case: dict, tmp: Path) -> Path:
    """The config `studio train` gets for this case."""
    if case["use"] == "config":
        return BAD / case["file"]
    cfg = json.loads(json.dumps(GOOD))
    if case["use"] == "dataset":
        cfg["data"]["path"] = str(materialize(case, tmp))
    elif case["use"] == "model":
        cfg["model"]["name_or_path"] = str(BAD / case["file"])
    path = tmp / f"{case['file']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from studio.models import model_dir

    return model_dir("tiny-llama")


def cli_argv(case: dict, tmp: Path, base: Path) -> list[str]:
    if case["use"] == "adapter":
        return ["merge", "--base", str(base), "--adapter", str(BAD / case["file"]), "--out", str(tmp / "out")]
    # --detach: were a case wrongly accepted, the call returns instead of following a run
    return ["train", str(cli_config(case, tmp)), "--runs-dir", str(tmp / "runs"), "--detach"]


def assert_nothing_written(tmp: Path) -> None:
    made = sorted(p.name for p in (tmp / "runs").iterdir()) if (tmp / "runs").exists() else []
    for d in (tmp / "runs").glob("*") if (tmp / "runs").exists() else []:
        if d.is_dir():
            runs.stop_run(d, timeout=10)  # a wrongly started trainer must not outlive the test
    assert made == [], f"run folder(s) written: {made}"
    left = sorted(p.name for p in tmp.iterdir() if p.name == "out" or p.name.startswith(".out"))
    assert left == [], f"merge output written: {left}"


# --- CLI, in-process --------------------------------------------------------------------------

@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c)) for c in CASES])
def test_cli_refuses_with_one_line_and_exit_2(case, tmp_path, base_dir, capsys):
    rc = cli.main(cli_argv(case, tmp_path, base_dir))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert case["expect"] in lines[0], lines[0]
    assert out == "" and "Traceback" not in err
    assert_nothing_written(tmp_path)


# --- CLI, real processes ---------------------------------------------------------------------

@pytest.mark.slow
def test_cli_subprocesses_exit_2_with_one_line(tmp_path, base_dir):
    cases = [c for c in CASES if c.get("subprocess")]
    assert {c["use"] for c in cases} == {"dataset", "config", "model", "adapter"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for c in cases:  # all at once: the import of torch dominates and overlaps
        d = tmp_path / c["file"]
        d.mkdir()
        procs.append((c, d, subprocess.Popen([sys.executable, "-m", "studio", *cli_argv(c, d, base_dir)], cwd=ROOT,
                                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for c, d, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, f"{c['file']}: exit {p.returncode}; stderr:\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and c["expect"] in lines[0], f"{c['file']}: stderr:\n{err}"
        assert lines[0].startswith(("studio train: ", "studio merge: ")) and out == ""
        assert_nothing_written(d)


# --- UI handlers ----------------------------------------------------------------------------

def lora_values(r=4, lora_alpha=8, lora_dropout=0.0, keys=("model.layers.0-3.self_attn.q_proj",)):
    return {"model.module_tree": list(keys), "model.layers": "", "model.lora_r": r, "model.lora_alpha": lora_alpha,
            "model.lora_dropout": lora_dropout, "model.bias": "none", "model.use_rslora": False,
            "model.use_dora": False, "model.modules_to_save": "", "model.rank_pattern": ""}


def data_values(path):
    return {"data.dataset_select": str(path), "data.data_format": "auto", "data.eval_fraction": 0.1,
            "data.max_length": 64, "data.packing": True, "data.train_on_prompt": False}


def train_values(learning_rate=2e-3, max_steps=5, lr_scheduler_type="cosine"):
    return {"train.learning_rate": learning_rate, "train.max_steps": max_steps, "train.num_train_epochs": 1,
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
            "train.lr_scheduler_type": lr_scheduler_type, "train.warmup_ratio": 0.0, "train.eval_steps": 5,
            "train.save_steps": 5, "train.seed": 0, "train.gradient_checkpointing": False, "train.precision": "auto",
            "train.optim": "adamw", "train.quantization": "none"}


def form(state, lora, data, train):
    """The Train tab's form by name, as Start reads it."""
    return {"model.state": state, **lora, **data, **train}


def ui_error(fn, *args) -> str:
    with pytest.raises(gr.Error) as e:
        fn(*args)
    msg = e.value.message
    assert "\n" not in msg.strip(), msg
    return msg


@pytest.mark.parametrize("case", by_use("dataset"))
def test_ui_dataset_upload_preview_and_start_refuse(case, tmp_path):
    path = materialize(case, tmp_path)
    root = tmp_path / "runs"
    want = case.get("ui_expect", case["expect"])
    assert want in ui_error(data_tab.save_upload, str(path), root)
    assert not (root / "uploads").exists() or not any((root / "uploads").iterdir())
    if case.get("generate") is None:  # the Data tab shows the message in place (no exception)
        rows, info, error = data_tab.preview(str(path), "auto", 64, LLAMA)
        assert rows == [] and case["expect"] in error and "⚠" in info
    assert case["expect"] in ui_error(train_tab.start, root, form(LLAMA, lora_values(), data_values(path), train_values()))
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("case", [p for p in by_use("config") if p.values[0].get("ui")])
def test_ui_train_form_refuses_the_same_settings(case, tmp_path):
    ui = case["ui"]
    lv = lora_values(**{k: v for k, v in ui.get("lora", {}).items()})
    tv = train_values(**ui.get("train", {}))
    root = tmp_path / "runs"
    msg = ui_error(train_tab.start, root, form(LLAMA, lv, data_values(GOOD_DATA), tv))
    assert case.get("ui_expect", case["expect"]) in msg
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("case", by_use("model"))
def test_ui_model_folder_refused_at_load_or_start(case, tmp_path):
    root = tmp_path / "runs"
    ref = str(BAD / case["file"])
    try:
        _, _, summary, state = model_tab.load(ref)
    except gr.Error as e:  # not even explorable
        assert case["expect"] in e.message
        return
    assert state["explore_only"] and "explore only" in summary
    msg = ui_error(train_tab.start, root, form(state, lora_values(), data_values(GOOD_DATA), train_values()))
    assert case["file"] in msg and ("explore-only" in msg or "pickled" in msg)
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("case", by_use("adapter"))
def test_ui_merge_of_a_bad_adapter_refuses_and_writes_nothing(case, tmp_path):
    root = tmp_path / "runs"
    run = root / "bad-run"
    run.mkdir(parents=True)
    (run / runs.CONFIG).write_text(yaml.safe_dump(GOOD))
    shutil.copytree(BAD / case["file"], run / runs.ADAPTER)
    want = case.get("ui_expect", case["expect"]).replace(f"{case['file']}/", "adapter/")
    assert want in ui_error(export_tab.merge, root, "bad-run", "float32", False)
    assert sorted(p.name for p in run.iterdir()) == sorted([runs.CONFIG, runs.ADAPTER])


# --- what the corpus found --------------------------------------------------------------------

def test_huge_line_is_refused_before_any_tokenizer_sees_it(tmp_path):
    """A 3 MB line used to cost the Data tab preview 6 s and 1 GB (20 MB: 36 s and 6 GB)."""
    import time

    case = next(c for c in CASES if c.get("generate") == "huge_line")
    path = materialize(case, tmp_path)
    t0 = time.perf_counter()
    rows, info, error = data_tab.preview(str(path), "auto", 64, LLAMA)
    assert case["expect"] in error and time.perf_counter() - t0 < 2.0
    # JSON documents are often written on one line: the limit is then per value, not per line.
    doc = tmp_path / "one_line.json"
    doc.write_text(json.dumps([{"text": "word " * 1000} for _ in range(400)]))  # 2 MB, one line
    assert data_tab.preview(str(doc), "auto", 64, LLAMA)[2] is None
    doc.write_text(json.dumps([{"text": "a"}, {"text": "b" * (2 * 2**20)}]))
    assert "one_line.json: item 1: text is 2.0 MB long" in data_tab.preview(str(doc), "auto", 64, LLAMA)[2]


def test_preview_tokenizes_a_bounded_amount_of_text(tmp_path):
    """200 examples of 0.9 MB (a 180 MB upload) are previewed over the first ~1M characters only."""
    from studio import data

    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": "x" * 300_000}) + "\n")
    p = data.preview(str(path), data_tab.models.load_tokenizer("tiny-llama"), n=3, max_length=64)
    assert p["num_rows"] == 40 and p["token_stats"]["counted"] == 3


def test_prompt_only_packed_blocks_are_dropped_so_no_batch_has_a_nan_loss(tmp_path):
    """Long prompts and one-word answers: some 64-token blocks hold no response token. A batch of
    only such blocks has loss 0/0 = NaN, and runs were reported `diverged` at random steps."""
    from studio import data
    from studio.config import RunConfig

    path = tmp_path / "short_answers.jsonl"
    words = ["apple", "river", "stone", "cloud"] * 50
    path.write_text("".join(json.dumps({"instruction": "Spell backwards.", "input": w, "output": w[::-1]}) + "\n"
                            for w in words))
    cfg = RunConfig.from_dict({**GOOD, "data": {"path": str(path), "max_length": 64, "eval_fraction": 0.0}})
    p = data.build_datasets(cfg, data_tab.models.load_tokenizer("tiny-llama"))
    labels = np.array(p.train["labels"])
    assert ((labels != data.IGNORE).sum(axis=1) > 0).all()
    assert p.warnings and "packed training blocks dropped" in p.warnings[0]
