"""Two of your own runs and their combination, each on both held-out sets.

Trains smollm2-135m-instruct twice with its starter settings through `studio train`: once on
profile-json (chat: a person's card as strict JSON) and once on instructions (alpaca: short
answers). Then combines the two adapters with `studio adapters combine` (linear and cat, weights
0.5/0.5) and runs `studio eval` on each task's held-out prompts with every adapter as a column
(`--adapter`), as a user would. The table says what the combination kept of each parent's skill.

    .venv/bin/python bench/combine_heldout.py [--limit N] [--max-steps N] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODEL = os.environ.get("STUDIO_BENCH_MODEL", "smollm2-135m-instruct")  # tiny-llama: a quick check of the script
DATASETS = ROOT / "studio" / "assets" / "datasets"
HEADING = "Combining two runs: each held-out set"


def studio(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"studio {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=20, help="held-out examples per task")
    ap.add_argument("--max-steps", type=int, default=None, help="override the starter's steps")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--keep", default=None, help="train into this runs folder and keep it (default: a temporary one)")
    a = ap.parse_args()

    from bench.report import machine, write_section
    from studio.config import starter_config

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="combine-") as tmp:
        tmp = Path(tmp)
        runs = Path(a.keep) if a.keep else tmp / "runs"
        run_of = {}
        for task, data in (("profile-json", "profile-json.jsonl"), ("instructions", "instructions.jsonl")):
            cfg = starter_config(MODEL)
            cfg.data.path = str(DATASETS / data)
            if a.max_steps:
                cfg.train.max_steps = a.max_steps
            cfg.save(tmp / f"{task}.yaml")
            run_of[task] = Path(studio("train", str(tmp / f"{task}.yaml"), "--runs-dir", str(runs))
                                .strip().splitlines()[-1])
        mixes = {}
        for method in ("linear", "cat"):
            out = json.loads(studio("adapters", "combine", str(run_of["profile-json"]), str(run_of["instructions"]),
                                    "--weights", "0.5,0.5", "--method", method, "--name", f"mix-{method}",
                                    "--runs-dir", str(runs), "--json"))
            mixes[method] = out["out"]
        adapters = [str(run_of["profile-json"]), str(run_of["instructions"]), *mixes.values()]
        names = ["profile-json run", "instructions run", "linear 0.5/0.5", "cat 0.5/0.5"]
        results = {}
        for task, data in (("profile-json", str(DATASETS / "profile-json-heldout.jsonl")), ("instructions", None)):
            args = ["eval", str(run_of[task]), "--limit", str(a.limit), "--json"]
            if data:
                args += ["--data", data]
            for ad in adapters:
                args += ["--adapter", ad]
            results[task] = json.loads(studio(*args))
    wall = time.perf_counter() - t0

    rows = []
    for task, res in results.items():
        cols = res["columns"]
        m = res["metrics"]
        line = [f"{task} held-out ({res['n']})"]
        for col in cols:
            v = m[col]
            line.append(f"{v['exact_match']:.2f} / {v['rouge_l']:.2f} / {v['loss']:.3f}")
        rows.append((cols, line))
    cols = rows[0][0]
    header = ["", *(["base"] + names)[: len(cols)]]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(line) + " |" for _, line in rows]
    section = f"""## {HEADING}

`bench/combine_heldout.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}.
{MODEL} trained twice with its starter settings (one run on profile-json, one on instructions),
the two adapters combined by `studio adapters combine` (PEFT's add_weighted_adapter, weights 0.5/0.5),
and `studio eval --adapter ...` on each task's held-out prompts (the first {a.limit}); each cell is
exact match / ROUGE-L / reference loss. Columns in `studio eval`'s order: {', '.join(cols)}. Total {wall:.0f} s.

{chr(10).join(table)}
"""
    print(json.dumps({"metrics": {t: r["metrics"] for t, r in results.items()}, "columns": cols, "wall_s": wall}))
    print(section)
    if a.write_docs:
        write_section(HEADING, section)


if __name__ == "__main__":
    main()
