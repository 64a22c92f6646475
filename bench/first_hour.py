"""A newcomer's first hour: the built-in SmolLM2 learns profile-json with its starter settings.

1. Train smollm2-135m-instruct on assets/datasets/profile-json.jsonl with the starter settings
   (studio/config.py STARTERS) through `studio train`, as a user would; the one-time GGUF
   conversion is done first and timed apart, so the figure is training alone.
2. `studio eval RUN --data profile-json-heldout.jsonl`: exact match base vs tuned on held-out
   prompts unlike the training ones (other names, cities, jobs and sentence shapes). The skill
   counts as visible when tuned exact match is at least VISIBLE and base's is below it.
3. Eval speed on the same SPEED_PROMPTS single-turn prompts (the first turn of each held-out
   conversation): one batched `studio eval` process vs one `studio generate` process per prompt
   (tuned only, which is half the work eval does: eval answers with base and tuned). Seconds per
   example include each process's start and model load, which is what a person waits for.

    .venv/bin/python bench/first_hour.py [--generate-prompts N] [--write-docs]

Prints a docs/benchmarks.md section and a JSON line; --write-docs rewrites that section in place.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

MODEL = "smollm2-135m-instruct"
HELDOUT = ROOT / "studio" / "assets" / "datasets" / "profile-json-heldout.jsonl"
SPEED_PROMPTS = 30
MAX_NEW_TOKENS = 48  # a card is 25 to 35 tokens; base's prose runs to the limit
VISIBLE = 0.5
HEADING = "First hour: SmolLM2 learns profile-json"


LOAD: dict[str, list[float]] = {}  # phase -> 1-minute load averages sampled while it ran


def studio(*args: str, timeout: float | None = None, phase: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `studio ARGS` as a user would; the machine's load is sampled every 2 s meanwhile, since
    other work on a 2-core machine slows small-batch generation far more than training."""
    samples = LOAD.setdefault(phase or args[0], [])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "studio", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=_sample_load, args=(proc, samples), daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=timeout)
    dt = time.perf_counter() - t0
    sampler.join()
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if p.returncode != 0:
        raise SystemExit(f"studio {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p, dt


def _sample_load(proc: subprocess.Popen, samples: list[float]) -> None:
    while proc.poll() is None:
        samples.append(os.getloadavg()[0])
        time.sleep(2)


def first_turns(n: int, out: Path) -> list[str]:
    """The first user message of the first n held-out conversations, written as one-turn conversations."""
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()][:n]
    singles = [{"messages": r["messages"][:2]} for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in singles))
    return [r["messages"][0]["content"] for r in singles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generate-prompts", type=int, default=SPEED_PROMPTS,
                    help="how many of the speed prompts also get a `studio generate` call (all: the full comparison)")
    ap.add_argument("--model", default=MODEL, help="model reference (default the built-in)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite this section of docs/benchmarks.md")
    ap.add_argument("--max-steps", type=int, default=None, help="override the starter's steps (a quick check of the script)")
    a = ap.parse_args()

    from bench.report import machine, write_section
    from studio.config import starter_config
    from studio.models.registry import model_dir

    t0 = time.perf_counter()
    model_dir(a.model)  # the one-time conversion (cached), timed apart from training
    convert_s = time.perf_counter() - t0
    cfg = starter_config(MODEL)
    cfg.model.name_or_path = a.model
    if a.max_steps:
        cfg.train.max_steps = a.max_steps
    with tempfile.TemporaryDirectory(prefix="first-hour-") as tmp:
        tmp = Path(tmp)
        cfg.save(tmp / "config.yaml")
        p, train_wall = studio("train", str(tmp / "config.yaml"), "--runs-dir", str(tmp / "runs"))
        run = Path(p.stdout.strip().splitlines()[-1])
        status = json.loads((run / "status.json").read_text())
        if status["state"] != "completed":
            raise SystemExit(f"run ended {status['state']}: {status.get('error')}")

        p, heldout_wall = studio("eval", str(run), "--data", str(HELDOUT), "--max-new-tokens", str(MAX_NEW_TOKENS),
                                 "--json", phase="heldout eval")
        full = json.loads(p.stdout)

        prompts = first_turns(SPEED_PROMPTS, tmp / "speed.jsonl")
        p, eval_wall = studio("eval", str(run), "--data", str(tmp / "speed.jsonl"), "--max-new-tokens",
                              str(MAX_NEW_TOKENS), "--json", phase="speed eval")
        speed = json.loads(p.stdout)
        gen_walls, agree = [], 0
        tuned_by_prompt = {e["prompt"]: e["tuned"] for e in speed["examples"]}
        for prompt in prompts[: a.generate_prompts]:
            p, dt = studio("generate", str(run), "--prompt", prompt, "--max-new-tokens", str(MAX_NEW_TOKENS),
                           "--json")
            gen_walls.append(dt)
            agree += json.loads(p.stdout)["text"] == tuned_by_prompt[prompt]

    m_base, m_tuned = full["metrics"]["base"], full["metrics"]["tuned"]
    eval_per_example = eval_wall / speed["n"]
    gen_per_prompt = sum(gen_walls) / len(gen_walls) if gen_walls else None
    res = {
        "model": a.model, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1m": {k: round(max(v), 1) for k, v in LOAD.items() if v}, "settings": {k: v for k, v in cfg.to_dict().items() if k != "model"},
        "convert_s": round(convert_s, 1), "train_wall_s": round(train_wall, 1),
        "train_elapsed_s": status.get("elapsed_s"), "steps": status.get("step"),
        "heldout_n": full["n"], "heldout_exact_match": {"base": m_base["exact_match"], "tuned": m_tuned["exact_match"]},
        "heldout_rouge_l": {"base": m_base["rouge_l"], "tuned": m_tuned["rouge_l"]},
        "heldout_loss": {"base": m_base["loss"], "tuned": m_tuned["loss"]},
        "visible": m_tuned["exact_match"] >= VISIBLE > m_base["exact_match"],
        "speed_n": speed["n"], "eval_wall_s": round(eval_wall, 1), "eval_s_per_example": round(eval_per_example, 2),
        "generate_calls": len(gen_walls), "generate_s_per_prompt": round(gen_per_prompt, 2) if gen_per_prompt else None,
        "speedup_per_example": round(gen_per_prompt / eval_per_example, 1) if gen_per_prompt else None,
        "speedup_per_generation": round(gen_per_prompt / (eval_per_example / 2), 1) if gen_per_prompt else None,
        "generate_agrees_with_eval": f"{agree}/{len(gen_walls)}",
        "example": next((e for e in full["examples"] if e["tuned_match"] and not e["base_match"]), None),
    }
    print(json.dumps(res))
    t = res["settings"]["train"]
    lora = res["settings"]["lora"]
    section = f"""## {HEADING}

`bench/first_hour.py`, {res['date']}, {res['machine']}; highest 1-minute load average while each step ran:
{', '.join(f'{k} {v}' for k, v in res['load_avg_1m'].items())} (the step itself accounts for up to 2 of it: a higher figure means other work shared the 2 cores).
{a.model} trained on `assets/datasets/profile-json.jsonl` with its starter settings (r={lora['r']},
lora_alpha={lora['lora_alpha']}, {lora['target_modules']}, lr {t['learning_rate']}, {t['max_steps']} steps of
{t['per_device_train_batch_size']} x {res['settings']['data']['max_length']} tokens) through `studio train`,
then `studio eval` on `profile-json-heldout.jsonl` ({res['heldout_n']} conversations unlike the training ones).

| | base | tuned |
| --- | --- | --- |
| exact match | {m_base['exact_match']:.2f} | {m_tuned['exact_match']:.2f} |
| ROUGE-L | {m_base['rouge_l']:.2f} | {m_tuned['rouge_l']:.2f} |
| reference loss | {m_base['loss']:.3f} | {m_tuned['loss']:.3f} |

- Training: {res['train_wall_s']:.0f} s wall for `studio train` (the GGUF conversion before it, once per machine:
  {res['convert_s']:.0f} s; 0 when cached). Skill visible (tuned exact match >= {VISIBLE}, base below): {res['visible']}.
- Eval speed on the same {res['speed_n']} one-turn prompts, {MAX_NEW_TOKENS} new tokens at most, process start and
  model load included: batched `studio eval` {res['eval_s_per_example']:.2f} s per example (base and tuned
  answers both), `studio generate` {res['generate_s_per_prompt']} s per prompt ({res['generate_calls']} calls, tuned
  only): {res['speedup_per_example']}x per example, {res['speedup_per_generation']}x per generated answer.
"""
    print(section)
    if a.write_docs:
        write_section(HEADING, section)


if __name__ == "__main__":
    main()
