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


# Smoothing of the train loss: TensorBoard's debiased exponential moving average, with its weight
# set for a chart of SMOOTHING_REF_POINTS points and scaled to the points drawn, so the window
# covers the same share of the run at step 8 as at step 8,000 (a fixed weight averages the first
# steps' high losses into the end of a short run). 0 turns it off.
DEFAULT_SMOOTHING = 0.6
SMOOTHING_REF_POINTS = 100
MAX_SMOOTHING = 0.999


def smoothing_weight(smoothing: float, n: int) -> float:
    """The EMA weight for a line of `n` points: smoothing ** (SMOOTHING_REF_POINTS / n), 0 when off."""
    if not smoothing or smoothing <= 0 or n <= 0:
        return 0.0
    return min(float(smoothing), MAX_SMOOTHING) ** (SMOOTHING_REF_POINTS / n)


def smooth(values: list[float], smoothing: float = DEFAULT_SMOOTHING) -> list[float]:
    """Debiased EMA (TensorBoard's): acc_t = w acc_(t-1) + (1 - w) v_t from acc_0 = 0, shown as
    acc_t / (1 - w^t), so the first points are not pulled towards zero or towards the first value.
    The same arithmetic runs in the live view's JS (studio/ui/live.py) when points are appended."""
    w = smoothing_weight(smoothing, len(values))
    if w == 0.0:
        return list(values)
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = w * acc + (1 - w) * v
        out.append(acc / (1 - w ** t))
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


class Series:
    """One run's curves, (step, value) points, built row by row: train loss, eval loss and learning
    rate, with `clean_rows`' rule for a resume (points above the resumed step are dropped). Adding
    rows costs what they are, not the whole run. The smoothed loss is derived from the train line
    where it is drawn (`smooth`): its weight depends on how many points there are."""

    def __init__(self):
        self.train: list[tuple] = []
        self.evals: list[tuple] = []
        self.lr: list[tuple] = []
        self.cuts = 0  # times a resume took points back: until then, the lines only grew

    def lines(self) -> list[list[tuple]]:
        """The measured lines of a one-run chart, in loss_spec's order of its traces without `meta.smooth_of`."""
        return [p for p in (self.train, self.evals, self.lr) if p]

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
            for points in (self.train, self.evals, self.lr):
                while points and points[-1][0] > n:  # steps rise within an attempt: the dropped ones are last
                    points.pop()
                    self.cuts += 1
            return
        if "step" not in r:
            return
        step = r["step"]
        loss = _finite(r.get("loss"))
        if loss is not None:
            self.train.append((step, loss))
        for key, points in (("eval_loss", self.evals), ("learning_rate", self.lr)):
            v = _finite(r.get(key))
            if v is not None:
                points.append((step, v))


def _finite(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def loss_figure(series: dict[str, list[dict]], smoothing: float = DEFAULT_SMOOTHING,
                marks: dict | None = None) -> go.Figure:
    """Train loss (raw, smoothed), eval loss and learning rate for one or more runs.

    `series` maps a run label to its metrics rows (or a Series). With one run the learning rate
    shows on a second axis; with several, only losses are drawn so the curves stay comparable.
    `marks`: layout shapes and annotations to add (`best_marks`).
    """
    return go.Figure(loss_spec(series, smoothing, marks))


def best_marks(status: dict | None) -> dict:
    """A dotted vertical line with a label at the best evaluation's step (status.json `best_step`,
    `best_metric`, `best_metric_name`: early stopping's and metric_for_best_model's best), as plotly
    layout `shapes` and `annotations`; both empty when the run has no best step yet."""
    st = status or {}
    step, value = st.get("best_step"), st.get("best_metric")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return {"shapes": [], "annotations": []}
    name = str(st.get("best_metric_name") or "eval_loss")
    label = f"best {name} {value:.4g} (step {step:g})" if isinstance(value, (int, float)) else f"best (step {step:g})"
    color = "#16a34a"
    return {"shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0, "y1": 1,
                        "line": {"color": color, "width": 1.5, "dash": "dot"}, "name": "best-step"}],
            "annotations": [{"xref": "x", "yref": "paper", "x": step, "y": 1, "text": label, "showarrow": False,
                             "xanchor": "left", "yanchor": "top", "font": {"size": 11, "color": color},
                             "bgcolor": "rgba(255,255,255,0.8)", "name": "best-step"}]}


def loss_plot(series: dict[str, list[dict] | Series], smoothing: float = DEFAULT_SMOOTHING,
              marks: dict | None = None) -> PlotData:
    """The same chart as `loss_figure`, already serialized for gr.Plot.

    The live chart is redrawn for every open tab at every tick while a run logs: built as plain
    JSON it costs about 0.5 ms instead of the 20-30 ms plotly's validating Figure takes, which
    with 20 tabs open was a whole CPU core taken from training.
    """
    return PlotData(type="plotly", plot=json.dumps(loss_spec(series, smoothing, marks), allow_nan=False))


def loss_spec(series: dict[str, list[dict] | Series], smoothing: float = DEFAULT_SMOOTHING,
              marks: dict | None = None) -> dict:
    """The loss chart as plain plotly JSON (what make_subplots with a secondary y axis builds).

    A smoothed line carries `meta.smooth_of`, the index of the raw line it is computed from (the
    live view recomputes it there when points are appended or the smoothing changes); it is hidden
    when the smoothing is 0."""
    data = []
    single = len(series) == 1
    on = smoothing_weight(smoothing, MAX_POINTS) > 0
    for label, rows in series.items():
        s = rows if isinstance(rows, Series) else Series.of(rows)
        prefix = "" if single else f"{label}: "
        if s.train:
            raw = _thin(s.train)
            faint = (0.35 if single else 0.25) if on else 1.0
            data.append(_line(raw, prefix + "train loss", dict(width=1), opacity=faint))
            steps, values = zip(*raw)
            data.append(_line(list(zip(steps, smooth(list(values), smoothing))), prefix + "train loss (smoothed)",
                              dict(width=2.5), meta={"smooth_of": len(data) - 1}, visible=on))
        if s.evals:
            data.append(_line(_thin(s.evals), prefix + "eval loss", dict(dash="dot"), mode="lines+markers"))
        if single and s.lr:
            data.append(_line(_thin(s.lr), "learning rate", dict(width=1, color="#9ca3af"), yaxis="y2"))
    layout = {**_LAYOUT, "template": _template(),
              "xaxis": {"anchor": "y", "domain": [0.0, 0.94], "title": {"text": "step"}},
              "yaxis": {"anchor": "x", "domain": [0.0, 1.0], "title": {"text": "loss"}},
              "yaxis2": {"anchor": "x", "overlaying": "y", "side": "right", "title": {"text": "learning rate"},
                         "showgrid": False, "exponentformat": "e", "rangemode": "nonnegative"}}
    if marks:
        layout["shapes"] = list(marks.get("shapes") or [])
        layout["annotations"] = list(marks.get("annotations") or [])
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
