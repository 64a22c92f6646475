"""Peak memory and time of `studio export gguf --quant f16` against load-merge-write in memory.

Uses the same random Llama-shaped base as bench/merge_memory.py (TinyLlama-1.1B's widths,
2.2 GB in bfloat16, 9 safetensors shards) and its rank-16 adapter, plus the studio's byte
tokenizer (the base has none, and a GGUF carries one). Each side runs in its own fresh process:
  studio (convert): studio.export.gguf.export_gguf(base, adapter, out, quant="f16", verify=False)
  studio (+ verify): the same with the verification every CLI export runs (transformers reads the
                     file back; PEFT's merge_and_unload gives the reference logits)
  naive:  from_pretrained(bf16) + PeftModel + merge_and_unload, then every tensor converted to
          f16 and handed to gguf-py's GGUFWriter.add_tensor (all in memory) and written
Peak RSS is each child's ru_maxrss (nothing between samples is missed). Results go to stdout and
to the "GGUF export" section of docs/benchmarks.md.

    python bench/gguf_export.py [--layers 22] [--keep DIR] [--no-docs]

Needs about 9 GB of free disk and 10 GB of RAM (the verification holds two float32 models).
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


def child(kind: str, *args: str) -> None:
    if kind == "build":
        from merge_memory import build_inputs  # bench/merge_memory.py: the same base and adapter

        from studio.models.registry import byte_tokenizer

        base, adapter, size = build_inputs(Path(args[0]), int(args[1]))
        byte_tokenizer().save_pretrained(base)
        import torch

        print(json.dumps({"base": str(base), "adapter": str(adapter), "size": size, "torch": torch.__version__,
                          "shards": len(list(base.glob("*.safetensors")))}))
        return
    base, adapter, out = args
    import peft  # noqa: F401
    import psutil
    import torch
    import transformers  # noqa: F401

    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    extra = {}
    if kind in ("studio", "studio-verify"):
        from studio.export.gguf import export_gguf

        rep = export_gguf(base, adapter, out, quant="f16", verify=kind == "studio-verify")
        extra = {"convert_seconds": rep.seconds, "verify": rep.verify, "verify_seconds": rep.verify_seconds,
                 "sampled_peak_mb": rep.peak_rss_mb}
    else:
        naive(Path(base), Path(adapter), Path(out))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline,
                      "bytes": Path(out).stat().st_size, **extra}, default=str))


def naive(base: Path, adapter: Path, out: Path) -> None:
    """The obvious way: the merged model in memory, every converted tensor held by the writer."""
    import gguf
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from studio.export.gguf import _Writer  # gguf-py's writer, able to write the empty merges
    from studio.export.gguf_arch import _add_hparams
    from studio.export.gguf_vocab import read_vocab, write_vocab

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    cfg = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = _Writer(out, "llama")
    vocab = read_vocab(AutoTokenizer.from_pretrained(base), cfg["vocab_size"])
    _add_hparams(w, "llama", cfg, len(vocab.tokens))
    write_vocab(w, vocab)
    for name, t in model.state_dict().items():
        t = t.float()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's row order, as convert_hf_to_gguf.py
            n = heads if "q_proj" in name else kv
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        data = t.numpy().astype("float32" if t.ndim == 1 else "float16")
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_child(*args: str) -> dict:
    # The parent never imports torch: a child's ru_maxrss starts from the parent's RSS at fork time.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}")
    p = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} child failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22, TinyLlama's: 2.2 GB in bfloat16)")
    ap.add_argument("--keep", type=Path, help="build the inputs in this folder and keep everything")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmpdir:
        folder = args.keep or Path(tmpdir)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        done = folder / "built.json"  # --keep: a second run reuses the inputs
        built = json.loads(done.read_text()) if done.is_file() else run_child("build", folder, args.layers)
        done.write_text(json.dumps(built))
        base, adapter, size, n_shards = built["base"], built["adapter"], built["size"], built["shards"]
        print(f"base: {size / 2**30:.2f} GiB bfloat16 in {n_shards} shards, built in {time.perf_counter() - t0:.0f} s")
        results = {}
        for kind in ("studio", "naive", "studio-verify"):
            out = folder / f"{kind}.gguf"
            results[kind] = run_child(kind, base, adapter, out)
            out.unlink(missing_ok=True)  # 2 GB each: keep the disk free for the next side
            print(f"{kind}: {results[kind]['seconds']:.1f} s, peak RSS {results[kind]['peak_rss'] / 2**20:,.0f} MiB",
                  flush=True)
        load = os.getloadavg()[0]

    mb = lambda b: b / 2**20
    table = ["| export (f16) | peak RSS (MiB) | above imports (MiB) | peak / model size | time (s) | file (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for k, r in results.items():
        table.append(f"| {k} | {mb(r['peak_rss']):,.0f} | {mb(r['peak_rss'] - r['baseline_rss']):,.0f} | "
                     f"{r['peak_rss'] / size:.2f}x | {r['seconds']:.1f} | {mb(r['bytes']):,.0f} |")
    s, n, v = results["studio"], results["naive"], results["studio-verify"]
    verdict = (f"Target (conversion peak RSS <= 0.5x model size, time no worse than the naive load + write): "
               f"{'met' if s['peak_rss'] <= 0.5 * size and s['seconds'] <= n['seconds'] else 'NOT met'}.")
    vv = v.get("verify") or {}
    verify_line = (f"Verification (transformers' GGUF reader against PEFT's merge): tokenizer round trip "
                   f"{'ok' if vv.get('tokenizer_ok') else 'FAILED'}, next-token agreement {vv.get('agreement')}, "
                   f"max |logit diff| {vv.get('max_abs_logit_diff', float('nan')):.3g}; it took "
                   f"{v.get('verify_seconds') or 0:.0f} s and is what raises the verified export's peak.")
    print("\n".join(table))
    print(verdict)
    print(verify_line)
    section = "\n".join([
        "## GGUF export",
        "",
        "`bench/gguf_export.py`: the base and adapter of the Merge section (random TinyLlama-1.1B shape, "
        f"{args.layers} layers, {size / 2**30:.2f} GiB bfloat16 in {n_shards} shards, r = 16 on q/k/v/o/gate/up/down) "
        "with the studio's byte tokenizer, exported to one f16 GGUF. Each side runs in its own process; peak RSS "
        f"is ru_maxrss, including the imports ({mb(s['baseline_rss']):,.0f} MiB here).",
        "",
        "- studio: `export_gguf(..., quant=\"f16\", verify=False)`: the streaming conversion alone",
        "- naive: `from_pretrained(bf16)` + `PeftModel` + `merge_and_unload()`, then every tensor to f16 into "
        "gguf-py's `GGUFWriter.add_tensor` and `write_tensors_to_file`",
        "- studio-verify: what `studio export gguf --quant f16` runs: the conversion, then the verification",
        "",
        *table,
        "",
        verdict,
        verify_line,
        "",
        f"Measured {dt.date.today().isoformat()} on {machine(built['torch'])}; 1-minute load average {load:.1f} "
        "at the end (times move with it, memory does not).",
        "Re-run: `python bench/gguf_export.py` (rewrites this section only).",
        "",
    ])
    if not args.no_docs:
        write_section("GGUF export", section)
        print(f"wrote the GGUF export section of {DOCS}")


if __name__ == "__main__":
    main()
