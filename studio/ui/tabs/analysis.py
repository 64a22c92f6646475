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
from studio.ui.tabs.export import offered_runs, run_choice
from studio.ui.tabs.runs import run_folder


EMPTY = ("**Nothing to analyse yet.** The analyses read a run's final adapter: train one on the Train tab first "
         "(a run writes its adapter when it completes or is stopped). For the similarity heatmap, train two runs "
         "of the same model, say r=8 and r=64.")


def refresh_view(runs_dir: Path, run_a: str | None, run_b: str | None) -> dict:
    """The tab as it opens: both runs preselected (the newest completed one), or what to do first."""
    a, any_run = run_choice(runs_dir, run_a)
    b, _ = run_choice(runs_dir, run_b)
    return {"analysis.run_a": a, "analysis.run_b": b, "analysis.empty": gr.update(visible=not any_run)}


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


# The comparison offered, in the order shown: what the update learned first (the default).
WHICH_CHOICES = [("ΔW (left singular vectors)", "dW"), ("B (left singular vectors)", "B"),
                 ("A (right singular vectors)", "A")]
WHICH_INFO = ("ΔW and B hold only what training wrote (B starts at 0); A starts as a random draw and "
              "stays close to it in a short run, so its similarity mostly compares two seeds.")


def subspace(runs_dir: Path, run_a: str, run_b: str, module: str | None, which: str):
    """(heatmap figure, summary HTML) of phi(i, j) between two runs' adapters, beside what random
    subspaces give; for A, how far each run's lora_A moved from its initial draw."""
    from studio.analysis import init_distance, subspace_similarity

    if not run_a or not run_b:
        raise gr.Error("pick two runs (the same run twice compares an adapter with itself)", print_exception=False)
    try:
        out = subspace_similarity(run_folder(runs_dir, run_a), run_folder(runs_dir, run_b),
                                  module=module or None, which=which)
        moved = ({run: init_distance(run_folder(runs_dir, run)) for run in dict.fromkeys((run_a, run_b))}
                 if which == "A" else {})
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return heatmap(out, run_a, run_b), summary_html(out, moved)


def heatmap(out: dict, run_a: str, run_b: str) -> go.Figure:
    """phi(i, j) and, on the same colour scale beside it, what random subspaces give."""
    from plotly.subplots import make_subplots

    xs, ys = list(range(1, out["r2"] + 1)), list(range(1, out["r1"] + 1))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=(f"φ(i, j): {out['module']} ({out['which']})",
                                        f"random subspaces of dim {out['dim']}: max(i, j)/{out['dim']}"))
    fig.add_trace(go.Heatmap(z=out["phi"], x=xs, y=ys, zmin=0, zmax=1, colorscale="Viridis", name="φ",
                             colorbar=dict(title="φ")), 1, 1)
    fig.add_trace(go.Heatmap(z=out["baseline"], x=xs, y=ys, zmin=0, zmax=1, colorscale="Viridis",
                             name="random baseline", showscale=False), 1, 2)
    for col in (1, 2):
        fig.update_xaxes(title_text=f"j ({run_b}, r={out['r2']})", row=1, col=col)
    fig.update_yaxes(title_text=f"i ({run_a}, r={out['r1']})", row=1, col=1)
    fig.update_layout(height=440, margin=dict(l=60, r=20, t=60, b=50), template="plotly_white")
    return fig


def summary_html(out: dict, moved: dict) -> str:
    s = out["summary"]
    times = lambda phi, base: f"{phi / base:.1f}×" if base > 0 else "-"
    rows = "".join(f"<tr><td>{html.escape(m['module'])}</td><td>{m['phi_1_1']:.3f}</td>"
                   f"<td>{m['baseline_1_1']:.4f}</td><td>{m['phi_diag_mean']:.3f}</td><td>{m['phi_mean']:.3f}</td>"
                   f"<td>{m['baseline_mean']:.4f}</td></tr>" for m in out["modules"])
    text = (f"<p>Over {s['modules']} modules: mean φ(1,1) = <b>{s['phi_1_1_mean']:.3f}</b> against "
            f"<b>{s['baseline_1_1_mean']:.4f}</b> for random subspaces ({times(s['phi_1_1_mean'], s['baseline_1_1_mean'])}); "
            f"mean φ = <b>{s['phi_mean']:.3f}</b> against {s['baseline_mean']:.4f}.</p>")
    for n, (run, d) in enumerate(moved.items()):
        verdict = ("<span class='bad'>still close to its initialisation</span>: its subspaces mostly reflect the "
                   "seed, not the data; compare ΔW or B instead" if d["close"] else "well away from its initialisation")
        text += (f"<p id='analysis-init-{'ab'[n]}'>lora_A of <b>{html.escape(run)}</b> moved {d['mean']:.1%} (mean "
                 f"over modules, at most {d['max']:.1%}) from the draw of seed {d['seed']}: {verdict}.</p>")
    return text + (f"<div style='max-height:260px;overflow:auto'><table><tr><th>module</th><th>φ(1,1)</th>"
                   f"<th>random φ(1,1)</th><th>mean φ(i,i)</th><th>mean φ</th><th>random mean φ</th></tr>{rows}"
                   f"</table></div>")


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
    ids, _ = offered_runs(runs_dir)  # the runs are preselected when the tab opens (`refresh_view`)
    gr.Markdown("From *LoRA: Low-Rank Adaptation of Large Language Models* (Hu et al., 2021), section 7. "
                "Compare two runs of the same model (say r=8 and r=64) to see how much of their update "
                "subspaces overlap, and how strongly ΔW amplifies directions that W barely uses.")
    ui.empty = gr.Markdown(EMPTY, elem_id="analysis-empty", visible=not ids)
    with gr.Row():
        ui.run_a = gr.Dropdown(ids, value=None, label="Run A", elem_id="analysis-run-a")
        ui.run_b = gr.Dropdown(ids, value=None, label="Run B (for similarity)", elem_id="analysis-run-b")
        ui.module = gr.Dropdown([], label="Module (similarity heatmap)", elem_id="analysis-module",
                                allow_custom_value=True)
        ui.which = gr.Radio(WHICH_CHOICES, value="dW", label="compare", info=WHICH_INFO, elem_id="analysis-which")
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
