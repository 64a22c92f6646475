"""Model tab: pick a model, tick LoRA targets in its tree, move sliders, see the live count.

Handlers are plain functions of widget values returning plain values (and a few gr.update
calls for choices); they are tested without a browser.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from types import SimpleNamespace

import gradio as gr

from studio import lora, models
from studio.config import LoraSettings, field_help, parse_layers
from studio.errors import ConfigError, StudioError
from studio.models.shards import pickled_files
from studio.models.tree import ModelTree, human, model_tree
from studio.ui.widgets.charts import param_chart
from studio.ui.widgets.tree_view import ModuleTree, leaf_index, render_tree

DEFAULT_MODEL = "tiny-llama"
ALL_LINEAR_CHOICE = "all-linear"
LORA_HELP = field_help(LoraSettings)


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


# The built-in tiny models are random-init: with their output head frozen at its random init
# the loss cannot fall far, so their default also adapts the head (loss halves in 100 steps).
TINY_DEFAULT_EXTRA = {"tiny-llama": ["lm_head"], "tiny-gpt2": ["lm_head"]}


def default_targets(tree: ModelTree) -> list[str]:
    """q+v for real models; every linear layer and the head for the random-init built-ins."""
    if tree.model in TINY_DEFAULT_EXTRA:
        return list(tree.all_linear) + TINY_DEFAULT_EXTRA[tree.model]
    sets = lora.target_sets(tree)
    qv = sets.get("q+v") or []
    return qv if isinstance(qv, list) else []


TRUST_NOTE = ("⚠ **trust_remote_code is on.** A model whose config names its own code (`auto_map`) gets "
              "that code imported and run on this machine, with your permissions: here when it loads, in "
              "the trainer, at merge and in the Playground. Turn it on only for a folder or Hub repository "
              "whose code you trust; models that transformers supports need no remote code.")


def trust_note(on: bool) -> str:
    """What trust_remote_code means, shown next to the box while it is ticked."""
    return TRUST_NOTE if on else ""


def tree_of(state: dict) -> ModelTree:
    """The tree of the model in `state`, as it was loaded (task and trust_remote_code included)."""
    return model_tree(state.get("ref", DEFAULT_MODEL), state.get("task", "causal_lm"),
                      bool(state.get("trust_remote_code")))


def load(ref: str, task: str | None = None, trust_remote_code: bool = False):
    """Build the tree of `ref` (meta device) and the default selection.

    Returns (tree_html, selected keys, type choices update, selected types, summary markdown,
    model state dict).
    """
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
    wanted = default_targets(tree)
    keys = [k for k, paths in index.items() if any(p == w or p.endswith("." + w) for p in paths for w in wanted)]
    types = tree.targetable_types()
    chosen_types = types_from_keys(tree, keys)
    summary = summary_markdown(ref, src, tree, trust_remote_code)
    state = {"ref": ref, "task": task, "explore_only": src.explore_only, "trust_remote_code": trust_remote_code}
    return (gr.update(tree_html=render_tree(tree), value=keys),
            gr.update(choices=types + [ALL_LINEAR_CHOICE], value=chosen_types), summary, state)


def summary_markdown(ref: str, src, tree: ModelTree, trust_remote_code: bool = False) -> str:
    s = models.summary(ref, trust_remote_code)
    bits = [f"**{html.escape(tree.cls)}**", f"{human(tree.total_params)} parameters ({tree.total_params:,})",
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


def selection(state: dict, keys: list[str], layers: str, r: float, alpha: float, dropout: float, bias: str,
              rslora: bool, dora: bool, mts: str, rank_pattern: str) -> Selection:
    """Widget values -> LoRA settings; `error` says why they can't train (never raises)."""
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


def count_view(sel: Selection) -> tuple[str, object, str | None]:
    """(param-count HTML, param-chart figure, reason training can't start or None)."""
    if sel.error:
        return _count_html(None, sel, sel.error), param_chart({}, {}), sel.error
    try:
        c = lora.check(sel.tree, sel.settings)
    except StudioError as e:
        return _count_html(None, sel, str(e)), param_chart({}, {}), str(e)
    return _count_html(c, sel, None), param_chart(c.by_type, c.by_layer), None


def _count_html(c, sel: Selection, error: str | None) -> str:
    scaling = sel.settings.scaling
    if c is None:
        return (f"<div class='pc pc-err'><b>No count:</b> {html.escape(error or '')}</div>")
    return (
        f"<div class='pc'><div class='pc-big'><span class='pc-trainable' data-trainable='{c.trainable}'>"
        f"{c.trainable:,}</span> trainable of {c.total:,} parameters "
        f"(<b>{c.trainable_percent:.4f}%</b>)</div>"
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


def build(model_state: gr.State) -> SimpleNamespace:
    """The Model tab's components; events are wired by the caller (they touch other tabs)."""
    ui = SimpleNamespace()
    with gr.Row():
        ui.model_select = gr.Dropdown(model_choices(), value=DEFAULT_MODEL, allow_custom_value=True,
                                      label="Model", elem_id="model-select", scale=4,
                                      info="built-in, preset (explore only), a local folder or a Hub id")
        ui.task = gr.Radio(["causal_lm", "seq_cls"], value="causal_lm", label="Task", scale=2,
                           info="seq_cls adds a classification head trained in full")
        with gr.Column(scale=1, min_width=160):
            ui.model_load = gr.Button("Load", variant="primary", elem_id="model-load")
            ui.trust_remote_code = gr.Checkbox(False, label="trust_remote_code", elem_id="trust-remote-code",
                                               info="run Python code that comes with the model")
    ui.trust_note = gr.Markdown(elem_id="trust-note")
    ui.summary = gr.Markdown(elem_id="model-summary")
    with gr.Row():
        with gr.Column(scale=3):
            ui.target_types = gr.CheckboxGroup([], label="Target module types", elem_id="target-types",
                                               show_select_all=True,
                                               info="one box per layer type; all-linear = every Linear but the head")
            ui.module_tree = ModuleTree(elem_id="module-tree", label="Module tree")
        with gr.Column(scale=2):
            ui.lora_r = gr.Slider(1, 256, value=8, step=1, label="r (rank)", elem_id="lora-r", info=LORA_HELP["r"])
            ui.lora_alpha = gr.Slider(1, 512, value=16, step=1, label="lora_alpha", elem_id="lora-alpha",
                                      info=LORA_HELP["lora_alpha"])
            ui.lora_dropout = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="lora_dropout",
                                        elem_id="lora-dropout", info=LORA_HELP["lora_dropout"])
            ui.layers = gr.Textbox(label="Layers (layers_to_transform)", placeholder="all layers, or e.g. 0-3,8",
                                   elem_id="lora-layers", info=LORA_HELP["layers_to_transform"])
            with gr.Accordion("Advanced", open=False):
                ui.bias = gr.Radio(["none", "all", "lora_only"], value="none", label="bias", info=LORA_HELP["bias"])
                ui.rslora = gr.Checkbox(False, label="use_rslora", info=LORA_HELP["use_rslora"])
                ui.dora = gr.Checkbox(False, label="use_dora", info=LORA_HELP["use_dora"])
                ui.mts = gr.Textbox(label="modules_to_save", placeholder="e.g. lm_head", info=LORA_HELP["modules_to_save"])
                ui.rank_pattern = gr.Textbox(label="rank_pattern (per-type rank)", placeholder="q_proj=16, v_proj=4",
                                             info=LORA_HELP["rank_pattern"])
            ui.param_count = gr.HTML(elem_id="param-count")
    ui.param_chart = gr.Plot(elem_id="param-chart", label="Trainable parameters")
    with gr.Accordion("Cost explorer: r × target sets, before downloading anything", open=False):
        ui.sweep_btn = gr.Button("Explore this model", elem_id="sweep-btn")
        ui.sweep_plot = gr.Plot(elem_id="sweep-plot", label="Adapter size by rank")
        ui.sweep_table = gr.Dataframe(elem_id="sweep-table", interactive=False, max_height=320)
    ui.types_state = gr.State([])
    ui.lora_inputs = [model_state, ui.module_tree, ui.layers, ui.lora_r, ui.lora_alpha, ui.lora_dropout, ui.bias,
                      ui.rslora, ui.dora, ui.mts, ui.rank_pattern]
    return ui
