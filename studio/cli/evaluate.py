"""`studio eval RUN_DIR [--adapter A ...]`: held-out evaluation, base vs tuned or vs each adapter named
(the engine is studio/evaluate.py)."""

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
    e.add_argument("--adapter", action="append", default=None, metavar="NAME_OR_DIR",
                   help="compare this adapter of the run's base (a run folder, adapter folder or library name) "
                        "instead of the run's own; repeat for one column per adapter")
    e.add_argument("--json", action="store_true")


def cmd_eval(a) -> int:
    from studio.evaluate import evaluate

    tty = sys.stderr.isatty()

    def progress(done: int, total: int, phase: str) -> None:
        if tty:
            sys.stderr.write(f"\revaluating: {phase:<5} {done}/{total}\033[K")
            sys.stderr.flush()

    res = evaluate(a.run_dir, a.data, limit=a.limit, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                   progress=progress, adapters=a.adapter)
    if tty:
        sys.stderr.write("\n")
    if a.json:
        json.dump(res, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"{res['run']}: {res['n']} examples from {res['data']}")
    columns = res.get("columns") or ["base", "tuned"]
    metrics = res["metrics"]
    width = max(8, *(len(c) for c in columns))
    keys = [k for k in metrics["base"] if not isinstance(metrics["base"][k], dict)]
    print(f"{'metric':<12} " + " ".join(f"{c:>{width}}" for c in columns))
    for k in keys:
        print(f"{k:<12} " + " ".join(f"{_num(metrics[c].get(k)):>{width}}" for c in columns))
    for c in columns:
        cm = metrics[c].get("confusion_matrix")
        if cm:
            print(f"confusion matrix, {c} (rows gold, columns predicted: {', '.join(cm['labels'])}): {cm['matrix']}")
    for name, path in (res.get("adapters") or {}).items():
        print(f"{name}: {path}")
    label = max(10, *(len(c) + 1 for c in columns))
    for ex in res["examples"][:SHOWN_EXAMPLES]:
        print(f"\n{'prompt:':<{label}} {_clip(ex['prompt'])}\n{'reference:':<{label}} {_clip(ex['reference'])}")
        for c in columns:
            mark = "=" if ex[f"{c}_match"] else "x"
            print(f"{c + ':':<{label}} {mark} {_clip(ex[c])}")
    print(f"\nsaved: {res['saved']}")
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= COLUMN else text[: COLUMN - 3] + "..."


COMMANDS = {"eval": cmd_eval}
