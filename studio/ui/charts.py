"""Plotly figures for the UI. uirevision keeps the user's zoom across live updates."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

_LAYOUT = dict(margin=dict(l=50, r=20, t=40, b=40), height=340, uirevision="keep", template="plotly_white",
               legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))


def param_chart(by_type: dict[str, int], by_layer: dict[str, int]) -> go.Figure:
    """Trainable parameters by module type and by layer, side by side."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6],
                        subplot_titles=("by module type", "by layer"))
    fig.add_trace(go.Bar(x=list(by_type), y=list(by_type.values()), name="by type", marker_color="#6366f1"), 1, 1)
    fig.add_trace(go.Bar(x=list(by_layer), y=list(by_layer.values()), name="by layer", marker_color="#10b981"), 1, 2)
    fig.update_layout(**{**_LAYOUT, "height": 300}, showlegend=False)
    fig.update_yaxes(title_text="trainable parameters", row=1, col=1)
    fig.update_xaxes(type="category")
    return fig


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def clean_rows(rows: list[dict]) -> list[dict]:
    """Metric rows as one curve: after a `resumed` event at step N, points logged earlier with
    a step above N were lost with the crash and come again, so the earlier ones are dropped."""
    out: list[dict] = []
    for r in rows:
        if r.get("event") == "resumed":
            n = r.get("step", 0)
            out = [o for o in out if o.get("step", 0) <= n]
        elif "step" in r:
            out.append(r)
    return out


def loss_figure(series: dict[str, list[dict]]) -> go.Figure:
    """Train loss (raw, smoothed), eval loss and learning rate for one or more runs.

    `series` maps a run label to its metrics rows. With one run the learning rate shows on a
    second axis; with several, only losses are drawn so the curves stay comparable.
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    single = len(series) == 1
    for label, rows in series.items():
        rows = clean_rows(rows)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        prefix = "" if single else f"{label}: "
        if train:
            xs, ys = zip(*train)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=prefix + "train loss", mode="lines",
                                     line=dict(width=1), opacity=0.35 if single else 0.25))
            fig.add_trace(go.Scatter(x=xs, y=ema(list(ys)), name=prefix + "train loss (smoothed)", mode="lines",
                                     line=dict(width=2.5)))
        if evals:
            xs, ys = zip(*evals)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=prefix + "eval loss", mode="lines+markers",
                                     line=dict(dash="dot")))
        if single:
            lr = [(r["step"], r["learning_rate"]) for r in rows if r.get("learning_rate") is not None]
            if lr:
                xs, ys = zip(*lr)
                fig.add_trace(go.Scatter(x=xs, y=ys, name="learning rate", mode="lines",
                                         line=dict(width=1, color="#9ca3af")), secondary_y=True)
    fig.update_layout(**_LAYOUT)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="learning rate", secondary_y=True, showgrid=False, exponentformat="e")
    return fig
