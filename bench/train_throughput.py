"""Training throughput of the studio trainer (a benchmark, not a test).

    python bench/train_throughput.py [--steps 60] [--repeats 5] [--threads N] [--json out.json] [--no-docs]
    python bench/train_throughput.py --case smollm2-chat [--steps 20] [--repeats 2] ...

`--case smollm2-chat` is SmolLM2 on a chat dataset, packed and response-masked, against a plain
Trainer + PEFT script, with 4-bit beside fp32 (bench/train_throughput_chat.py says what it measures).
The default case, tiny-llama, has one model, one dataset, one set of hyperparameters throughout:

1. Overhead: `python -m studio.runs.trainer RUN_DIR` (status, metrics stream, token counting, stop
   and divergence checks) against a plain reference script, Trainer + PEFT written the usual
   way, on the same prepared data, the same seed and so the same batches. Both are separate
   processes; both report Trainer's own `train_runtime` (the training loop, one checkpoint save
   at the end included, start-up excluded). Same batches means same tokens, so the tokens/s
   ratio is reference runtime / studio runtime. Runs alternate, `--repeats` times each; the
   fastest run of each side is compared (the least disturbed by other load on the machine),
   and the median ratio is shown beside it.
2. Packing: on a dataset of mixed lengths (answers of 1 to 240 characters), non-padding
   tokens/s with packed blocks against padded batches (random order, and grouped by length,
   which is what the studio uses when packing is off). Counted by the studio trainer's own
   non-padding token counter.
3. MFU on CPU: tokens/s x (4 N + 6 N_lora) FLOPs per token over the fp32 matmul peak this
   script measures with torch.matmul at the same thread count. N counts the base weights used in
   matmuls (all parameters but the input embedding table); 4N is forward (2N) plus the
   activation gradients (2N) of the frozen base; 6 N_lora is forward and both backward passes of
   the adapters. Attention score FLOPs are not counted, as in the usual 6N rule.

Prints a markdown section for docs/benchmarks.md and, with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import machine, matmul_peak, write_section  # bench/report.py

from studio import runs
from studio.config import RunConfig, load_config

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit", "maple"]


def write_dataset(path: Path, n: int, mixed: bool, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        if mixed:  # log-uniform answer lengths: many short examples, a few long ones
            k = int(round(2 ** rng.uniform(0, 5.9)))
            out = " ".join(rng.choice(WORDS) for _ in range(k))[:240]
            rows.append({"instruction": "Continue the list of words.", "input": w, "output": out})
        else:
            rows.append({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(data: Path, steps: int, packing: bool = True, max_length: int = 128, batch: int = 8) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(data), "max_length": max_length, "packing": packing, "eval_fraction": 0.0},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"learning_rate": 2e-3, "max_steps": steps, "per_device_train_batch_size": batch,
                  "logging_steps": 1, "save_steps": steps, "warmup_ratio": 0.05, "seed": 1},
    })


# --- the reference: Trainer + PEFT, the usual way ---------------------------------------------

def plain_trainer(cfg: RunConfig, out_dir: Path, tok, data):
    """Trainer + PEFT the way a tutorial writes it; the data are the studio's, so the batches match."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from studio.models import load_model

    t = cfg.train
    model = load_model(cfg.model.name_or_path)
    set_seed(t.seed)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir), learning_rate=t.learning_rate, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        seed=t.seed, report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator, processing_class=tok)


def reference(run_dir: Path) -> None:
    """Child process: the same run as studio.runs.trainer, without the studio's callback or subclass."""
    from transformers import set_seed

    from studio.data import build_datasets
    from studio.models import load_tokenizer

    cfg = load_config(run_dir / runs.CONFIG)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name_or_path)
    out = plain_trainer(cfg, run_dir / "checkpoints", tok, build_datasets(cfg, tok)).train()
    print("RESULT " + json.dumps({"train_runtime": out.metrics["train_runtime"]}), flush=True)


# --- measuring ----------------------------------------------------------------------------------

def child_env(threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_studio(cfg: RunConfig, root: Path, env: dict) -> dict:
    run_dir = runs.create_run(cfg, root)
    with open(run_dir / runs.LOG, "wb") as log:
        rc = subprocess.run(runs.trainer_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    st = runs.read_status(run_dir)
    if rc != 0 or st["state"] != "completed":
        raise SystemExit(f"studio run failed ({st['state']}): {runs.log_tail(run_dir, 30)}")
    rows, _ = runs.read_metrics(run_dir)
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    tokens = sum(r.get("tokens", 0) for r in rows)
    return {"train_runtime": runtime, "tokens": tokens, "trainable": st["trainable_params"], "total": st["total_params"]}


def run_reference(cfg: RunConfig, root: Path, env: dict) -> dict:
    run_dir = runs.create_run(cfg, root)
    p = subprocess.run([sys.executable, __file__, "--reference", str(run_dir)], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"reference run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def packing_run(cfg: RunConfig, root: Path, sampling: str | None) -> dict:
    """In-process studio trainer; `sampling` overrides the train sampler for the padded variants."""
    from studio.runs import trainer as train

    run_dir = runs.create_run(cfg, root)
    report = train.Reporter(run_dir, enabled=True)
    trainer, _ = train.build(cfg, run_dir, report)
    if sampling:
        trainer.args.train_sampling_strategy = sampling
    out = trainer.train()
    rows, _ = runs.read_metrics(run_dir)
    tokens = sum(r.get("tokens", 0) for r in rows)
    padded = cfg.train.max_steps * cfg.train.per_device_train_batch_size * cfg.data.max_length if cfg.data.packing else None
    return {"train_runtime": out.metrics["train_runtime"], "tokens": tokens,
            "tokens_per_s": tokens / out.metrics["train_runtime"], "dense_tokens": padded}


def cpu_compare(cfg: RunConfig, root: Path, repeats: int) -> dict:
    """CPU seconds of train() in one process, studio trainer and plain Trainer alternating.

    CPU time counts the work a process does, not the time it waits for a core, so other load
    on a shared machine disturbs it far less than wall time.
    """
    from studio.data import build_datasets
    from studio.models import load_tokenizer
    from studio.runs import trainer as train

    tok = load_tokenizer(cfg.model.name_or_path)
    data = build_datasets(cfg, tok)
    out = {"studio": [], "plain": []}
    for i in range(repeats):
        run_dir = runs.create_run(cfg, root)
        trainer, cb = train.build(cfg, run_dir, train.Reporter(run_dir, enabled=True))
        t = time.process_time()
        trainer.train()
        out["studio"].append(time.process_time() - t)
        if i == 0:
            out["bookkeeping_us"] = bookkeeping_us(trainer, cb, data.collator([data.train[j] for j in range(8)]))
        trainer = plain_trainer(cfg, root / f"plain-{i}", tok, data)
        t = time.process_time()
        trainer.train()
        out["plain"].append(time.process_time() - t)
        print(f"[cpu {i + 1}/{repeats}] studio {out['studio'][-1]:.2f} s, plain {out['plain'][-1]:.2f} s", file=sys.stderr)
    out["ratio_best"] = min(out["plain"]) / min(out["studio"])
    out["ratio_median"] = statistics.median(out["plain"]) / statistics.median(out["studio"])
    return out


def bookkeeping_us(trainer, cb, batch: dict, seconds: float = 2.0) -> float:
    """Microseconds per step of everything the studio adds to Trainer's loop, timed on its own.

    Per step: the non-padding token count and the loss check (training_step), the stop and
    divergence flags (on_pre_optimizer_step), the step clock and the status.json rewrite at
    most once a second (on_step_end), one metrics.jsonl line (on_log). Runs for `seconds`, so
    the once-a-second status write weighs in at the rate it has in training.
    """
    from transformers import TrainerControl

    from studio.runs import trainer as train

    args, state = trainer.args, trainer.state
    control = TrainerControl()  # the finished run's control says "stop", which forces a status write
    loss = torch.tensor(4.2)
    logs = {"loss": 4.2, "grad_norm": 0.5, "learning_rate": 1e-3, "epoch": 0.1}
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.tokens = trainer.tokens + train.count_tokens(batch, trainer.pad_id)
        bool(torch.isfinite(loss).all())
        cb.on_pre_optimizer_step(args, state, control, model=trainer.model)
        cb.on_step_end(args, state, control)
        cb.on_log(args, state, control, logs=dict(logs))
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def base_matmul_params(model_ref: str = "tiny-llama") -> int:
    from studio.models import load_model

    m = load_model(model_ref)
    return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["tiny-llama", "smollm2-chat"], default="tiny-llama")
    ap.add_argument("--steps", type=int, default=None, help="steps a run (default 60; smollm2-chat 20)")
    ap.add_argument("--repeats", type=int, default=None, help="runs a side (default 5; smollm2-chat 2)")
    ap.add_argument("--batch", type=int, default=2, help="smollm2-chat: micro-batch")
    ap.add_argument("--max-length", type=int, default=256, help="smollm2-chat: packed block length")
    ap.add_argument("--steps-4bit", type=int, default=10, help="smollm2-chat: steps of the 4-bit run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--reference", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference-chat", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.reference:
        return reference(a.reference)
    if a.reference_chat:
        from train_throughput_chat import plain_reference

        return plain_reference(a.reference_chat)
    chat = a.case == "smollm2-chat"
    a.steps = a.steps or (20 if chat else 60)
    a.repeats = a.repeats or (2 if chat else 5)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    env = child_env(threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    try:
        if chat:
            from train_throughput_chat import run_chat

            run_chat(a, env, threads, work)
        else:
            run_all(a, env, threads, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(a: argparse.Namespace, env: dict, threads: int, work: Path) -> None:

    # 1. studio trainer vs reference
    data = write_dataset(work / "plain.jsonl", 600, mixed=False)
    cfg = make_cfg(data, a.steps)
    studio_runs, ref_runs = [], []
    for i in range(a.repeats):
        for side, fn, out in (("studio", run_studio, studio_runs), ("reference", run_reference, ref_runs)):
            r = fn(cfg, work / f"{side}-runs", env)
            out.append(r)
            print(f"[{i + 1}/{a.repeats}] {side}: train_runtime {r['train_runtime']:.3f} s", file=sys.stderr)
    tokens = studio_runs[0]["tokens"]
    s_best = min(r["train_runtime"] for r in studio_runs)
    r_best = min(r["train_runtime"] for r in ref_runs)
    ratio_best = r_best / s_best
    ratio_median = statistics.median(r["train_runtime"] for r in ref_runs) / statistics.median(
        r["train_runtime"] for r in studio_runs)

    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints every log line; stdout is for the report
        cpu = cpu_compare(cfg, work / "cpu", a.repeats)

        # 2. packing vs padding on mixed lengths
        mixed = write_dataset(work / "mixed.jsonl", 1500, mixed=True)
        pk = packing_run(make_cfg(mixed, a.steps // 2, packing=True, max_length=256), work / "pack", None)
        pad = packing_run(make_cfg(mixed, a.steps // 2, packing=False, max_length=256), work / "pad", "random")
        grp = packing_run(make_cfg(mixed, a.steps // 2, packing=False, max_length=256), work / "grp",
                          "group_by_length")

    # 3. MFU
    peak = matmul_peak()
    n_base = base_matmul_params()
    n_lora = studio_runs[0]["trainable"]
    flops_per_token = 4 * n_base + 6 * n_lora
    studio_tps = tokens / s_best
    mfu = studio_tps * flops_per_token / peak

    res = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "threads": threads, "steps": a.steps,
        "repeats": a.repeats, "tokens_per_run": tokens,
        "studio_runtime_s": [r["train_runtime"] for r in studio_runs],
        "reference_runtime_s": [r["train_runtime"] for r in ref_runs],
        "studio_tokens_per_s": studio_tps, "reference_tokens_per_s": tokens / r_best,
        "ratio_best": ratio_best, "ratio_median": ratio_median, "cpu": cpu,
        "packed": pk, "padded_random": pad, "padded_grouped": grp,
        "packing_vs_padded": pk["tokens_per_s"] / pad["tokens_per_s"],
        "packing_vs_grouped": pk["tokens_per_s"] / grp["tokens_per_s"],
        "matmul_peak_gflops": peak / 1e9, "n_base": n_base, "n_lora": n_lora, "flops_per_token": flops_per_token,
        "mfu": mfu,
    }
    res["step_ms"] = 1000 * s_best / a.steps
    res["load_average"] = os.getloadavg()[0]
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    section = markdown(res)
    print(section)
    if not a.no_docs:
        write_section("Training throughput", section)


def markdown(r: dict) -> str:
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    book = r["cpu"]["bookkeeping_us"]
    return f"""## Training throughput

`bench/train_throughput.py`: tiny-llama, LoRA r=8 on q/k/v/o_proj, batch 8 x 128 tokens (packed),
fp32 on CPU, {r['steps']} steps a run, {r['repeats']} runs a side, {r['threads']} torch thread(s).
Measured {r['date']} on {r['machine']}; 1-minute load average {r['load_average']:.1f} at the end
(the machine is shared: wall times move with the load, so the fastest run of each side is the figure).

| measure | value |
| --- | --- |
| `python -m studio.runs.trainer`, tokens/s (fastest of {r['repeats']}) | {r['studio_tokens_per_s']:,.0f} |
| reference script (Trainer + PEFT, same data, seed and batches), tokens/s (fastest of {r['repeats']}) | {r['reference_tokens_per_s']:,.0f} |
| **studio / reference tokens/s**, fastest runs (median runs) | **{r['ratio_best']:.3f}** ({r['ratio_median']:.3f}) |
| train_runtime s, studio runs / reference runs, in the order run | {fmt(r['studio_runtime_s'])} / {fmt(r['reference_runtime_s'])} |
| CPU s of train() in one process, alternating: studio / plain | {fmt(r['cpu']['studio'])} / {fmt(r['cpu']['plain'])} |
| **studio / plain tokens per CPU second**, least (median) | **{r['cpu']['ratio_best']:.3f}** ({r['cpu']['ratio_median']:.3f}) |
| the studio's own work per step, timed alone (token count, loss check, flags, metrics line, status.json once a second) | {book:.0f} µs = {100 * book / 1000 / r['step_ms']:.2f}% of a {r['step_ms']:.0f} ms step |
| mixed lengths (1-240 character answers), non-padding tokens/s: packed / padded random batches / padded length-grouped | {r['packed']['tokens_per_s']:,.0f} / {r['padded_random']['tokens_per_s']:,.0f} / {r['padded_grouped']['tokens_per_s']:,.0f} |
| **packing / padded random batches** (packing / length-grouped) | **{r['packing_vs_padded']:.2f}x** ({r['packing_vs_grouped']:.2f}x) |
| fp32 matmul peak, torch.matmul 1024 x 1024, measured at {r['threads']} thread(s) | {r['matmul_peak_gflops']:.1f} GFLOP/s |
| FLOPs per token, 4N + 6N_lora (N = {r['n_base']:,} matmul weights, N_lora = {r['n_lora']:,}) | {r['flops_per_token']:,} |
| **MFU**, studio tokens/s x FLOPs per token / peak | **{100 * r['mfu']:.1f}%** |

Studio and reference differ by less than the run-to-run noise of a shared 2-core machine (see
the runtimes); the studio's per-step work timed on its own bounds what its streaming and
bookkeeping can cost. Packing beats randomly batched padding by not computing the padding.
Against length-grouped padded batches (what the studio uses when packing is off) it comes out
at {r['packing_vs_grouped']:.2f}x: grouping already removes most padding, and a packed block
pays attention over all of its 256 positions (with a block-diagonal mask from position_ids)
where a batch of short examples is short. MFU leaves out attention-score FLOPs, as the 6N rule
does. Re-run: `python bench/train_throughput.py --steps {r['steps']} --repeats {r['repeats']} --threads {r['threads']}`
(rewrites this section only; `--json FILE` keeps the raw figures).
"""


if __name__ == "__main__":
    main()
