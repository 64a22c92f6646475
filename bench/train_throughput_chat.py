"""The SmolLM2 chat case of bench/train_throughput.py (`--case smollm2-chat`).

smollm2-135m-instruct on the built-in chat dataset profile-json (ChatML template, packed blocks,
loss on the assistant's replies only), LoRA r=8 on q/k/v/o_proj, fp32 on CPU:

1. Studio against a plain Trainer + PEFT script on the same packed, response-masked batches
   (the studio's prepared data, the same seed and so the same batches, each side in its own
   process, alternating, `--repeats` times). The plain script is written the usual way, with
   the KV cache off (with it transformers ignores the packed blocks' position_ids and the
   examples of a block attend to each other). Both report Trainer's train_runtime; same tokens,
   so the tokens/s ratio is plain runtime / studio runtime, fastest run of each side.
2. The losses of the first 10 steps of both sides, which must agree (relative difference below
   1e-4): the studio computes the output head only at labelled positions (studio.runs.loss),
   the plain script at every position.
3. MFU: studio tokens/s x (4 N + 6 N_lora) / the fp32 matmul peak measured here, N being every
   base weight used in a matmul (the Linear layers, the tied output head included), N_lora the
   adapter's. Model FLOPs: the head counts at every position, as in the usual rule, though the
   studio computes it only at the labelled ones.
4. 4-bit (model.quantization 4bit, NF4 through bitsandbytes): studio tokens/s and peak resident
   memory next to fp32's.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from report import machine, matmul_peak, write_section  # bench/report.py

from studio import runs
from studio.config import RunConfig, load_config

MODEL, DATA = "smollm2-135m-instruct", "assets/datasets/profile-json.jsonl"
LOSS_STEPS, LOSS_RTOL = 10, 1e-4


def chat_cfg(steps: int, batch: int, max_length: int, quantization: str = "none") -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": MODEL, "quantization": quantization},
        "data": {"path": DATA, "max_length": max_length, "packing": True, "eval_fraction": 0.0,
                 "train_on_prompt": False},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"learning_rate": 1e-3, "max_steps": steps, "per_device_train_batch_size": batch,
                  "logging_steps": 1, "save_steps": steps, "warmup_ratio": 0.05, "seed": 1},
    })


def studio_side(cfg: RunConfig, root: Path, env: dict) -> dict:
    """`python -m studio.runs.trainer` on a new run: runtime, tokens, per-step losses, peak RSS."""
    run_dir = runs.create_run(cfg, root)
    with open(run_dir / runs.LOG, "wb") as log:
        rc = subprocess.run(runs.trainer_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    st = runs.read_status(run_dir)
    if rc != 0 or st["state"] != "completed":
        raise SystemExit(f"studio run failed ({st['state']}): {st.get('error')}\n{runs.log_tail(run_dir, 30)}")
    rows, _ = runs.read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    return {"train_runtime": next(r["train_runtime"] for r in rows if "train_runtime" in r),
            "tokens": sum(r.get("tokens", 0) for r in train), "losses": [r["loss"] for r in train],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in train), "trainable": st["trainable_params"]}


def plain_side(cfg: RunConfig, root: Path, env: dict) -> dict:
    run_dir = runs.create_run(cfg, root)
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("train_throughput.py")), "--reference-chat",
                        str(run_dir)], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"plain run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def plain_trainer(cfg: RunConfig, out_dir: Path, tok, data):
    """Trainer + PEFT the usual way, on the studio's prepared (packed, masked) data."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from studio.models import load_model

    t = cfg.train
    model = load_model(cfg.model.name_or_path)
    model.config.use_cache = False  # packed blocks: the cache would let their examples see each other
    set_seed(t.seed)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir), learning_rate=t.learning_rate, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio, logging_steps=1, save_strategy="steps", save_steps=t.save_steps,
        seed=t.seed, report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                   processing_class=tok)


def plain_reference(run_dir: Path) -> None:
    """Child process: the plain script on the run's config; its runtime, losses and peak."""
    from transformers import set_seed

    from studio.data import build_datasets
    from studio.models import load_tokenizer
    from studio.runs.memory_guard import peak_rss_bytes

    cfg = load_config(run_dir / runs.CONFIG)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name_or_path)
    trainer = plain_trainer(cfg, run_dir / "checkpoints", tok, build_datasets(cfg, tok))
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"train_runtime": out.metrics["train_runtime"], "losses": losses,
                                  "peak_rss_mb": peak_rss_bytes() / 2**20}), flush=True)


def cpu_compare(cfg: RunConfig, root: Path, repeats: int) -> dict:
    """CPU seconds of train() in this process, studio and plain alternating: the work each does,
    not the time it waits for a core, so other load on the machine disturbs it far less."""
    import time

    from studio.data import build_datasets
    from studio.models import load_tokenizer
    from studio.runs import trainer as train

    tok = load_tokenizer(cfg.model.name_or_path)
    data = build_datasets(cfg, tok)
    out = {"studio": [], "plain": []}
    for i in range(repeats):
        run_dir = runs.create_run(cfg, root)
        for side in ("studio", "plain"):
            trainer = (train.build(cfg, run_dir, train.Reporter(run_dir, enabled=True))[0] if side == "studio"
                       else plain_trainer(cfg, root / f"plain-{i}", tok, data))
            t = time.process_time()
            trainer.train()
            out[side].append(time.process_time() - t)
            del trainer
        print(f"[cpu {i + 1}/{repeats}] studio {out['studio'][-1]:.2f} s, plain {out['plain'][-1]:.2f} s", file=sys.stderr)
    out["ratio_best"] = min(out["plain"]) / min(out["studio"])
    return out


def matmul_weights(model_ref: str) -> tuple[int, int]:
    """(weights of every Linear layer of the base, a tied output head included; the head's own)."""
    import torch

    from studio.models import load_model

    m = load_model(model_ref)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    return linear, m.get_output_embeddings().weight.numel()


def label_share(cfg: RunConfig) -> tuple[int, int]:
    """(positions whose next token carries a label, positions) over the packed train split: the
    positions where the studio computes the output head, of all the plain script computes."""
    from studio.data.prepare import build_datasets
    from studio.models import load_tokenizer

    train = build_datasets(cfg, load_tokenizer(cfg.model.name_or_path)).train
    labelled = positions = 0
    for row in train["labels"]:
        labelled += sum(t != -100 for t in row[1:])
        positions += len(row) - 1
    return labelled, positions


def run_chat(a, env: dict, threads: int, work: Path) -> None:
    cfg = chat_cfg(a.steps, a.batch, a.max_length)
    peak0 = matmul_peak()
    studio, plain = [], []
    for i in range(a.repeats):
        for side, fn, out in (("studio", studio_side, studio), ("plain", plain_side, plain)):
            out.append(fn(cfg, work / f"chat-{side}", env))
            print(f"[{i + 1}/{a.repeats}] {side}: train_runtime {out[-1]['train_runtime']:.2f} s", file=sys.stderr)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its log lines; stdout is for the report
        cpu = cpu_compare(cfg, work / "chat-cpu", a.repeats)
    q4 = studio_side(chat_cfg(a.steps_4bit, a.batch, a.max_length, "4bit"), work / "chat-4bit", env)
    print(f"4-bit: train_runtime {q4['train_runtime']:.2f} s", file=sys.stderr)
    tokens = studio[0]["tokens"]
    s_best, p_best = min(r["train_runtime"] for r in studio), min(r["train_runtime"] for r in plain)
    pairs = list(zip(studio[0]["losses"][:LOSS_STEPS], plain[0]["losses"][:LOSS_STEPS]))
    rel = max(abs(s - p) / abs(p) for s, p in pairs)
    peak = max(peak0, matmul_peak())  # the better of before and after
    n_base, n_head = matmul_weights(MODEL)
    fpt = 4 * n_base + 6 * studio[0]["trainable"]
    labelled, positions = label_share(cfg)
    # the most the head's skipped positions can save: its forward and input-gradient FLOPs there
    ceiling = fpt / (fpt - 4 * n_head * (1 - labelled / positions))
    res = {"date": datetime.date.today().isoformat(), "machine": machine(), "threads": threads,
           "steps": a.steps, "repeats": a.repeats, "batch": a.batch, "max_length": a.max_length,
           "tokens_per_run": tokens, "studio_runtime_s": [r["train_runtime"] for r in studio],
           "plain_runtime_s": [r["train_runtime"] for r in plain],
           "studio_tokens_per_s": tokens / s_best, "plain_tokens_per_s": tokens / p_best, "ratio_best": p_best / s_best,
           "cpu": cpu,
           "losses_studio": studio[0]["losses"][:LOSS_STEPS], "losses_plain": plain[0]["losses"][:LOSS_STEPS],
           "loss_max_rel_diff": rel, "matmul_peak_gflops": peak / 1e9, "n_base": n_base,
           "n_lora": studio[0]["trainable"], "flops_per_token": fpt, "mfu": tokens / s_best * fpt / peak,
           "fp32_peak_rss_mb": studio[0]["peak_rss_mb"], "plain_peak_rss_mb": plain[0]["peak_rss_mb"],
           "q4_steps": a.steps_4bit, "q4_tokens_per_s": q4["tokens"] / q4["train_runtime"],
           "q4_peak_rss_mb": q4["peak_rss_mb"], "load_average": os.getloadavg()[0],
           "labelled_positions": labelled, "positions": positions, "n_head": n_head, "flops_ceiling": ceiling}
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    section = markdown(res)
    print(section)
    if not a.no_docs:
        write_section("Training throughput: SmolLM2 chat", section)


def markdown(r: dict) -> str:
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    ok = "below" if r["loss_max_rel_diff"] < LOSS_RTOL else "NOT below"
    quiet = ("nothing else ran on the machine" if r["load_average"] < 1.5
             else "the machine was shared with other work")
    share = r["labelled_positions"] / r["positions"]
    return f"""## Training throughput: SmolLM2 chat

`bench/train_throughput.py --case smollm2-chat`: smollm2-135m-instruct on profile-json (chat,
packed blocks of {r['max_length']} tokens, loss on the assistant's replies only), LoRA r=8 on
q/k/v/o_proj, micro-batch {r['batch']}, fp32 on CPU, {r['steps']} steps a run, {r['repeats']} runs a side
alternating, {r['threads']} torch thread(s). Measured {r['date']} on {r['machine']} (AVX-512, no
GPU); {quiet} (1-minute load average {r['load_average']:.1f} at the end); the fastest run of each
side is the figure.

| measure | value |
| --- | --- |
| studio (`python -m studio.runs.trainer`), tokens/s, fastest run | {r['studio_tokens_per_s']:,.0f} |
| plain Trainer + PEFT on the same batches, tokens/s, fastest run | {r['plain_tokens_per_s']:,.0f} |
| **studio / plain tokens/s** | **{r['ratio_best']:.2f}x** |
| train_runtime s, studio runs / plain runs, in the order run | {fmt(r['studio_runtime_s'])} / {fmt(r['plain_runtime_s'])} |
| CPU s of train() in one process, alternating: studio / plain | {fmt(r['cpu']['studio'])} / {fmt(r['cpu']['plain'])} |
| **studio / plain tokens per CPU second**, least CPU time of each side | **{r['cpu']['ratio_best']:.2f}x** |
| losses of steps 1-{len(r['losses_studio'])}: largest relative difference studio / plain | {r['loss_max_rel_diff']:.1e} ({ok} {LOSS_RTOL:g}) |
| fp32 matmul peak, torch.matmul 1024 x 1024 at {r['threads']} thread(s) | {r['matmul_peak_gflops']:.1f} GFLOP/s |
| FLOPs per token, 4N + 6N_lora (N = {r['n_base']:,} Linear weights, tied head included; N_lora = {r['n_lora']:,}) | {r['flops_per_token']:,} |
| **MFU**, studio tokens/s x FLOPs per token / peak | **{100 * r['mfu']:.1f}%** |
| peak resident memory, fp32: studio / plain | {r['fp32_peak_rss_mb'] / 1024:.2f} GB / {r['plain_peak_rss_mb'] / 1024:.2f} GB |
| 4-bit (NF4, double quantization), studio tokens/s ({r['q4_steps']} steps) / peak resident memory | {r['q4_tokens_per_s']:,.0f} / {r['q4_peak_rss_mb'] / 1024:.2f} GB |

The studio's lead comes from computing the output head (49,152 x 576, tied to the embeddings)
and the loss only at the labelled positions (studio/runs/loss.py); the losses agree. That lead is
bounded by the data: {100 * share:.0f}% of the positions carry a label ({r['labelled_positions']:,} of
{r['positions']:,} in the packed train split) and the head is {100 * r['n_head'] / r['n_base']:.0f}% of the
matmul weights, so skipping it at the other {100 * (1 - share):.0f}% saves at most
{r['flops_ceiling']:.2f}x in FLOPs (plus the float32 logits of those positions); a dataset with longer
prompts gains more, one trained on every token nothing. MFU counts model FLOPs, the head at every
position, so the positions skipped count as work done. 4-bit ran at
{r['q4_tokens_per_s'] / r['studio_tokens_per_s']:.2f}x fp32's tokens/s (bitsandbytes dequantizes each weight
for every matmul); at 135M parameters the weights are a small part of the process, so its peak
memory is not below fp32's. Peak memory is the whole process (Python, torch, the data). Re-run: `python bench/train_throughput.py --case smollm2-chat
--steps {r['steps']} --repeats {r['repeats']} --threads {r['threads']}` (rewrites this section only).
"""
