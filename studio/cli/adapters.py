"""`studio adapters list | import | combine`: the adapter library from the command line."""

from __future__ import annotations

import json
import sys

from studio.errors import UsageError


def add_parser(sub) -> None:
    a = sub.add_parser("adapters", help="the adapter library: list, import, combine (weighted, PEFT's methods)")
    s = a.add_subparsers(dest="adapters_cmd", required=True, metavar="ACTION")
    ls = s.add_parser("list", help="every adapter, grouped by base model")
    ls.add_argument("--runs-dir", default=None)
    ls.add_argument("--json", action="store_true")
    im = s.add_parser("import", help="check a PEFT adapter folder or zip and keep it in the library")
    im.add_argument("path")
    im.add_argument("--name", default=None)
    im.add_argument("--base", default=None, help="the model it was trained on, if its config does not name it")
    im.add_argument("--runs-dir", default=None)
    im.add_argument("--json", action="store_true")
    co = s.add_parser("combine", help="one adapter from several of one base: A B ... --weights W1,W2 --method M")
    co.add_argument("adapters", nargs="+", help="run folders, adapter folders or library names")
    co.add_argument("--weights", required=True, help="one weight per adapter, e.g. 0.7,0.3")
    co.add_argument("--method", required=True,
                    help="linear, cat, svd, ties, ties_svd, dare_linear, dare_ties or magnitude_prune")
    co.add_argument("--density", type=float, default=None, help="share kept by ties / dare / magnitude_prune, in (0, 1]")
    co.add_argument("--out", default=None, help="output folder (default: the library, RUNS/adapters/NAME)")
    co.add_argument("--name", default=None)
    co.add_argument("--runs-dir", default=None)
    co.add_argument("--json", action="store_true")


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, default=str)
    sys.stdout.write("\n")


def cmd_adapters(a) -> int:
    from studio.adapters import combine, library

    if a.adapters_cmd == "list":
        items = [e.to_dict() for e in library.entries(a.runs_dir)]
        if a.json:
            _print_json({"adapters": items})
            return 0
        if not items:
            print("no adapters yet: train a run, or studio adapters import PATH")
        for base in sorted({str(e["base"]) for e in items}):
            print(f"{base}:")
            for e in (e for e in items if str(e["base"]) == base):
                print(f"  {e['name']:<44} {e['origin']:<10} r={e['r']!s:<4} alpha={e['lora_alpha']!s:<6} "
                      f"{e['size_bytes'] / 2**20:7.2f} MB  {','.join(e['targets'])[:40]}")
        return 0
    if a.adapters_cmd == "import":
        e = library.import_adapter(a.path, a.name, a.runs_dir, a.base).to_dict()
        _print_json(e) if a.json else print(f"imported {e['name']} ({e['base']}) into {e['path']}")
        return 0
    try:
        weights = [float(w) for w in a.weights.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--weights {a.weights!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    out = combine.combine(a.adapters, weights, a.method, a.density, a.out, a.runs_dir, a.name)
    _print_json(out) if a.json else print(f"combined {', '.join(out['parents'])} by {out['method']} into {out['out']} "
                                         f"(r = {out['r']}, {out['seconds']:.1f} s)")
    return 0


COMMANDS = {"adapters": cmd_adapters}
