"""Plotly figures for the UI. uirevision keeps the user's zoom across live updates."""

from __future__ import annotations

import functools
import json
import math

import plotly.graph_objects as go
from gradio.components.plot import PlotData
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


# Points per curve sent to the browser: a long run is thinned evenly (its last point kept), so a
# poll costs the same at step 100,000 as at step 1,000.
MAX_POINTS = 1000
EMA_ALPHA = 0.1


class Series:
    """One run's curves, (step, value) points, built row by row: train loss, its moving average
    (EMA_ALPHA), eval loss and learning rate, with `clean_rows`' rule for a resume (points above
    the resumed step are dropped). Adding rows costs what they are, not the whole run."""

    def __init__(self):
        self.train: list[tuple] = []
        self.smooth: list[tuple] = []
        self.evals: list[tuple] = []
        self.lr: list[tuple] = []
        self.cuts = 0  # times a resume took points back: until then, the lines only grew

    def lines(self) -> list[list[tuple]]:
        """The drawn lines of a one-run chart, in loss_spec's trace order."""
        return [p for p in (self.train, self.smooth, self.evals, self.lr) if p]

    @classmethod
    def of(cls, rows: list[dict]) -> Series:
        s = cls()
        s.extend(rows)
        return s

    def extend(self, rows: list[dict]) -> None:
        for r in rows:
            self.add(r)

    def add(self, r: dict) -> None:
        if r.get("event") == "resumed":
            n = r.get("step", 0)
            for points in (self.train, self.smooth, self.evals, self.lr):
                while points and points[-1][0] > n:  # steps rise within an attempt: the dropped ones are last
                    points.pop()
                    self.cuts += 1
            return
        if "step" not in r:
            return
        step = r["step"]
        loss = _finite(r.get("loss"))
        if loss is not None:
            acc = loss if not self.smooth else EMA_ALPHA * loss + (1 - EMA_ALPHA) * self.smooth[-1][1]
            self.train.append((step, loss))
            self.smooth.append((step, acc))
        for key, points in (("eval_loss", self.evals), ("learning_rate", self.lr)):
            v = _finite(r.get(key))
            if v is not None:
                points.append((step, v))


def _finite(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def loss_figure(series: dict[str, list[dict]]) -> go.Figure:
    """Train loss (raw, smoothed), eval loss and learning rate for one or more runs.

    `series` maps a run label to its metrics rows (or a Series). With one run the learning rate
    shows on a second axis; with several, only losses are drawn so the curves stay comparable.
    """
    return go.Figure(loss_spec(series))


def loss_plot(series: dict[str, list[dict] | Series]) -> PlotData:
    """The same chart as `loss_figure`, already serialized for gr.Plot.

    The live chart is redrawn for every open tab at every tick while a run logs: built as plain
    JSON it costs about 0.5 ms instead of the 20-30 ms plotly's validating Figure takes, which
    with 20 tabs open was a whole CPU core taken from training.
    """
    return PlotData(type="plotly", plot=json.dumps(loss_spec(series), allow_nan=False))


def loss_spec(series: dict[str, list[dict] | Series]) -> dict:
    """The loss chart as plain plotly JSON (what make_subplots with a secondary y axis builds)."""
    data = []
    single = len(series) == 1
    for label, rows in series.items():
        s = rows if isinstance(rows, Series) else Series.of(rows)
        prefix = "" if single else f"{label}: "
        if s.train:
            data.append(_line(_thin(s.train), prefix + "train loss", dict(width=1), opacity=0.35 if single else 0.25))
            data.append(_line(_thin(s.smooth), prefix + "train loss (smoothed)", dict(width=2.5)))
        if s.evals:
            data.append(_line(_thin(s.evals), prefix + "eval loss", dict(dash="dot"), mode="lines+markers"))
        if single and s.lr:
            data.append(_line(_thin(s.lr), "learning rate", dict(width=1, color="#9ca3af"), yaxis="y2"))
    layout = {**_LAYOUT, "template": _template(),
              "xaxis": {"anchor": "y", "domain": [0.0, 0.94], "title": {"text": "step"}},
              "yaxis": {"anchor": "x", "domain": [0.0, 1.0], "title": {"text": "loss"}},
              "yaxis2": {"anchor": "x", "overlaying": "y", "side": "right", "title": {"text": "learning rate"},
                         "showgrid": False, "exponentformat": "e"}}
    return {"data": data, "layout": layout}


def _thin(points: list[tuple], n: int = MAX_POINTS) -> list[tuple]:
    if len(points) <= n:
        return points
    step = -(-len(points) // n)
    out = points[::step]
    return out if out[-1] == points[-1] else out + [points[-1]]


def _line(points, name: str, line: dict, mode: str = "lines", yaxis: str = "y", **extra) -> dict:
    xs, ys = zip(*points)
    axes = {"xaxis": "x", "yaxis": yaxis} if yaxis != "y" else {}
    return {"type": "scatter", "x": list(xs), "y": list(ys), "name": name, "mode": mode, "line": line, **axes, **extra}


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    import plotly.io as pio

    return pio.templates[_LAYOUT["template"]].to_plotly_json()
