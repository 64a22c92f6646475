"""`studio eval RUN_DIR`: held-out evaluation, base vs tuned (the engine is studio/evaluate.py)."""

from __future__ import annotations

import json
import sys

from studio.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

SHOWN_EXAMPLES = 5
COLUMN = 60  # characters of each answer shown in the text output


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a run on held-out prompts: base vs tuned, exact match, ROUGE-L, loss")
    e.add_argument("run_dir")
    e.add_argument("--data", default=None, help="a dataset file (default: the run's own held-out split)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    e.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    e.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts generated together")
    e.add_argument("--json", action="store_true")


def cmd_eval(a) -> int:
    from studio.evaluate import evaluate

    tty = sys.stderr.isatty()

    def progress(done: int, total: int, phase: str) -> None:
        if tty:
            sys.stderr.write(f"\revaluating: {phase:<5} {done}/{total}\033[K")
            sys.stderr.flush()

    res = evaluate(a.run_dir, a.data, limit=a.limit, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                   progress=progress)
    if tty:
        sys.stderr.write("\n")
    if a.json:
        json.dump(res, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"{res['run']}: {res['n']} examples from {res['data']}")
    base, tuned = res["metrics"]["base"], res["metrics"]["tuned"]
    keys = [k for k in base if not isinstance(base[k], dict)]
    print(f"{'metric':<12} {'base':>8} {'tuned':>8}")
    for k in keys:
        print(f"{k:<12} {_num(base[k]):>8} {_num(tuned[k]):>8}")
    for mode, m in (("base", base), ("tuned", tuned)):
        cm = m.get("confusion_matrix")
        if cm:
            print(f"confusion matrix, {mode} (rows gold, columns predicted: {', '.join(cm['labels'])}): {cm['matrix']}")
    for ex in res["examples"][:SHOWN_EXAMPLES]:
        print(f"\nprompt:    {_clip(ex['prompt'])}\nreference: {_clip(ex['reference'])}")
        for mode in ("base", "tuned"):
            mark = "=" if ex[f"{mode}_match"] else "x"
            print(f"{mode + ':':<10} {mark} {_clip(ex[mode])}")
    print(f"\nsaved: {res['saved']}")
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= COLUMN else text[: COLUMN - 3] + "..."


COMMANDS = {"eval": cmd_eval}
