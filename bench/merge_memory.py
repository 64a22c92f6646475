"""Peak memory and time of the studio's streaming merge against PEFT's merge_and_unload.

Builds a random base of TinyLlama-1.1B's shape (2.2 GB in bfloat16, in 9 safetensors
shards of at most 256 MiB) and a random rank-16 adapter on every attention and MLP
projection, then runs, each in its own fresh process on the same files:
  studio: studio.merge.merge(base, adapter, out, dtype="bfloat16")
  peft:   from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained
Each child reports its own peak RSS (getrusage ru_maxrss, so nothing between samples is
missed) and its RSS after imports, and the wall time of the work. The merged outputs are
compared tensor by tensor (the studio casts once from float32, PEFT rounds the delta to
bfloat16 first, so small differences are expected). Results go to a table on stdout and to
the "Merge" section of docs/benchmarks.md.

    python bench/merge_memory.py [--layers 22] [--keep DIR] [--no-docs]

Needs about 7 GB of free disk (base and two outputs) and 3 GB of RAM (for PEFT's side).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import DOCS, machine, write_section  # bench/report.py

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
SHARD_BYTES = 256 * 2**20


# --- inputs -------------------------------------------------------------------------------

def build_inputs(folder: Path, layers: int) -> tuple[Path, Path, int]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    cfg = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    cfg.save_pretrained(base)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, groups = {}, 0, []
    for name, shape in names.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if shard and shard_bytes + t.numel() * 2 > SHARD_BYTES:
            groups.append(shard)
            shard, shard_bytes = {}, 0
        shard[name] = t
        shard_bytes += t.numel() * 2
    groups.append(shard)
    weight_map, total = {}, 0
    for i, tensors in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, base / fname, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * 2
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for name, shape in names.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(R, in_f, generator=g) / in_f ** 0.5
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return base, adapter, total


# --- children -----------------------------------------------------------------------------

def child(kind: str, *args: str) -> None:
    if kind == "build":
        base, adapter, size = build_inputs(Path(args[0]), int(args[1]))
        import torch
        print(json.dumps({"base": str(base), "adapter": str(adapter), "size": size, "torch": torch.__version__,
                          "shards": len(list(base.glob("*.safetensors")))}))
        return
    if kind == "compare":
        print(json.dumps(compare(Path(args[0]), Path(args[1]))))
        return
    base, adapter, out = args
    import peft  # noqa: F401
    import psutil
    import torch
    import transformers  # noqa: F401

    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if kind == "studio":
        from studio.export.merge import merge

        merge(base, adapter, out, dtype="bfloat16")
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}))


def run_child(*args: str) -> dict:
    # The parent never imports torch and never holds tensors: a child's ru_maxrss starts from
    # the parent's RSS at fork time, so a fat parent would inflate every measurement.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} child failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Max |studio - peft| over all tensors, and the largest in units of bfloat16's ulp at PEFT's value."""
    import torch
    from safetensors import safe_open

    def where(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    assert set(wa) == set(wb), sorted(set(wa) ^ set(wb))[:5]
    worst, ulps = 0.0, 0.0
    for k in wa:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        d = (x - y).abs()
        worst = max(worst, d.max().item())
        # bfloat16 keeps 8 significant bits: for y = m * 2^e with m in [0.5, 1), one ulp is 2^(e - 8)
        ulp = torch.ldexp(torch.ones_like(y), torch.frexp(y)[1] - 8)
        ulps = max(ulps, (d / ulp).max().item())
    return {"max_abs_diff": worst, "max_diff_in_bf16_ulps": ulps}


# --- report -------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22, TinyLlama's: 2.2 GB in bfloat16)")
    ap.add_argument("--keep", type=Path, help="build the inputs in this folder and keep everything")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmpdir:
        folder = args.keep or Path(tmpdir)
        t0 = time.perf_counter()
        built = run_child("build", folder, args.layers)
        base, adapter, size, n_shards = built["base"], built["adapter"], built["size"], built["shards"]
        print(f"base: {size / 2**30:.2f} GiB bfloat16 in {n_shards} shards, built in {time.perf_counter() - t0:.0f} s")
        results = {}
        for kind in ("studio", "peft"):
            results[kind] = run_child(kind, base, adapter, folder / f"out-{kind}")
            print(f"{kind}: done in {results[kind]['seconds']:.1f} s")
        load = os.getloadavg()[0]  # other jobs on the machine slow both sides' times
        diff = run_child("compare", folder / "out-studio", folder / "out-peft")

    mb = lambda b: b / 2**20
    rows = [(k, mb(r["peak_rss"]), mb(r["peak_rss"] - r["baseline_rss"]), r["peak_rss"] / size, r["seconds"])
            for k, r in results.items()]
    table = ["| merge | peak RSS (MiB) | above imports (MiB) | peak / model size | time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    table += [f"| {k} | {p:,.0f} | {a:,.0f} | {x:.2f}x | {s:.1f} |" for k, p, a, x, s in rows]
    s, p = results["studio"], results["peft"]
    verdict = (f"Target (studio peak RSS < 0.5x model size, time no worse than PEFT's): "
               f"{'met' if s['peak_rss'] < 0.5 * size and s['seconds'] <= p['seconds'] else 'NOT met'}.")
    print("\n".join(table))
    print(verdict)
    if diff["max_abs_diff"] == 0:
        same_line = "The two merged models are identical, bit for bit."
    else:
        same_line = (f"Largest difference between the two merged models: {diff['max_abs_diff']:.3g} "
                     f"({diff['max_diff_in_bf16_ulps']:.2f} bfloat16 ulps).")
    print(same_line)
    section = "\n".join([
        "## Merge",
        "",
        "`bench/merge_memory.py`: a random Llama-shaped base (TinyLlama-1.1B's widths: hidden 2048, MLP 5632, "
        f"vocab 32000, {args.layers} layers, untied head) of {size / 2**30:.2f} GiB in bfloat16, in {n_shards} "
        f"safetensors shards, and a random r = {R} adapter on q/k/v/o/gate/up/down. Each merge runs in its "
        "own process on the same files, writing bfloat16. Peak RSS is the process's ru_maxrss, which includes "
        f"what importing torch, transformers and peft costs before any work ({mb(s['baseline_rss']):,.0f} MiB "
        "here); the next column subtracts it.",
        "",
        "- studio: `studio.merge.merge(base, adapter, out, dtype=\"bfloat16\")` (streams one tensor at a time)",
        "- peft: `from_pretrained(dtype=bfloat16)` + `PeftModel.from_pretrained` + `merge_and_unload()` + "
        "`save_pretrained`",
        "",
        *table,
        "",
        verdict,
        same_line,
        "",
        f"Measured {dt.date.today().isoformat()} on {machine(built['torch'])}; 1-minute load average "
        f"{load:.1f} when the merges finished (times move with it, memory does not).",
        "Re-run: `python bench/merge_memory.py` (rewrites this section only).",
        "",
    ])
    if not args.no_docs:
        write_section("Merge", section)
        print(f"wrote the Merge section of {DOCS}")


if __name__ == "__main__":
    main()
