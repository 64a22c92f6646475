"""Weighted combinations of adapters of one base: PEFT's `add_weighted_adapter`, saved as a new adapter.

The maths is PEFT's (linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, magnitude_prune);
this module adds what a person needs around it: the choice of adapters by run, folder or library
name, the checks PEFT would otherwise make half-way through a load (the same base, ranks that the
method can take, weights for every adapter, a density in (0, 1]), each refusal naming the methods
that would work, and a record of the parents, weights, method and density beside the result
(`combination.json`), which merge, GGUF export, eval and the Playground read like any adapter.
The DARE methods drop entries at random: the seed is fixed and recorded, so a combination repeats.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from studio.adapters.file import AdapterFile
from studio.adapters.library import COMBINATION, Entry, library_dir, resolve, same_base
from studio.errors import AdapterError
from studio.runs import manager
from studio.runs.rundir import is_run_id

# Methods that add A and B of each adapter separately need one rank; the others do not.
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
WITH_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
SEED = 0


def _rank(a: AdapterFile) -> int:
    pattern = a.config.get("rank_pattern") or {}
    return max([int(a.config.get("r") or 8), *map(int, pattern.values())])


def methods_for(entries: list[Entry]) -> dict[str, str | None]:
    """Each method -> None if it can combine these adapters, else why not (for the UI, up front)."""
    files = [AdapterFile(e.path) for e in entries]
    ranks = {_rank(a) for a in files}
    kinds = {type(a.config.get("target_modules")).__name__ for a in files}
    mts = [set(a.config.get("modules_to_save") or []) for a in files]
    shared_mts = set.intersection(*mts) if len(mts) > 1 else set()
    base_problem = None
    if len(entries) < 2:
        base_problem = "pick at least two adapters"
    elif not all(same_base(entries[0], e) for e in entries[1:]):
        other = next(e for e in entries[1:] if not same_base(entries[0], e))
        base_problem = (f"{entries[0].name} was trained on {entries[0].base} but {other.name} on {other.base}; "
                        "adapters of different bases cannot be combined")
    elif len(kinds) > 1:
        base_problem = "some adapters name their targets by a pattern and others by a list; PEFT cannot combine them"
    elif shared_mts:
        base_problem = (f"more than one adapter trains {', '.join(sorted(shared_mts))} in full (modules_to_save); "
                        "those copies cannot be combined")
    out = {}
    for m in METHODS:
        if base_problem:
            out[m] = base_problem
        elif m in SAME_RANK and len(ranks) > 1:
            out[m] = f"needs adapters of one rank; these have r = {', '.join(map(str, sorted(ranks)))}"
        else:
            out[m] = None
    return out


def check(entries: list[Entry], weights: list[float], method: str, density: float | None) -> None:
    if method not in METHODS:
        raise AdapterError(f"--method {method!r} is not one of: {', '.join(METHODS)}")
    if len(weights) != len(entries):
        raise AdapterError(f"--weights gives {len(weights)} weight(s) for {len(entries)} adapters; give one per adapter")
    if method in WITH_DENSITY:
        if density is None or not (0 < density <= 1):
            raise AdapterError(f"--method {method} needs --density in (0, 1] (the share of entries kept), got {density}")
    elif density is not None:
        raise AdapterError(f"--density is used only by {', '.join(WITH_DENSITY)}; {method} does not prune")
    why = methods_for(entries)
    if why[method]:
        ok = [m for m, reason in why.items() if reason is None]
        raise AdapterError(f"{method}: {why[method]}" + (f"; methods that can: {', '.join(ok)}" if ok else ""))


def combine(refs: list[str], weights: list[float], method: str, density: float | None = None,
            out: str | os.PathLike | None = None, root=None, name: str | None = None) -> dict:
    """Combine the adapters `refs` with `weights` by `method`; returns {out, method, weights, parents, ...}."""
    root = manager.runs_dir(root)
    entries = [resolve(r, root) for r in refs]
    check(entries, [float(w) for w in weights], method, density)
    if out is None:
        name = name or f"combined-{time.strftime('%Y%m%d-%H%M%S')}"
        if not is_run_id(name):
            raise AdapterError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
        out = library_dir(root) / name
    out = Path(out)
    if out.exists():
        raise AdapterError(f"{out} already exists; pick another --out or --name")
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _combine_into(entries, [float(w) for w in weights], method, density, tmp)
        record = {"parents": [{"name": e.name, "path": e.path} for e in entries], "weights": list(map(float, weights)),
                  "method": method, "density": density, "seed": SEED, "base": entries[0].base,
                  "task": entries[0].task, "created_at": time.time()}
        manager.write_json_atomic(tmp / COMBINATION, record)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    a = AdapterFile(out)
    return {"out": str(out), "method": method, "weights": list(map(float, weights)), "density": density,
            "parents": [e.name for e in entries], "r": a.config.get("r"), "seconds": round(time.monotonic() - t0, 3)}


def _combine_into(entries: list[Entry], weights: list[float], method: str, density, folder: Path) -> None:
    import torch
    from peft import PeftModel

    from studio.models.registry import load_model

    model = load_model(entries[0].base, entries[0].task or "causal_lm")
    names = [f"a{i}" for i in range(len(entries))]
    pm = PeftModel.from_pretrained(model, entries[0].path, adapter_name=names[0])
    for n, e in zip(names[1:], entries[1:]):
        pm.load_adapter(e.path, adapter_name=n)
    torch.manual_seed(SEED)
    try:
        pm.add_weighted_adapter(names, weights, "combined", combination_type=method, density=density)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"PEFT cannot combine these adapters by {method}: {str(e).splitlines()[0]}") from None
    folder.mkdir(parents=True)
    pm.save_pretrained(str(folder), selected_adapters=["combined"])
    # PEFT writes a non-default adapter into a subfolder of its name: lift it to the top.
    sub = folder / "combined"
    for p in sub.iterdir():
        os.replace(p, folder / p.name)
    sub.rmdir()
    for p in Path(entries[0].path).iterdir():  # the tokenizer the first parent was trained with
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(p, folder / p.name)
