"""Live-count latency on llama-3.1-405b: the analytic count vs PEFT's get_peft_model on meta.

After the tree is built once, every slider move recomputes the count; this measures that
recomputation for a spread of settings, and, in the same run, what building the adapter with
PEFT on the meta model takes for the same settings (the only other exact way to know).

    .venv/bin/python bench/count_latency.py [--model llama-3.1-405b] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import get_peft_model

from studio import lora, models
from studio.config import LoraSettings
from studio.models.tree import build_tree

SETTINGS = [
    dict(r=8, target_modules=["q_proj", "v_proj"]),
    dict(r=16, target_modules="all-linear"),
    dict(r=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=list(range(0, 126, 2))),
    dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=True),
    dict(r=32, target_modules="all-linear", rank_pattern={"q_proj": 8}, bias="all"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-405b")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    t0 = time.perf_counter()
    tree = build_tree(models.build_meta_model(a.model), a.model)
    build_s = time.perf_counter() - t0

    ours, peft_s = [], []
    for kw in SETTINGS:
        s = LoraSettings(**kw)
        lora.count(tree, s)  # first call compiles PEFT's regexes; the UI pays it once
        for _ in range(a.repeats):
            t = time.perf_counter()
            c = lora.count(tree, s)
            ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        pm = get_peft_model(models.build_meta_model(a.model), lora.build_lora_config(s, "causal_lm"))
        trainable, _ = pm.get_nb_trainable_parameters()
        peft_s.append(time.perf_counter() - t)
        assert trainable == c.trainable, (kw, trainable, c.trainable)
        del pm

    med, peft_med = statistics.median(ours), statistics.median(peft_s)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"model: {a.model}, {tree.total_params:,} parameters, {len(tree.modules)} modules")
    print(f"tree build (once): {build_s * 1000:.0f} ms")
    print(f"studio count: median {med * 1000:.2f} ms, max {max(ours) * 1000:.2f} ms over {len(ours)} counts")
    print(f"PEFT get_peft_model on meta: median {peft_med * 1000:.0f} ms over {len(peft_s)} settings")
    print(f"ratio PEFT / studio: {peft_med / med:.0f}x (counts identical for all {len(SETTINGS)} settings)")


if __name__ == "__main__":
    main()
