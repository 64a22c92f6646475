"""The trainer's switches, for real on tiny-llama: the labelled-only loss against the model's own
forward, no KV cache while training (packed examples stay apart), early stopping with the best
checkpoint as the final adapter, 4-bit + gradient checkpointing from the CLI merged into the
fp32 base, and the config checks that line saves up with evaluations.

Most tests drive the trainer in this process (studio.runs.trainer.build / train on a run folder),
which skips a process start per run; the CLI test runs `studio train` and `studio merge` as a user does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.config import RunConfig
from studio.errors import ConfigError
from studio.runs import trainer as T
from studio.runs.preflight import resolve_precision
from studio.runs.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit"]
# The labelled-only loss sums the same terms as the full head's cross entropy; measured rel. diff ~1e-7.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Alpaca rows whose prompts are longer than their responses: most positions carry no label."""
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = []
    for i in range(240):
        w = WORDS[(i * 7) % len(WORDS)]
        rows.append([{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]},
                     {"instruction": "Write the word in capitals.", "input": w, "output": w.upper()},
                     {"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}][i % 3])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(T.NAN_HOOK_ENV, raising=False)
    monkeypatch.delenv(T.SLOW_HOOK_ENV, raising=False)


def make_cfg(dataset: Path, data: dict | None = None, model: dict | None = None, **train) -> RunConfig:
    t = dict(learning_rate=1e-2, max_steps=10, per_device_train_batch_size=2, logging_steps=1, eval_steps=10,
             save_steps=100, warmup_ratio=0.0, seed=7)
    t.update(train)
    d = dict(path=str(dataset), max_length=64, packing=True, eval_fraction=0.1)
    d.update(data or {})
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama", "task": "causal_lm", **(model or {})},
        "data": d,
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
        "train": t,
    })


def run_folder(tmp_path: Path, cfg: RunConfig, name: str = "run") -> Path:
    rd = tmp_path / name
    rd.mkdir()
    cfg.save(rd / "config.yaml")
    return rd


def micro_losses(trainer) -> list[float]:
    """Record the loss of every training micro-batch, unrounded (Trainer's logs round them)."""
    seen: list[float] = []
    step = trainer.training_step

    def recording(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)
        seen.append(float(loss))
        return loss
    trainer.training_step = recording
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("packing,accumulation", [(True, 1), (False, 2)])
def test_labelled_loss_equals_the_models_own_for_ten_steps(dataset, tmp_path, packing, accumulation):
    cfg = make_cfg(dataset, data={"packing": packing, "eval_fraction": 0.0, "max_length": 128},
                   gradient_accumulation_steps=accumulation)
    results = {}
    for labelled in (True, False):
        rd = run_folder(tmp_path, cfg, f"run-{labelled}")
        trainer, _ = T.build(cfg, rd, T.Reporter(rd, enabled=True))
        trainer.use_labelled_loss = labelled
        seen = micro_losses(trainer)
        trainer.train()
        results[labelled] = (seen, trainer.labelled_steps)
    (fast, used), (plain, unused) = results[True], results[False]
    assert used == len(fast) == 10 * accumulation and unused == 0  # each path really ran as named
    assert len(plain) == len(fast)
    # Same losses step after step: the updates (and so the later losses) match too.
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (i, a, b)
    assert fast[-1] < fast[0]  # it trains


def test_training_runs_without_kv_cache_so_packed_examples_stay_apart(dataset, tmp_path):
    cfg = make_cfg(dataset, data={"eval_fraction": 0.0})
    rd = run_folder(tmp_path, cfg)
    trainer, _ = T.build(cfg, rd, T.Reporter(rd, enabled=True))
    model = trainer.model
    assert model.config.use_cache is False
    batch = trainer.data_collator([trainer.train_dataset[0]])
    pos = batch["position_ids"][0]
    starts = [i for i in range(len(pos)) if pos[i] == 0]
    assert len(starts) >= 2, "the first packed block should hold at least two examples"
    a, b = starts[1], starts[2] if len(starts) > 2 else len(pos)
    model.eval()
    with torch.no_grad():
        # As the trainer's forward sees a packed block (no attention_mask), the cache left to the model's config.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, a:b]
        alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_early_stopping_ends_with_the_best_checkpoints_adapter(dataset, tmp_path):
    # A constant, very high rate: eval_loss stops improving within a few evaluations, well before step 40.
    cfg = make_cfg(dataset, learning_rate=2.0, lr_scheduler_type="constant", max_steps=40, eval_steps=2,
                   save_steps=2, save_total_limit=1, early_stopping_patience=1, per_device_train_batch_size=4)
    rd = run_folder(tmp_path, cfg)
    assert T.train(rd, False, T.Reporter(rd, enabled=True)) == "completed"
    st = RunDir(rd).read_status_file()
    rows = [json.loads(line) for line in RunDir(rd).metrics.read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: (e[1], e[0]))
    assert st["stop_reason"] == "early_stopping" and st["step"] < 40
    assert st["best_step"] == best_step and st["adapter_step"] == best_step
    assert st["best_metric"] == pytest.approx(best) and st["best_metric_name"] == "eval_loss"
    assert st["step"] - best_step == 1 * 2  # patience 1 evaluation, eval_steps 2
    final = load_file(str(RunDir(rd).adapter / "adapter_model.safetensors"))
    kept = load_file(str(RunDir(rd).checkpoint(best_step) / "adapter_model.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)


@pytest.mark.slow
def test_a_run_to_the_end_says_completed_and_records_its_best(dataset, tmp_path):
    cfg = make_cfg(dataset, max_steps=4, eval_steps=2)
    rd = run_folder(tmp_path, cfg)
    assert T.train(rd, False, T.Reporter(rd, enabled=True)) == "completed"
    st = RunDir(rd).read_status_file()
    assert st["stop_reason"] == "completed" and st["adapter_step"] == 4
    assert st["best_step"] in (2, 4) and st["best_metric_name"] == "eval_loss"


@pytest.mark.slow
def test_4bit_base_trains_with_checkpointing_and_8bit_adamw(dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = make_cfg(dataset, model={"quantization": "4bit"}, data={"eval_fraction": 0.0}, max_steps=3,
                   gradient_checkpointing=True, optim="adamw_8bit")
    rd = run_folder(tmp_path, cfg)
    trainer, _ = T.build(cfg, rd, T.Reporter(rd, enabled=True))
    seen = micro_losses(trainer)
    trainer.train()
    base = trainer.model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert base.is_activation_checkpointing
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    # Trainer's adamw_bnb_8bit is bitsandbytes' AdamW with 8-bit states (tensors under min_8bit_size keep 32-bit ones).
    assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit) and opt.args.optim_bits == 8
    assert trainer.labelled_steps == 3 and all(torch.isfinite(torch.tensor(seen)))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_4bit_run_from_the_cli_merges_into_the_fp32_base(dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(dataset, model={"quantization": "4bit"}, max_steps=6, eval_steps=3, save_steps=3,
                   gradient_checkpointing=True)
    path = tmp_path / "qlora.yaml"
    cfg.save(path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs_dir = tmp_path / "runs"

    def studio(*args):
        return subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    r = studio("train", str(path), "--runs-dir", str(runs_dir))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (run,) = [d for d in runs_dir.iterdir() if d.is_dir()]
    st = RunDir(run).read_status_file()
    assert st["state"] == "completed" and st["step"] == 6, st
    r = studio("merge", str(run), "--verify", "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["ok"] and out["differs_from_base"], out  # merged = fp32 base + adapter, and the adapter did something
    merged = load_file(str(next(RunDir(run).merged.glob("*.safetensors"))))
    assert all(t.dtype == torch.float32 for t in merged.values() if t.is_floating_point())


# --- what config validation refuses before Trainer would ------------------------------------

def test_early_stopping_needs_saves_on_evaluations(dataset):
    with pytest.raises(ConfigError, match=r"train.save_steps 50 must be a multiple of train.eval_steps 20.*"
                                          r"save_steps 40 or 60"):
        make_cfg(dataset, early_stopping_patience=2, eval_steps=20, save_steps=50)
    make_cfg(dataset, early_stopping_patience=2, eval_steps=20, save_steps=40)  # a multiple is fine
    make_cfg(dataset, eval_steps=20, save_steps=50)  # and without early stopping anything goes


def test_early_stopping_needs_an_eval_split(dataset):
    with pytest.raises(ConfigError, match=r"early_stopping_patience 3 needs evaluations.*data.eval_fraction is 0"):
        make_cfg(dataset, data={"eval_fraction": 0.0}, early_stopping_patience=3, eval_steps=10, save_steps=10)


def test_eval_accuracy_is_for_classifiers_only(dataset):
    with pytest.raises(ConfigError, match=r"metric_for_best_model eval_accuracy .* seq_cls only, not causal_lm"):
        make_cfg(dataset, metric_for_best_model="eval_accuracy")


def test_precision_auto_is_fp32_without_a_gpu():
    assert resolve_precision("auto", "auto", cuda=False) == "fp32"
    assert resolve_precision("bf16", "auto", cuda=False) == "bf16"
    assert resolve_precision("auto", "float16", cuda=True) == "fp16"
