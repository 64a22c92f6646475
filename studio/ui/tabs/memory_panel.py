"""The Model tab's memory panel: will the selection train on a GPU of a given size?

The training-memory estimate (studio.models.memory) for the ticked modules and LoRA settings,
as a total with its parts, a stacked bar and a "fits on" row. Its inputs are its own widgets,
registered under "model.NAME" beside the Model tab's: they follow the run's settings (micro-batch,
max_length, quantization, precision, optimizer, checkpointing on the Train and Data tabs) whenever
those change, and can be moved on their own to explore other sizes without touching the run.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import gradio as gr
from gradio.components.plot import PlotData

from studio.config import RunConfig
from studio.errors import StudioError
from studio.models import memory


class Selection(Protocol):
    """What the panel reads of the Model tab's selection (studio.ui.tabs.model.Selection), which
    imports this module: the model's tree, the LoRA settings, why there is no count, the count."""

    tree: Any
    settings: Any
    error: str | None

    def checked(self) -> Any: ...


# The estimate's own inputs, read beside the Model tab's LORA_FORM by its `recount`, and what it updates.
MEMORY_FORM = ("model.mem_batch", "model.mem_seq", "model.mem_quant", "model.mem_precision",
               "model.mem_checkpointing", "model.mem_optim", "model.mem_gpu")
MEMORY_OUT = ("model.memory_total", "model.memory_chart", "model.memory_fits")
# The run's settings the estimate follows, and the panel's input each one moves.
FOLLOWS = {"train.per_device_train_batch_size": "model.mem_batch", "data.max_length": "model.mem_seq",
           "train.quantization": "model.mem_quant", "train.precision": "model.mem_precision",
           "train.gradient_checkpointing": "model.mem_checkpointing", "train.optim": "model.mem_optim"}
RANGES = {"model.mem_batch": (1, 256), "model.mem_seq": (8, 32768)}  # the size sliders'

MEMORY_HELP = (f"Estimate for training on a CUDA GPU, GB = 2^30 bytes. Fits = estimate + the CUDA context "
               f"({memory.CUDA_CONTEXT_BYTES / memory.GIB:g} GB allowed) + the loss's transient logits gradients; "
               "a batch filled to the sequence length, as packing does.")
MEMORY_PARTS = (("weights", "#64748b"), ("adapter + grads + optimizer", "#6366f1"), ("activations", "#f59e0b"),
                ("allowance", "#cbd5e1"))


@dataclass
class MemoryView:
    """The estimate for a selection and the memory inputs, in bytes by part."""
    parts: dict[str, int]
    need: int  # everything, allowances included
    gpu_gb: int
    batch: int
    seq: int
    largest_batch: int  # on the chosen GPU at `seq` tokens; 0: not even one


def follow(name: str, value: Any) -> dict[str, Any]:
    """The panel input's update for run setting `name` (a FOLLOWS key) now at `value`: precision
    auto is bf16, as on a GPU that supports it; sizes are kept within the sliders' ranges; a value
    that is not a number yet (a box being typed into) moves nothing."""
    target = FOLLOWS[name]
    if name == "train.precision":
        value = "bf16" if value == "auto" else value
    elif target in RANGES:
        lo, hi = RANGES[target]
        try:
            value = min(max(int(value), lo), hi)
        except (TypeError, ValueError):
            return {}
    elif name == "train.gradient_checkpointing":
        value = bool(value)
    return {target: value}


def memory_options(v: Mapping[str, Any]) -> dict[str, Any]:
    """The MEMORY_FORM values as `memory.estimate` options."""
    return dict(batch=int(v["model.mem_batch"]), seq=int(v["model.mem_seq"]), quant=v["model.mem_quant"],
                precision=v["model.mem_precision"], gradient_checkpointing=bool(v["model.mem_checkpointing"]),
                optimizer=v["model.mem_optim"])


def memory_figures(sel: Selection, v: Mapping[str, Any]) -> MemoryView:
    """The estimate on a CUDA GPU for the selection and the memory inputs (raises what lora.check does)."""
    o = memory_options(v)
    c = sel.checked()
    est = memory.estimate(sel.tree, c, sel.settings, device="cuda", **o)
    allowance = sum(memory.allowances(sel.tree, o["batch"], o["seq"], "cuda").values())
    parts = dict(zip([name for name, _ in MEMORY_PARTS],
                     (est.weights_bytes, est.trainable_bytes + est.gradients_bytes + est.optimizer_bytes,
                      est.activations_bytes, allowance), strict=True))
    gpu = int(v["model.mem_gpu"])
    kw = {k: o[k] for k in ("quant", "precision", "gradient_checkpointing", "optimizer")}
    n = memory.largest_batch(sel.tree, c, sel.settings, gpu * memory.GIB, seq=o["seq"], device="cuda", **kw)
    return MemoryView(parts, sum(parts.values()), gpu, o["batch"], o["seq"], n)


def _gb(n: int) -> str:
    g = n / memory.GIB
    return f"{g:,.2f} GB" if g < 10 else f"{g:,.1f} GB"


def memory_view(sel: Selection, v: Mapping[str, Any]) -> dict[str, Any]:
    """MEMORY_OUT updates: the total with its parts, the stacked bar, the fits-on row."""
    reason = sel.error
    if reason is None:
        try:
            m = memory_figures(sel, v)
        except StudioError as e:
            reason = str(e)
    if reason is not None:
        return {"model.memory_total": f"<div class='pc pc-err'><b>No estimate:</b> {html.escape(reason)}</div>",
                "model.memory_chart": memory_chart(None), "model.memory_fits": ""}
    parts = " · ".join(f"{k} {_gb(b)}" for k, b in m.parts.items())
    total = (f"<div class='mem-total' data-bytes='{m.need}'><b>{_gb(m.need)}</b> to train micro-batch {m.batch} × "
             f"{m.seq} tokens ({parts})</div>")
    cells = []
    for size in memory.GPU_SIZES_GB:
        ok = m.need <= size * memory.GIB
        style = "background:#dcfce7;color:#166534" if ok else "background:#fee2e2;color:#991b1b"
        cells.append(f"<span class='mem-gpu' data-gb='{size}' data-fits='{str(ok).lower()}' "
                     f"style='{style};padding:2px 8px;border-radius:6px;margin-right:4px'>"
                     f"{size} GB {'✓' if ok else '✗'}</span>")
    if m.largest_batch:
        biggest = (f"largest micro-batch on a {m.gpu_gb} GB GPU at {m.seq} tokens: "
                   f"<b class='mem-largest' data-batch='{m.largest_batch}'>{m.largest_batch}</b>")
    else:
        biggest = (f"<b class='mem-largest' data-batch='0'>not even micro-batch 1</b> fits a {m.gpu_gb} GB GPU at "
                   f"{m.seq} tokens: try gradient checkpointing, 4bit or fewer tokens")
    fits = (f"<div class='mem-fits'>fits on: {''.join(cells)}</div><div>{biggest}</div>"
            f"<div style='color:#6b7280;font-size:12px'>{html.escape(MEMORY_HELP)}</div>")
    return {"model.memory_total": total, "model.memory_chart": memory_chart(m), "model.memory_fits": fits}


def memory_chart(m: MemoryView | None) -> PlotData:
    """The estimate as one stacked bar, with the chosen GPU's size marked.

    Plain plotly JSON, as charts.loss_plot builds it: this redraws at every slider move, and a
    validating plotly Figure costs about 90 ms of the 20 ms the whole update may take.
    """
    data, shapes = [], []
    if m is not None:
        data = [{"type": "bar", "orientation": "h", "y": ["estimate"], "x": [b / memory.GIB], "name": name,
                 "marker": {"color": color}, "hovertemplate": f"{name}: %{{x:.2f}} GB<extra></extra>"}
                for (name, color), b in zip(MEMORY_PARTS, m.parts.values(), strict=True)]
        shapes = [{"type": "line", "x0": m.gpu_gb, "x1": m.gpu_gb, "y0": 0, "y1": 1, "yref": "paper",
                   "line": {"dash": "dash", "color": "#111827"}}]
    layout = {"barmode": "stack", "height": 170, "template": _plot_template(), "uirevision": "keep",
              "margin": {"l": 70, "r": 20, "t": 30, "b": 40}, "xaxis": {"title": {"text": "GB (2^30 bytes)"}},
              "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.15, "x": 0}, "shapes": shapes,
              "annotations": [{"x": m.gpu_gb, "y": 1, "yref": "paper", "text": f"{m.gpu_gb} GB GPU",
                               "showarrow": False, "yanchor": "bottom"}] if m is not None else []}
    return PlotData(type="plotly", plot=json.dumps({"data": data, "layout": layout}))


@functools.lru_cache(maxsize=1)
def _plot_template() -> dict:
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def build(c: dict, start: RunConfig) -> None:
    """The panel's widgets, into the Model tab's components `c`, at the starter config `start`."""
    with gr.Group(elem_id="memory-estimate"):
        gr.Markdown("**Training memory: will it fit?**")
        with gr.Row():
            c["mem_batch"] = gr.Slider(*RANGES["model.mem_batch"], value=start.train.per_device_train_batch_size, step=1,
                                       label="micro-batch", elem_id="memory-batch",
                                       info="rows per step (train.per_device_train_batch_size)")
            c["mem_seq"] = gr.Slider(*RANGES["model.mem_seq"], value=start.data.max_length, step=8, label="sequence length",
                                     elem_id="memory-seq", info="tokens per row (data.max_length)")
            c["mem_gpu"] = gr.Dropdown([(f"{g} GB", g) for g in memory.GPU_SIZES_GB], value=24, label="GPU",
                                       elem_id="memory-gpu", info="for the largest micro-batch that fits")
        with gr.Row():
            c["mem_quant"] = gr.Radio(list(memory.QUANTS), value=start.model.quantization, label="base weights",
                                      elem_id="memory-quant", info="model.quantization (4bit: QLoRA)")
            c["mem_precision"] = gr.Radio(list(memory.PRECISIONS), value="bf16", label="precision",
                                          elem_id="memory-precision",
                                          info="train.precision (auto is bf16 on a GPU that supports it)")
            c["mem_optim"] = gr.Radio(list(memory.OPTIMIZERS), value=start.train.optim, label="optimizer",
                                      elem_id="memory-optim", info="train.optim")
            c["mem_checkpointing"] = gr.Checkbox(start.train.gradient_checkpointing, label="gradient checkpointing",
                                                 elem_id="memory-checkpointing", info="train.gradient_checkpointing")
        c["memory_total"] = gr.HTML(elem_id="memory-total")
        c["memory_chart"] = gr.Plot(elem_id="memory-chart", label="Training memory", show_label=False)
        c["memory_fits"] = gr.HTML(elem_id="memory-fits")
