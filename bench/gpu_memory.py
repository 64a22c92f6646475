"""The training-memory estimate against torch.cuda.max_memory_allocated on a real GPU.

For a few settings (fp32, bf16, 4-bit, gradient checkpointing on and off) it builds the model on
the GPU (random weights from the preset's config: memory does not depend on their values),
wraps it with PEFT, runs optimizer steps on random tokens and compares:
- the state before the step (weights + adapter + gradients + optimizer moments, as allocated)
  with weights + trainable + gradients + optimizer of the estimate;
- the step's peak above that state with activations_bytes (the peak also holds what the estimate
  leaves out: gradients of activations in flight, kernels' workspaces);
- the peak with total_bytes.
Without a CUDA GPU it says so and exits 0.

    .venv/bin/python bench/gpu_memory.py [--model qwen2.5-0.5b] [--batch 4] [--seq 512] [--docs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from report import machine, write_section  # bench/report.py

CASES = [  # (precision, quant, gradient checkpointing)
    ("fp32", "none", False),
    ("bf16", "none", False),
    ("bf16", "none", True),
    ("bf16", "4bit", False),
    ("bf16", "4bit", True),
]
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30


def _model(ref: str, precision: str, quant: str, folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from studio.models import registry

    config = registry.load_hf_config(ref)
    if quant == "none":
        with torch.device("cuda"):
            return AutoModelForCausalLM.from_config(config, dtype=DTYPE[precision])
    if not any(folder.glob("*.safetensors")):
        torch.manual_seed(0)  # bitsandbytes quantizes while loading: write random weights once
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=DTYPE[precision])
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=DTYPE[precision],
                                                device_map={"": 0})


def run_case(ref: str, precision: str, quant: str, checkpointing: bool, batch: int, seq: int, folder: Path) -> dict:
    from peft import get_peft_model

    from studio import lora
    from studio.config import LoraSettings
    from studio.models import memory
    from studio.models.tree import model_tree

    settings = LoraSettings(r=16, lora_alpha=32, target_modules="all-linear")
    tree = model_tree(ref)
    est = memory.estimate(tree, lora.count(tree, settings), settings, batch=batch, seq=seq, quant=quant,
                          precision=precision, gradient_checkpointing=checkpointing, device="cuda")

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = _model(ref, precision, quant, folder)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    pm = get_peft_model(model, lora.build_lora_config(settings, "causal_lm"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, tree_vocab(pm), (batch, seq), device="cuda")
    t = time.perf_counter()
    for step in range(3):  # the first step creates the gradients and the moments; measure the last
        if step == 2:
            torch.cuda.synchronize()
            state = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: the estimate counts them
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    seconds = time.perf_counter() - t
    del pm, model, opt
    torch.cuda.empty_cache()
    est_state = est.weights_bytes + est.trainable_bytes + est.gradients_bytes + est.optimizer_bytes
    return dict(case=f"{precision}, quant {quant}, checkpointing {'on' if checkpointing else 'off'}",
                est_state=est_state, state=state, est_act=est.activations_bytes, act=peak - state,
                est_total=est.total_bytes, peak=peak, seconds=seconds)


def tree_vocab(pm) -> int:
    return pm.get_base_model().config.vocab_size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b", help="preset or built-in (random weights are used)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--docs", action="store_true", help="write the section into docs/benchmarks.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; this benchmark compares against a CUDA GPU's "
              "allocator, so there is nothing to measure here")
        return 0
    have_bnb = True
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        have_bnb = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, quant, ck in CASES:
            if quant != "none" and not have_bnb:
                print(f"skipped {precision} {quant}: bitsandbytes is not installed (pip install '.[quant]')")
                continue
            rows.append(run_case(a.model, precision, quant, ck, a.batch, a.seq, Path(tmp)))
            r = rows[-1]
            print(f"{r['case']}: state {r['state'] / GIB:.2f} GiB (est {r['est_state'] / GIB:.2f}), "
                  f"activations {r['act'] / GIB:.2f} (est {r['est_act'] / GIB:.2f}), "
                  f"peak {r['peak'] / GIB:.2f} (est total {r['est_total'] / GIB:.2f}), {r['seconds']:.1f} s", flush=True)
    gpu = torch.cuda.get_device_name(0)
    lines = ["## Training memory: estimate vs GPU\n",
             f"{a.model}, LoRA all-linear r=16, micro-batch {a.batch} x {a.seq} tokens, AdamW; {gpu}; "
             f"{machine()}; {time.strftime('%Y-%m-%d', time.gmtime())}.\n",
             "| setting | state GiB (est) | activations GiB (est) | peak GiB (est total) | peak / est |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['state'] / GIB:.2f} ({r['est_state'] / GIB:.2f}) | "
                     f"{r['act'] / GIB:.2f} ({r['est_act'] / GIB:.2f}) | {r['peak'] / GIB:.2f} "
                     f"({r['est_total'] / GIB:.2f}) | {r['peak'] / r['est_total']:.2f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if a.docs:
        write_section("Training memory: estimate vs GPU", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
