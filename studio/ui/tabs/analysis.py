"""Analysis tab: what an adapter learned, the way the LoRA paper looks at it (section 7).

Subspace similarity between two runs' adapters (Figure 3's heatmap), the singular value
spectrum of delta W, and how much delta W amplifies directions already in W (Table 7).
"""

from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go

from studio.errors import StudioError
from studio.ui.tabs.export import exportable
from studio.ui.tabs.runs import run_folder


def _adapter(runs_dir: Path, run_id: str):
    from studio.analysis import Adapter

    return Adapter(run_folder(runs_dir, run_id))


def modules(runs_dir: Path, run_id: str) -> list[str]:
    if not run_id:
        return []
    try:
        return list(_adapter(runs_dir, run_id).modules)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def subspace(runs_dir: Path, run_a: str, run_b: str, module: str | None, which: str):
    """(heatmap figure, summary HTML) of phi(i, j) between two runs' adapters."""
    from studio.analysis import subspace_similarity

    if not run_a or not run_b:
        raise gr.Error("pick two runs (the same run twice compares an adapter with itself)", print_exception=False)
    try:
        out = subspace_similarity(run_folder(runs_dir, run_a), run_folder(runs_dir, run_b),
                                  module=module or None, which=which)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    grid = out["phi"]
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(1, out["r2"] + 1)), y=list(range(1, out["r1"] + 1)),
                               zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="φ")))
    fig.update_layout(title=f"φ(i, j) for {out['module']} ({which})", xaxis_title=f"j ({run_b}, r={out['r2']})",
                      yaxis_title=f"i ({run_a}, r={out['r1']})", height=420, margin=dict(l=60, r=20, t=50, b=50),
                      template="plotly_white")
    s = out["summary"]
    rows = "".join(f"<tr><td>{html.escape(m['module'])}</td><td>{m['phi_1_1']:.3f}</td>"
                   f"<td>{m['phi_diag_mean']:.3f}</td><td>{m['phi_mean']:.3f}</td></tr>" for m in out["modules"])
    text = (f"<p>Random subspaces of dimension {out['dim']} give φ ≈ max(i, j)/{out['dim']}. Over {s['modules']} "
            f"modules: mean φ(1,1) = <b>{s['phi_1_1_mean']:.3f}</b>, mean φ = <b>{s['phi_mean']:.3f}</b>.</p>"
            f"<div style='max-height:260px;overflow:auto'><table><tr><th>module</th><th>φ(1,1)</th>"
            f"<th>mean φ(i,i)</th><th>mean φ</th></tr>{rows}</table></div>")
    return fig, text


def spectrum(runs_dir: Path, run_id: str):
    """(figure of singular values per module, table rows)."""
    from studio.analysis import spectrum as spec

    try:
        rows = spec(run_folder(runs_dir, run_id))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    fig = go.Figure()
    for r in rows:
        fig.add_trace(go.Scatter(y=r["singular_values"], x=list(range(1, len(r["singular_values"]) + 1)),
                                 mode="lines+markers", name=r["module"], line=dict(width=1)))
    fig.update_layout(title="singular values of ΔW = scaling · B A", xaxis_title="index", yaxis_title="σ",
                      yaxis_type="log", height=380, showlegend=len(rows) <= 12, template="plotly_white",
                      margin=dict(l=60, r=20, t=50, b=50))
    table = [[r["module"], r["r"], round(r["spectral_norm"], 5), r["energy_rank_90"], round(r["entropy_rank"], 2),
              r["numerical_rank"]] for r in rows]
    return fig, table


def amplification(runs_dir: Path, run_id: str):
    from studio.analysis import amplification as amp

    try:
        rows = amp(run_folder(runs_dir, run_id))
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return [[r["module"], r["r"], _g(r["delta_w_norm"]), _g(r["projected_w_norm"]), _g(r["w_norm"]),
             _g(r["amplification"]), _g(r["random_projected_w_norm"]), _g(r["random_amplification"])] for r in rows]


def _g(x) -> str:
    return f"{x:.4g}"


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ids = exportable(runs_dir)
    gr.Markdown("From *LoRA: Low-Rank Adaptation of Large Language Models* (Hu et al., 2021), section 7. "
                "Compare two runs of the same model (say r=8 and r=64) to see how much of their update "
                "subspaces overlap, and how strongly ΔW amplifies directions that W barely uses.")
    with gr.Row():
        ui.run_a = gr.Dropdown(ids, value=ids[0] if ids else None, label="Run A", elem_id="analysis-run-a")
        ui.run_b = gr.Dropdown(ids, value=ids[0] if ids else None, label="Run B (for similarity)",
                               elem_id="analysis-run-b")
        ui.module = gr.Dropdown([], label="Module (similarity heatmap)", elem_id="analysis-module",
                                allow_custom_value=True)
        ui.which = gr.Radio(["A", "B"], value="A", label="factor", info="A: right-singular vectors; B: left")
    with gr.Row():
        ui.btn_subspace = gr.Button("Subspace similarity", elem_id="analysis-subspace")
        ui.btn_spectrum = gr.Button("Spectrum of ΔW", elem_id="analysis-spectrum")
        ui.btn_amp = gr.Button("Amplification", elem_id="analysis-amplification")
    ui.heatmap = gr.Plot(label="φ(i, j)", elem_id="analysis-heatmap")
    ui.summary = gr.HTML(elem_id="analysis-summary")
    ui.spectrum_plot = gr.Plot(label="Spectrum", elem_id="analysis-spectrum-plot")
    ui.spectrum_table = gr.Dataframe(headers=["module", "r", "σ₁", "rank for 90% energy", "effective rank",
                                              "numerical rank"], interactive=False, max_height=300)
    ui.amp_table = gr.Dataframe(headers=["module", "r", "‖ΔW‖F", "‖UᵀWV‖F", "‖W‖F", "amplification",
                                         "‖UᵀWV‖F random", "amplification random"], interactive=False,
                                max_height=300, elem_id="analysis-amp-table")
    return ui
