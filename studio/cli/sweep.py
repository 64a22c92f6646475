"""`studio sweep` and `studio queue`: grids of runs, and the queue they wait in."""

from __future__ import annotations

import json
import sys

from studio.errors import UsageError


def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="queue one run per point of a grid over config fields; `sweep show ID` compares them",
                       description="studio sweep CONFIG.yaml --grid KEY=V1,V2 [--grid ...]   |   studio sweep show SWEEP_ID")
    s.add_argument("target", nargs="+", metavar="CONFIG.yaml | show SWEEP_ID")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config field and its values, e.g. lora.r=1,4,16; target sets split by |: "
                        "lora.target_modules=q_proj|q_proj,v_proj|all-linear")
    s.add_argument("--name", default=None, help="the sweep's id (default sweep-DATE-TIME)")
    s.add_argument("--runs-dir", default=None)
    s.add_argument("--json", action="store_true")

    q = sub.add_parser("queue", help="the runs waiting to train: list, cancel, move up or down")
    q.add_argument("action", choices=["list", "cancel", "up", "down"])
    q.add_argument("run", nargs="?", help="run id (for cancel, up, down)")
    q.add_argument("--runs-dir", default=None)
    q.add_argument("--json", action="store_true")


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, default=str)
    sys.stdout.write("\n")


def cmd_sweep(a) -> int:
    from studio.config import load_config
    from studio.runs import sweep

    if a.target[0] == "show":
        if len(a.target) != 2:
            raise UsageError("studio sweep show needs one SWEEP_ID")
        rows = sweep.rows(a.target[1], a.runs_dir)
        if a.json:
            _print_json({"sweep": a.target[1], "rows": rows})
            return 0
        keys = list(rows[0]["grid"]) if rows else []
        print("  ".join(f"{k:>24}" for k in keys) + f"  {'state':>10} {'trainable':>12} {'final loss':>10} "
              f"{'best eval':>10} {'accuracy':>8} {'seconds':>8}  run")
        for r in rows:
            cells = "  ".join(f"{_short(r['grid'].get(k)):>24}" for k in keys)
            print(f"{cells}  {r['state']:>10} {_num(r['trainable'], ',d'):>12} {_num(r['final_loss'], '.4f'):>10} "
                  f"{_num(r['best_eval_loss'], '.4f'):>10} {_num(r['best_eval_accuracy'], '.3f'):>8} "
                  f"{_num(r['seconds'], '.0f'):>8}  {r['run']}")
        return 0
    if len(a.target) != 1:
        raise UsageError("studio sweep takes one CONFIG.yaml (or: studio sweep show SWEEP_ID)")
    base = load_config(a.target[0])
    out = sweep.start(base, sweep.parse_grid(a.grid), a.runs_dir, a.name)
    if a.json:
        _print_json(out)
    else:
        print(f"sweep {out['sweep']}: {len(out['runs'])} runs queued; follow with `studio sweep show {out['sweep']}`")
    return 0


def cmd_queue(a) -> int:
    from studio.runs import queue

    if a.action != "list" and not a.run:
        raise UsageError(f"studio queue {a.action} needs a RUN id (see studio queue list)")
    if a.action == "cancel":
        if not queue.cancel(a.runs_dir, a.run):
            raise UsageError(f"run {a.run} is not waiting in the queue (studio stop stops a running one)")
        print(f"{a.run}: removed from the queue")
        return 0
    if a.action in ("up", "down"):
        pos = queue.move(a.runs_dir, a.run, -1 if a.action == "up" else 1)
        print(f"{a.run}: position {pos}")
        return 0
    items = queue.entries(a.runs_dir)
    queue.ensure_runner(a.runs_dir)  # a runner killed by the system comes back when the queue is looked at
    if a.json:
        _print_json({"queue": items})
        return 0
    if not items:
        print("the queue is empty")
    for e in items:
        where = f"slot {e['slot']}" if e["slot"] is not None else f"#{e['position']}"
        print(f"{where:>10}  {e['state']:<10} {e['run']}")
    return 0


def _num(v, fmt: str) -> str:
    return "-" if not isinstance(v, (int, float)) else format(v, fmt)


def _short(v) -> str:
    s = ",".join(v) if isinstance(v, list) else str(v)
    return s if len(s) <= 24 else s[:21] + "..."


COMMANDS = {"sweep": cmd_sweep, "queue": cmd_queue}
