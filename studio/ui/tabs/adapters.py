"""Adapters tab: the adapter library (studio.adapters.library), import, weighted combination
(studio.adapters.combine) and a comparison of the adapters of one base.

The library lists every adapter the studio knows: runs' final adapters, checkpoints of runs still
going, combined and imported ones, with base, r, targets, alpha, size and origin. Import takes a
PEFT adapter zip (uploaded) or a folder path and keeps it only once the engine's checks pass.
Combine picks adapters, a weight each, a method and a density, and says before the button whether
the method can take those adapters, and which methods can; the result joins the library, where
the Playground, `studio eval --adapter` and `studio merge --adapter` find it. Compare shows, for the
adapters of one base, their saved held-out metrics (each run's eval/*.json) and their pairwise
subspace similarity (studio.analysis, the Analysis tab's measure). Messages sit next to the buttons.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from studio.errors import StudioError

MAX_COMBINE = 4  # weight sliders; the CLI takes any number
MAX_COMPARED = 6  # adapters in the similarity table: pairs grow as n^2 and each reads both adapters
LIBRARY_HEADERS = ["name", "base", "origin", "r", "lora_alpha", "targets", "size (MB)"]
METRIC_HEADERS = ["adapter", "evaluated on", "n", "exact match", "ROUGE-L", "loss", "accuracy", "macro F1"]
SIMILARITY_HEADERS = ["adapter A", "adapter B", "modules", "phi(1,1) of B", "mean phi of B", "phi(1,1) of A",
                      "random phi(1,1)"]
PICK_TWO = "pick two or more adapters of one base to combine"
NO_ADAPTERS = ("No adapters yet. Train a run on the **Train** tab (its adapter appears here), or import a PEFT "
               "adapter below.")


def message(text: str, kind: str = "bad") -> str:
    """A line next to a button: "bad" (⚠, red), "ok" (✔) or "note" (plain)."""
    mark = {"bad": "⚠ ", "ok": "✔ ", "note": ""}[kind]
    return f"<div class='{'bad' if kind == 'bad' else 'ad-' + kind}'>{mark}{html.escape(text)}</div>" if text else ""


def _entries(runs_dir: Path) -> list:
    from studio.adapters import library

    try:
        return library.entries(runs_dir)
    except StudioError:
        return []


def _by_name(runs_dir: Path) -> dict:
    return {e.name: e for e in _entries(runs_dir)}


def _groups(entries: list) -> list[list]:
    """The entries grouped by base model (the same model under two spellings is one group)."""
    from studio.adapters import library

    groups: list[list] = []
    for e in entries:
        for g in groups:
            if library.same_base(g[0], e):
                g.append(e)
                break
        else:
            groups.append([e])
    return groups


# --- the library ----------------------------------------------------------------------------

def library_view(runs_dir: Path, v: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The table, and the choices that come from it (combine's adapters, compare's bases)."""
    v = v or {}
    entries = _entries(runs_dir)
    rows = [[e.name, e.base, e.origin, e.r, e.lora_alpha, ", ".join(e.targets), round(e.size_bytes / 2**20, 3)]
            for e in entries]
    names = [e.name for e in entries]
    bases = [str(g[0].base) for g in _groups(entries)]
    keep = [n for n in v.get("adapters.pick") or [] if n in names]
    base = v.get("adapters.base")
    return {"adapters.table": rows, "adapters.notice": "" if entries else NO_ADAPTERS,
            "adapters.pick": gr.update(choices=names, value=keep),
            "adapters.base": gr.update(choices=bases, value=base if base in bases else (bases[0] if bases else None))}


# --- import ---------------------------------------------------------------------------------

def do_import(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    from studio.adapters import library

    upload, path = v["adapters.upload"], (v["adapters.import_path"] or "").strip()
    if upload and path:
        return {"adapters.import_message": message("give either an uploaded zip or a folder path, not both")}
    src = upload or path
    if not src:
        return {"adapters.import_message": message("upload a PEFT adapter zip or type the path of an adapter folder")}
    try:
        e = library.import_adapter(src, (v["adapters.import_name"] or "").strip() or None, runs_dir,
                                   (v["adapters.import_base"] or "").strip() or None)
    except StudioError as err:
        return {"adapters.import_message": message(str(err).splitlines()[0])}
    return {"adapters.import_message": message(f"imported {e.name} ({e.base}, r = {e.r}) into {e.path}", "ok"),
            **library_view(runs_dir, v)}


# --- combine --------------------------------------------------------------------------------

def combine_check(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Before the button: the weight sliders of the adapters picked, the density when the method
    prunes, and whether the method can take these adapters (else which can)."""
    from studio.adapters import combine

    names = list(v["adapters.pick"] or [])[:MAX_COMBINE]
    method = v["adapters.method"]
    out = {f"adapters.weight_{i + 1}": gr.update(visible=i < len(names), label=f"weight of {names[i]}"
                                                 if i < len(names) else "weight")
           for i in range(MAX_COMBINE)}
    out["adapters.density"] = gr.update(visible=method in combine.WITH_DENSITY)
    known = _by_name(runs_dir)
    entries = [known[n] for n in names if n in known]
    if len(entries) < 2:
        return {**out, "adapters.methods": message(PICK_TWO, "note"), "adapters.combine": gr.update(interactive=False)}
    try:
        why = combine.methods_for(entries)
    except StudioError as e:
        return {**out, "adapters.methods": message(str(e)), "adapters.combine": gr.update(interactive=False)}
    ok = [m for m, reason in why.items() if reason is None]
    can = f"methods that can combine these: {', '.join(ok)}" if ok else "no method can combine these"
    if method in why and why[method] is None:
        text = message(f"{method} can combine {', '.join(names)} ({can})", "ok")
    else:
        text = message(f"{method}: {why.get(method) or 'unknown method'}; {can}")
    return {**out, "adapters.methods": text, "adapters.combine": gr.update(interactive=why.get(method) is None)}


def do_combine(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    from studio.adapters import combine

    names = list(v["adapters.pick"] or [])
    known = _by_name(runs_dir)
    missing = [n for n in names if n not in known]
    if missing:
        return {"adapters.combine_message": message(f"{missing[0]} is not in the library (any more); refresh it")}
    if len(names) > MAX_COMBINE:
        return {"adapters.combine_message": message(f"{len(names)} adapters picked; this tab combines up to "
                                                    f"{MAX_COMBINE} (the CLI takes more)")}
    method = v["adapters.method"]
    weights = [float(v[f"adapters.weight_{i + 1}"]) for i in range(len(names))]
    density = float(v["adapters.density"]) if method in combine.WITH_DENSITY else None
    refs = [str(Path(known[n].path).parent) if known[n].origin == "run" else known[n].path for n in names]
    try:
        out = combine.combine(refs, weights, method, density, root=runs_dir,
                              name=(v["adapters.name"] or "").strip() or None)
    except StudioError as e:
        return {"adapters.combine_message": message(str(e).splitlines()[0])}
    done = (f"combined {', '.join(names)} by {method} (weights {', '.join(f'{w:g}' for w in weights)}"
            + (f", density {density:g}" if density is not None else "") + f") into {Path(out['out']).name}, "
            f"r = {out['r']}, in {out['seconds']:.1f} s: pick it in the Playground's 'Compare with', or "
            f"`studio eval RUN --adapter {Path(out['out']).name}`")
    return {"adapters.combine_message": message(done, "ok"), **library_view(runs_dir, v)}


# --- compare --------------------------------------------------------------------------------

def _num(x, digits: int = 4):
    return round(x, digits) if isinstance(x, (int, float)) else None


def metric_rows(runs_dir: Path, group: list) -> list[list]:
    """Every saved evaluation of the runs of this base, one row per column evaluated that is an
    adapter of the group (or the base model alone)."""
    from studio import runs
    from studio.evaluate import list_evals, read_eval

    by_path = {str(Path(e.path).resolve()): e.name for e in group}
    names = {e.name for e in group}
    rows = []
    for r in runs.list_runs(runs_dir):
        if r["id"] not in names and not any(n.startswith(r["id"] + "@") for n in names):
            continue
        for saved in list_evals(r["dir"]):
            try:
                res = read_eval(r["dir"], saved["name"])
            except StudioError:
                continue
            paths = res.get("adapters") or {}
            for col, m in (res.get("metrics") or {}).items():
                if col == "base":
                    who = "base model (no adapter)"
                elif col == "tuned":
                    who = r["id"] if res.get("adapter") in (None, runs.ADAPTER) else f"{r['id']}@{res['adapter']}"
                else:
                    who = by_path.get(str(Path(paths.get(col, "")).resolve()), col)
                if who not in names and col != "base":
                    continue
                rows.append([who, f"{r['id']}: {saved['name']}", res.get("n"), _num(m.get("exact_match")),
                             _num(m.get("rouge_l")), _num(m.get("loss")), _num(m.get("accuracy")),
                             _num(m.get("macro_f1"))])
    return rows


def similarity_rows(group: list) -> list[list]:
    """Pairwise subspace similarity of the group's adapters: phi(1,1) and the mean phi of lora_B
    (the output directions, which training moves), phi(1,1) of lora_A (which stays near its random
    start in a short run) and what two random directions give (1 / dim, averaged over modules)."""
    from studio import analysis

    rows = []
    for a, b in itertools.combinations(group[:MAX_COMPARED], 2):
        try:
            sb = analysis.subspace_similarity(a.path, b.path, which="B")
            sa = analysis.subspace_similarity(a.path, b.path, which="A")
        except StudioError as e:
            rows.append([a.name, b.name, str(e).splitlines()[0][:200], None, None, None, None])
            continue
        baseline = sum(1 / m["dim"] for m in sb["modules"]) / len(sb["modules"])
        rows.append([a.name, b.name, sb["summary"]["modules"], _num(sb["summary"]["phi_1_1_mean"]),
                     _num(sb["summary"]["phi_mean"]), _num(sa["summary"]["phi_1_1_mean"]), _num(baseline, 5)])
    return rows


def do_compare(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    base = v["adapters.base"]
    group = next((g for g in _groups(_entries(runs_dir)) if str(g[0].base) == base), None)
    if group is None:
        return {"adapters.compare_message": message("pick a base model from the library first"),
                "adapters.metrics": [], "adapters.similarity": []}
    metrics, pairs = metric_rows(runs_dir, group), similarity_rows(group)
    notes = [f"{len(group)} adapters of {base}"]
    if not metrics:
        notes.append("no saved evaluations yet: evaluate runs on the Evaluate tab or with `studio eval RUN "
                     "[--adapter NAME ...]`")
    if len(group) > MAX_COMPARED:
        notes.append(f"similarity of the first {MAX_COMPARED} only")
    if len(group) < 2:
        notes.append("similarity needs two adapters")
    return {"adapters.metrics": metrics, "adapters.similarity": pairs,
            "adapters.compare_message": message("; ".join(notes), "ok")}


# --- layout ---------------------------------------------------------------------------------

def build(runs_dir: Path) -> SimpleNamespace:
    from studio.adapters import combine

    ui = SimpleNamespace()
    start = library_view(runs_dir)
    ui.notice = gr.Markdown(start["adapters.notice"], elem_id="adapters-notice")
    with gr.Row():
        ui.refresh = gr.Button("Refresh", elem_id="adapters-refresh", scale=0, min_width=120)
    ui.table = gr.Dataframe(start["adapters.table"], headers=LIBRARY_HEADERS, interactive=False, wrap=True,
                            elem_id="adapters-table", max_height=320)
    with gr.Accordion("Import a PEFT adapter", open=False):
        with gr.Row():
            ui.upload = gr.File(label="adapter zip", file_types=[".zip"], type="filepath", elem_id="adapters-upload")
            with gr.Column():
                ui.import_path = gr.Textbox(label="or an adapter folder on this machine", elem_id="adapters-import-path",
                                            placeholder="/path/to/adapter (adapter_config.json + "
                                                        "adapter_model.safetensors)")
                ui.import_name = gr.Textbox(label="name in the library", elem_id="adapters-import-name",
                                            placeholder="default: the file or folder name")
                ui.import_base = gr.Textbox(label="base model", elem_id="adapters-import-base",
                                            placeholder="default: base_model_name_or_path of its config")
        with gr.Row():
            ui.import_btn = gr.Button("Import", elem_id="adapters-import", scale=0, min_width=120)
            ui.import_message = gr.HTML(elem_id="adapters-import-message")
    gr.Markdown("#### Combine adapters of one base\nPEFT's `add_weighted_adapter`; the result is saved in the "
                "library with its parents, weights, method and density (same as `studio adapters combine`).")
    with gr.Row():
        pick = start["adapters.pick"]
        ui.pick = gr.Dropdown(pick["choices"], value=[], multiselect=True, max_choices=MAX_COMBINE,
                              label="adapters", elem_id="adapters-pick", scale=3)
        ui.method = gr.Dropdown(list(combine.METHODS), value="linear", label="method", elem_id="adapters-method",
                                scale=1, info="linear, ties, dare_*, magnitude_prune need one rank; cat and svd do not")
        ui.density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="density", visible=False,
                               elem_id="adapters-density", info="the share of entries kept by pruning", scale=1)
    with gr.Row():
        for i in range(MAX_COMBINE):
            setattr(ui, f"weight_{i + 1}", gr.Slider(-1.0, 2.0, value=0.5, step=0.05, label="weight", visible=False,
                                                     elem_id=f"adapters-weight-{i + 1}"))
    ui.methods = gr.HTML(message(PICK_TWO, "note"),
                         elem_id="adapters-methods")
    with gr.Row():
        ui.name = gr.Textbox(label="name of the result", elem_id="adapters-name", scale=2,
                             placeholder="default: combined-DATE-TIME")
        ui.combine = gr.Button("Combine", variant="primary", interactive=False, elem_id="adapters-combine", scale=0,
                               min_width=140)
        ui.combine_message = gr.HTML(elem_id="adapters-combine-message")
    gr.Markdown("#### Compare the adapters of one base\nTheir saved held-out metrics, and how much their learned "
                "directions overlap (subspace similarity, as on the Analysis tab: phi = 1 is the same direction, "
                "random directions give about 1 / dim).")
    with gr.Row():
        base = start["adapters.base"]
        ui.base = gr.Dropdown(base["choices"], value=base["value"], label="base model", elem_id="adapters-base",
                              scale=3)
        ui.compare = gr.Button("Compare", elem_id="adapters-compare", scale=0, min_width=120)
        ui.compare_message = gr.HTML(elem_id="adapters-compare-message")
    ui.metrics = gr.Dataframe(headers=METRIC_HEADERS, interactive=False, wrap=True, elem_id="adapters-metrics",
                              max_height=320)
    ui.similarity = gr.Dataframe(headers=SIMILARITY_HEADERS, interactive=False, wrap=True,
                                 elem_id="adapters-similarity", max_height=320)
    return ui
