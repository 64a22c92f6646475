"""Sweeps: one run per point of a grid over config fields, queued, then compared in one table.

A grid is a few dotted config keys with the values to try (`lora.r=1,4,16`,
`lora.target_modules=query|query,value|all-linear`: sets of targets are separated by `|`); its
points are the cartesian product. Every point is a whole run config, validated and preflighted
before anything is queued, so a sweep either queues all its runs or none. Each run records the
sweep's id and its point (`sweep`, `grid`) in status.json; the run folders stay the only record
of a sweep, and `rows` reads them back as the table the LoRA paper's ablations are (Tables 5, 6).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import time
from pathlib import Path

from studio.config import SECTIONS, RunConfig
from studio.errors import ConfigError
from studio.runs import manager, queue

MAX_POINTS = 64
# Fields whose value is a list or a string: a grid value for them is one set, sets split by "|".
SET_FIELDS = {"lora.target_modules", "lora.exclude_modules", "lora.modules_to_save", "lora.layers_to_transform"}


def keys() -> list[str]:
    """Every dotted key a grid may vary; mappings (rank_pattern, alpha_pattern, columns) are not."""
    return [f"{sec}.{f.name}" for sec, klass in SECTIONS.items() for f in dataclasses.fields(klass)
            if f.type != "dict"]


def parse_grid(specs: list[str]) -> dict[str, list]:
    """["lora.r=1,4,16", ...] -> {"lora.r": [1, 4, 16], ...}; each key checked, nearest one named."""
    if not specs:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid lora.r=4,8,16)")
    grid: dict[str, list] = {}
    known = keys()
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. lora.r=4,8,16)")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"--grid {key}: no such config field; {hint}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        parts = values.split("|") if key in SET_FIELDS else values.split(",")
        grid[key] = [_value(key, p.strip()) for p in parts if p.strip()]
    return grid


def _value(key: str, text: str):
    if key in SET_FIELDS:
        if key == "lora.layers_to_transform" or text == "all-linear" or text.startswith("re:"):
            return text
        return [t.strip() for t in text.split(",") if t.strip()]
    sec, name = key.split(".", 1)
    kind = next(f.type for f in dataclasses.fields(SECTIONS[sec]) if f.name == name)
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)  # 2e-4 too, which YAML would read as a string
    except ValueError:
        return text  # the config's own check names it, with the field
    if kind == "bool":
        return {"true": True, "false": False}.get(text.lower(), text)
    if kind == "str":
        return text
    import yaml

    v = yaml.safe_load(text)
    return text if v is None else v


def points(grid: dict[str, list]) -> list[dict]:
    keys_ = list(grid)
    out = [dict(zip(keys_, combo)) for combo in itertools.product(*(grid[k] for k in keys_))]
    if not out:
        raise ConfigError("the grid has no points: give each --grid key at least one value")
    if len(out) > MAX_POINTS:
        raise ConfigError(f"the grid has {len(out)} points ({' x '.join(str(len(v)) for v in grid.values())}); "
                          f"a sweep may have at most {MAX_POINTS}")
    return out


def point_config(base: RunConfig, point: dict, source: str = "sweep") -> RunConfig:
    d = base.to_dict()
    for key, value in point.items():
        sec, name = key.split(".", 1)
        d[sec][name] = value
    return RunConfig.from_dict(d, source=source)


def plan(base: RunConfig, grid: dict[str, list]) -> list[tuple[dict, RunConfig]]:
    """Every point's validated config; every invalid value is named at once, not one per try."""
    bad = []
    for key, values in grid.items():
        for v in values:
            try:
                point_config(base, {key: v}, source="--grid")
            except ConfigError as e:
                bad.append(str(e).removeprefix("--grid: "))
    if bad:
        raise ConfigError("invalid grid values: " + "; ".join(dict.fromkeys(bad)))
    return [(p, point_config(base, p)) for p in points(grid)]


def trainable(cfg: RunConfig) -> int:
    """The run's trainable parameters, as PEFT will count them (the model tree is cached)."""
    from studio import lora
    from studio.models.tree import model_tree

    m = cfg.model
    return lora.check(model_tree(m.name_or_path, m.task, m.trust_remote_code), cfg.lora).trainable


def start(base: RunConfig, grid: dict[str, list], root=None, name: str | None = None) -> dict:
    """Validate and preflight every point, then queue one run per point. Returns {sweep, runs}."""
    from studio.runs.preflight import preflight

    root = manager.runs_dir(root)
    sweep_id = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", sweep_id):
        raise ConfigError(f"--name {sweep_id!r}: a sweep name may hold letters, digits, '.', '_' and '-' (64 at most)")
    if any(r["sweep"] == sweep_id for r in _members(root)):
        raise ConfigError(f"sweep {sweep_id} already exists in {root}; pick another --name")
    todo = plan(base, grid)
    seen: dict[str, int] = {}
    counted = []
    for point, cfg in todo:
        key = cfg.to_yaml()
        if key not in seen:
            preflight(cfg)
            seen[key] = trainable(cfg)
        counted.append((point, cfg, seen[key]))
    run_dirs = []
    for point, cfg, n in counted:
        run_dirs.append(queue.enqueue(cfg, root, extra_status={"sweep": sweep_id, "grid": point,
                                                               "trainable_params": n}))
    return {"sweep": sweep_id, "runs": [d.name for d in run_dirs]}


def _members(root: Path) -> list[dict]:
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        st = manager.read_json(d / manager.STATUS) if d.is_dir() else None
        if st and st.get("sweep"):
            out.append({"dir": d, "sweep": st["sweep"], "status": st})
    return out


def sweeps(root=None) -> list[dict]:
    """Every sweep of the runs folder: id, number of runs, how many are completed."""
    by: dict[str, list] = {}
    root = manager.runs_dir(root)
    for m in _members(root):
        by.setdefault(m["sweep"], []).append(m)
    return [{"sweep": s, "runs": len(ms),
             "completed": sum(manager.read_status(m["dir"])["state"] == "completed" for m in ms)}
            for s, ms in sorted(by.items())]


def rows(sweep_id: str, root=None) -> list[dict]:
    """One row per run of the sweep: run, state, grid, trainable, final_loss, best_eval_loss,
    best_eval_accuracy (classification), seconds."""
    root = manager.runs_dir(root)
    members = [m for m in _members(root) if m["sweep"] == sweep_id]
    if not members:
        known = sorted({m["sweep"] for m in _members(root)})
        raise ConfigError(f"no sweep {sweep_id!r} in {root}" + (f"; sweeps there: {', '.join(known)}" if known else ""))
    out = []
    for m in members:
        st = manager.read_status(m["dir"])
        metrics, _ = manager.read_metrics(m["dir"])
        evals = [r["eval_loss"] for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
        accs = [r["eval_accuracy"] for r in metrics if isinstance(r.get("eval_accuracy"), (int, float))]
        out.append({"run": m["dir"].name, "state": st.get("state"), "grid": st.get("grid") or {},
                    "trainable": st.get("trainable_params"), "final_loss": st.get("last_loss"),
                    "best_eval_loss": min(evals) if evals else None,
                    "best_eval_accuracy": max(accs) if accs else None, "seconds": st.get("elapsed_s")})
    return out
