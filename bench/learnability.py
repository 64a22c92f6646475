"""The built-in datasets are learnable: the two demonstrations behind the offline defaults.

1. tiny-llama on assets/datasets/instructions.jsonl (examples/tiny-llama.yaml): the train loss
   at step 100 must be at most half the loss at step 1.
2. minilm-l6 on assets/datasets/sentiment.jsonl (examples/minilm-sentiment.yaml): eval accuracy
   of at least 85% after training, from a base (fresh head) near chance.

Both run through `studio train` exactly as a user would, into a temporary runs folder.

    .venv/bin/python bench/learnability.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def train(config: str, runs_dir: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "studio", "train", str(ROOT / config), "--runs-dir", str(runs_dir)],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"studio train {config} failed:\n{p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    from studio.playground import Playground

    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        run, secs = train("examples/tiny-llama.yaml", runs)
        rows = [r for r in metrics(run) if r.get("loss") is not None]
        first, last = rows[0], rows[-1]
        ratio = last["loss"] / first["loss"]
        print(f"tiny-llama: loss step {first['step']} = {first['loss']:.3f}, step {last['step']} = {last['loss']:.3f}, "
              f"ratio {ratio:.2f} (target <= 0.50) in {secs:.0f} s wall (process start included)")
        pg = Playground.for_run(run)
        print("  tuned answer to 'What is the capital of Iceland?':",
              repr(pg.generate("What is the capital of Iceland?", max_new_tokens=40, temperature=0)))

        run, secs = train("examples/minilm-sentiment.yaml", runs)
        acc = [r["eval_accuracy"] for r in metrics(run) if r.get("eval_accuracy") is not None]
        sample = Playground.for_run(run).eval_sample(n=10_000)
        print(f"minilm-l6: eval accuracy {acc[-1]:.1%} after training (target >= 85%); base (fresh head) "
              f"{sample['accuracy']['base']:.1%} on the same {sample['n']} eval examples; {secs:.0f} s wall")


if __name__ == "__main__":
    main()
