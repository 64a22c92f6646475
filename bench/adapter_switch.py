"""Switching between three adapters loaded on one base (the Playground), against one adapter alone.

Measures, in one process: the time of a switch between loaded adapters (the median of many,
alternating), the time to the first generated token right after a switch against the same with
only one adapter loaded, and how many times PEFT's weight loader ran after loading (it must be
0: a switch flips flags on loaded layers, nothing is read from disk).

    python bench/adapter_switch.py [--model smollm2-135m-instruct|tiny-llama] [--docs]

Targets (issue: one base, many adapters): under 50 ms a switch; first token within 1.2x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from peft import LoraConfig, get_peft_model

from bench.report import machine, write_section
from studio.config import RunConfig
from studio.models import load_model
from studio.playground import Playground
from studio.runs.manager import create_run
from studio.runs.rundir import RunDir

PROMPT = "Write one sentence about the sea."


def adapter(ref: str, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(ref), cfg).save_pretrained(str(folder))
    return folder


def first_token_s(pg: Playground, name, repeats: int) -> float:
    """Median seconds to the first token of `name`, each time switched to from base; one untimed
    generation first, so neither side pays the process's first-call costs."""
    next(iter(pg.stream(PROMPT, adapter=name, max_new_tokens=1, temperature=0.0)))
    times = []
    for _ in range(repeats):
        pg._set_adapter(None)  # every measure starts from another mode, so it includes the switch
        t0 = time.perf_counter()
        next(iter(pg.stream(PROMPT, adapter=name, max_new_tokens=1, temperature=0.0)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--switches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--docs", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-switch-"))
    run = create_run(RunConfig.from_dict({"model": {"name_or_path": a.model}}), tmp / "runs")
    adapter(a.model, RunDir(run).adapter, 1)
    others = [adapter(a.model, tmp / f"a{i}", i + 2) for i in range(2)]

    single = Playground.for_run(run, cache=False)
    one = first_token_s(single, True, a.repeats)
    del single

    pg = Playground.for_run(run, cache=False)
    names = ["default"] + [pg.add_adapter(str(p), name=f"a{i}") for i, p in enumerate(others)]
    import peft.utils.save_and_load as sl

    reads, real = [], sl.load_peft_weights
    sl.load_peft_weights = lambda *x, **k: reads.append(x) or real(*x, **k)
    switch = []
    for i in range(a.switches):
        name = names[i % len(names)]
        with pg._lock:
            t0 = time.perf_counter()
            pg._set_adapter(name)
            switch.append(time.perf_counter() - t0)
    peft_walk = []  # PEFT's own call, which walks every module of the model (studio.adapters.switch)
    for i in range(a.switches):
        t0 = time.perf_counter()
        pg.model.set_adapter(names[i % len(names)], inference_mode=True)
        peft_walk.append(time.perf_counter() - t0)
    pg._set_adapter(None)
    pg._active = None  # the PEFT calls above moved the adapter behind the playground's back
    three = statistics.median(first_token_s(pg, n, a.repeats) for n in names)
    sl.load_peft_weights = real

    ms = statistics.median(switch) * 1e3
    section = (f"## Adapter switching\n\n`python bench/adapter_switch.py --model {a.model}` on "
               f"{time.strftime('%Y-%m-%d')}: {machine()}.\n\n"
               f"Three adapters (r=16, all linear layers) loaded on one {a.model} base in the Playground, "
               "against one adapter alone.\n\n"
               "| measure | value | target |\n| --- | --- | --- |\n"
               f"| switch between loaded adapters, median of {a.switches} | {ms:.2f} ms (max "
               f"{max(switch) * 1e3:.2f} ms) | < 50 ms |\n"
               f"| PEFT's `PeftModel.set_adapter(name, inference_mode=True)`, median of {a.switches} | "
               f"{statistics.median(peft_walk) * 1e3:.2f} ms | |\n"
               f"| first token after a switch, 3 adapters loaded (median) | {three * 1e3:.1f} ms | |\n"
               f"| first token, 1 adapter loaded (median) | {one * 1e3:.1f} ms | |\n"
               f"| ratio | {three / one:.2f}x | <= 1.2x |\n"
               f"| adapter weights read from disk while switching | {len(reads)} | 0 |\n")
    print(section)
    if a.docs:
        write_section("Adapter switching", section)


if __name__ == "__main__":
    main()
