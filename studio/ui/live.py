"""The Train tab's live view: run status, progress bar and loss chart, polled by the page itself.

Every open tab asks once a second while a run trains (every 5 s otherwise, or while the page is
hidden; less often when more than POLLS_PER_S tabs are open) for what changed, on a route of its own: GET /studio/live?run=ID&seen=TOKEN answers the
status and progress HTML and the points added to the chart since the tab's last answer (TOKEN,
which each answer carries), or the whole chart when the tab has none or its lines do not
continue. A gradio event for the same tick costs 3-4 ms of server CPU and wakes a worker thread
per output; this route costs about 0.5 ms and wakes none, and a few hundred bytes of new points
instead of the whole chart each second is what keeps 20 open tabs from slowing a run that trains
on every core (bench/ui_load.py).

The component's value is the run it follows and whether it is active ({"run", "active"}): the
page sets it when the answer names another run (one started from another tab or the CLI) or the
run stops being active, and that change event re-gates the Start button and shows the run's YAML.
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from studio import runs
from studio.ui.widgets.charts import (
    DEFAULT_SMOOTHING,
    MAX_SMOOTHING,
    SMOOTHING_REF_POINTS,
    Series,
    best_marks,
    loss_plot,
)

LIVE_PATH, PLOTLY_PATH = "/studio/live", "/studio/plotly.min.js"
TICK_ACTIVE_MS, TICK_IDLE_MS = 1000, 5000
# Polls a second the server answers, all open tabs together: with more tabs than this, each asks
# less often (20 tabs: every 2 s). Whatever runs beside a trainer that uses every core costs it 2-3
# times its CPU share (its OpenMP threads wait for the one put off its core), so the UI's cost is
# bounded by this, not by how many tabs are open.
POLLS_PER_S = 10.0
TAB_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
MAX_POLL_MS = 10_000  # however many tabs claim to be open

JS = r"""
const root = ((window.gradio_config && window.gradio_config.root) || '').replace(/\/$/, '');
const q = (sel) => element.querySelector(sel);
const MAX_HELD = 3000;  // points a line may grow to by appends before the tab asks for the thinned chart
const tab = Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
let shown = null, seen = '', timer = null, inFlight = false, again = false, failures = 0, marksShown = '';
// The smoothed loss, as charts.smooth computes it: TensorBoard's debiased EMA, its weight scaled to
// the number of points, recomputed from the raw line whenever points are appended or the slider moves.
const slider = q('.lv-smooth input');
const SMOOTH_KEY = 'studio.loss-smoothing';
const stored = parseFloat(localStorage.getItem(SMOOTH_KEY));
if (Number.isFinite(stored) && stored >= 0 && stored <= __MAXSMOOTH__) slider.value = String(stored);
function smoothing() { const s = parseFloat(slider.value); return Number.isFinite(s) && s > 0 ? s : 0; }
function smoothWeight(s, n) { return s > 0 && n > 0 ? Math.pow(Math.min(s, __MAXSMOOTH__), __SMOOTHREF__ / n) : 0; }
function smoothed(ys, s) {
  const w = smoothWeight(s, ys.length);
  if (w === 0) return ys.slice();
  const out = new Array(ys.length);
  let acc = 0;
  for (let t = 0; t < ys.length; t++) { acc = w * acc + (1 - w) * ys[t]; out[t] = acc / (1 - Math.pow(w, t + 1)); }
  return out;
}
async function resmooth() {
  const div = q('.lv-plot');
  q('.lv-smooth-val').textContent = smoothing() ? smoothing().toFixed(2) : 'off';
  if (!div.data || !window.Plotly) return;
  const s = smoothing(), idx = [], raw = [], xs = [], ys = [];
  div.data.forEach((t, i) => {
    const k = t.meta && t.meta.smooth_of;
    if (k == null || !div.data[k]) return;
    idx.push(i); raw.push(k); xs.push(Array.from(div.data[k].x)); ys.push(smoothed(Array.from(div.data[k].y), s));
  });
  if (!idx.length) return;
  await window.Plotly.restyle(div, {x: xs, y: ys, visible: s > 0}, idx);
  await window.Plotly.restyle(div, {opacity: s > 0 ? 0.35 : 1}, raw);
}
slider.addEventListener('input', () => { localStorage.setItem(SMOOTH_KEY, slider.value); resmooth(); });
function ensurePlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!window.__studioPlotly) {
    window.__studioPlotly = new Promise((ok, bad) => {
      const s = document.createElement('script');
      s.src = root + '__PLOTLY__';
      s.onload = () => ok(window.Plotly);
      s.onerror = () => { window.__studioPlotly = null; bad(new Error('plotly did not load')); };
      document.head.appendChild(s);
    });
  }
  return window.__studioPlotly;
}
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(tick, document.hidden ? Math.max(ms, __IDLE__) : ms);
}
async function apply(d) {
  if (d.run !== shown) { shown = d.run; seen = ''; }
  q('.lv-status').innerHTML = d.status;
  q('.lv-progress').innerHTML = d.progress;
  const div = q('.lv-plot');
  let whole = true;
  if (!d.run && div.data) (await ensurePlotly()).purge(div);  // the run shown was deleted, none is left
  if (d.plot) {
    const Plotly = await ensurePlotly();
    await Plotly.react(div, d.plot.data, d.plot.layout, {responsive: true, displaylogo: false});
    marksShown = '';
    await resmooth();
  } else if (d.append) {
    // the answer's lines are the measured ones, in order; smoothed lines are derived here
    const measured = div.data ? div.data.map((t, i) => i).filter(i => !(div.data[i].meta && div.data[i].meta.smooth_of != null)) : [];
    const idx = [], xs = [], ys = [];
    d.append.forEach((t, i) => { if (t[0].length) { idx.push(measured[i]); xs.push(t[0]); ys.push(t[1]); } });
    if (!div.data || measured.length !== d.append.length) whole = false;
    else if (idx.length) { await (await ensurePlotly()).extendTraces(div, {x: xs, y: ys}, idx); await resmooth(); }
  }
  const marks = JSON.stringify(d.marks || {});
  if (div.data && window.Plotly && marks !== marksShown) {
    const m = d.marks || {};
    await window.Plotly.relayout(div, {shapes: m.shapes || [], annotations: m.annotations || []});
    marksShown = marks;
  }
  const held = div.data ? Math.max(0, ...div.data.map(t => t.x.length)) : 0;
  seen = whole && held <= MAX_HELD ? d.seen : '';
  if (!whole) again = true;  // ask for the whole chart now
  const v = props.value || {};
  if ((v.run || null) !== d.run || !!v.active !== d.active) props.value = {run: d.run, active: d.active};
}
async function tick() {
  if (!element.isConnected) { clearTimeout(timer); return; }  // this view was taken off the page: stop
  if (inFlight) { again = true; return; }  // asked for while a poll is out: poll again right after it
  clearTimeout(timer);
  inFlight = true;
  again = false;
  let wait = __IDLE__;
  try {
    const v = props.value || {};
    const asked = v.run || null;
    const want = v.run || shown;
    const params = new URLSearchParams({seen: want && want === shown ? seen : '', tab});
    if (want) params.set('run', want);
    const r = await fetch(root + '__LIVE__?' + params, {cache: 'no-store', credentials: 'same-origin'});
    if (!(r.headers.get('content-type') || '').includes('json')) throw new Error('HTTP ' + r.status);
    const d = await r.json();
    if (!r.ok) throw new Error(d.error || r.statusText);
    // Python set another run while this poll was out (Start): that one is shown by the next poll.
    if (((props.value || {}).run || null) !== asked) { again = true; return; }
    await apply(d);
    failures = 0;
    // the server spreads its poll budget over the open tabs
    wait = Math.min(__MAXPOLL__, Math.max(d.next_ms || 0, d.active ? __ACTIVE__ : __IDLE__));
  } catch (e) {
    failures += 1;
    if (failures >= 3) q('.lv-note').textContent = 'The studio server is not answering (' + e.message + '); retrying.';
  } finally {
    if (failures === 0) q('.lv-note').textContent = '';
    inFlight = false;
    schedule(again ? 0 : wait);
  }
}
// Python sets the value after Start and a page load: show that run at once.
watch('value', () => { const v = props.value || {}; if ((v.run || null) !== shown) tick(); });
document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
tick();
"""

CSS = """
.lv-status { font-size: 1.05em; min-height: 1.6em; }
.lv-plot { min-height: 340px; }
.lv-note { color: #b45309; font-size: 12px; }
.lv-smooth { font-size: 12px; display: flex; gap: 8px; align-items: center; justify-content: flex-end; }
.lv-smooth input { width: 160px; }
"""

TEMPLATE = ("<div class='lv'><div id='run-status' class='lv-status'></div><div id='run-progress' class='lv-progress'></div>"
            "<div class='lv-note'></div>"
            "<label class='lv-smooth' title='Debiased moving average of the train loss, as TensorBoard draws it; "
            "the window scales with the number of points. 0: off'>smoothing "
            f"<input id='loss-smoothing' type='range' min='0' max='{MAX_SMOOTHING:g}' step='0.01' "
            f"value='{DEFAULT_SMOOTHING:g}'><span class='lv-smooth-val'>{DEFAULT_SMOOTHING:.2f}</span></label>"
            "<div id='loss-plot'><div class='lv-plot'></div></div></div>")


class LiveRun(gr.HTML):
    """value: {"run": run id or None, "active": bool}, the run the view follows."""

    def __init__(self, value=None, **kwargs):
        js = (JS.replace("__PLOTLY__", PLOTLY_PATH).replace("__LIVE__", LIVE_PATH)
              .replace("__ACTIVE__", str(TICK_ACTIVE_MS)).replace("__IDLE__", str(TICK_IDLE_MS))
              .replace("__MAXPOLL__", str(MAX_POLL_MS)).replace("__MAXSMOOTH__", repr(MAX_SMOOTHING))
              .replace("__SMOOTHREF__", str(SMOOTHING_REF_POINTS)))
        super().__init__(value=value or {"run": None, "active": False}, html_template=TEMPLATE,
                         css_template=CSS, js_on_load=js, **kwargs)

    def preprocess(self, payload):
        return phase(payload)

    def postprocess(self, value):
        return phase(value)

    def api_info(self):
        return {"type": "object", "properties": {"run": {"type": "string"}, "active": {"type": "boolean"}}}


# Which run is active, shared by every open tab for ACTIVE_TTL_S: finding it reads the status of
# every run folder (12 ms with 200 runs and none active), and each tab polls once a second.
ACTIVE_TTL_S = 1.0
_active_lock = threading.Lock()
_active_seen: dict[str, tuple[float, Path | None]] = {}


def active_is_cached(runs_dir: Path) -> bool:
    with _active_lock:
        hit = _active_seen.get(str(runs_dir))
    return hit is not None and time.monotonic() - hit[0] < ACTIVE_TTL_S


def active_run(runs_dir: Path) -> Path | None:
    key = str(runs_dir)
    with _active_lock:
        hit = _active_seen.get(key)
        if hit is not None and time.monotonic() - hit[0] < ACTIVE_TTL_S:
            return hit[1]
    found = runs.active_run(runs_dir)
    with _active_lock:
        _active_seen[key] = (time.monotonic(), found)
    return found


def forget_active(runs_dir: Path) -> None:
    """A run was just started here: the next poll looks again."""
    with _active_lock:
        _active_seen.pop(str(runs_dir), None)


class Curve:
    """One run's metrics as the Train tab shows them, read once for every open tab.

    One Curve per run reads only what is new (by byte offset) and extends the chart's lines by
    the new rows. A tab that already shows the chart gets only the points added since its last
    answer (`since`), a few hundred bytes a second instead of the whole chart (up to 60 kB); the
    whole chart, thinned to charts.MAX_POINTS a line and serialized once per version for every
    tab, goes to a tab that has none, or whose lines no longer continue (a resume took points
    back, the metrics file was recreated, a new line appeared, or the tab holds too many points).
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.lock = threading.Lock()
        self.resets = 0
        self.file_id = 0  # the metrics file's inode: a recreated file is another file
        self._reset()

    def _reset(self) -> None:
        self.offset, self.version = 0, getattr(self, "version", 0) + 1
        self.resets += 1
        self.series = Series()
        self.last: dict = {}  # newest tokens_per_s, loss and eval_accuracy seen
        self._plot = (None, None)

    def update(self) -> int:
        """Read what is new; the version, which changes whenever the curve does."""
        with self.lock:
            try:
                file_id = os.stat(self.dir / runs.METRICS).st_ino
            except OSError:
                file_id = 0
            if file_id != self.file_id:  # created, recreated or deleted: start over
                self.file_id = file_id
                self._reset()
            rows, offset = runs.read_metrics(self.dir, self.offset)
            if offset < self.offset:  # cut shorter in place: start over
                self._reset()
                rows, offset = runs.read_metrics(self.dir, 0)
            self.offset = offset
            if rows:
                self.series.extend(rows)
                for r in rows:
                    self.last.update({k: r[k] for k in ("tokens_per_s", "loss", "eval_accuracy")
                                      if r.get(k) is not None})
                self.version += 1
            return self.version

    def last_train(self) -> tuple | None:
        """(step, loss) of the newest train loss read."""
        with self.lock:
            return self.series.train[-1] if self.series.train else None

    def plot(self):
        with self.lock:
            version, plot = self._plot
            if version != self.version:
                plot = loss_plot({self.dir.name: self.series})
                self._plot = (self.version, plot)
            return plot

    def token(self) -> str:
        """What a tab holds after this answer: the lines' lengths, and what would break them."""
        with self.lock:
            return f"{self._epoch()}:" + ",".join(str(len(p)) for p in self.series.lines())

    def _epoch(self) -> str:
        """What a tab's lines continue from: this file, and no reset or resume since."""
        return f"{self.file_id}.{self.resets}.{self.series.cuts}"

    def since(self, token: str) -> list[list[list]] | None:
        """[[xs, ys] per drawn line] added after `token`; None when the tab needs the whole chart."""
        epoch, _, lens = (token or "").partition(":")
        with self.lock:
            lines = self.series.lines()
            if epoch != self._epoch() or not TOKEN_LENS.fullmatch(lens):
                return None
            held = [int(n) for n in lens.split(",")] if lens else []
            if len(held) != len(lines) or any(n > len(p) for n, p in zip(held, lines)):
                return None
            return [[[x for x, _ in p[n:]], [y for _, y in p[n:]]] for n, p in zip(held, lines)]


TOKEN_LENS = re.compile(r"(\d{1,9}(,\d{1,9}){0,7})?")


CURVES_KEPT = 16  # runs whose curves stay in memory (the ones tabs looked at last)
_curves_lock = threading.Lock()
_curves: OrderedDict[str, Curve] = OrderedDict()


def curve_of(run_dir) -> Curve:
    key = str(run_dir)
    with _curves_lock:
        c = _curves.get(key)
        if c is None:
            c = _curves[key] = Curve(Path(run_dir))
            while len(_curves) > CURVES_KEPT:
                _curves.popitem(last=False)
        _curves.move_to_end(key)
        return c


def status_view(run_dir: Path | None, st: dict | None = None) -> tuple[str, str, bool]:
    """(run-status HTML, run-progress HTML, whether the run is active); `st`: the run's status, if read.

    The step shown is the newer of status.json's (written at most once a second) and the last
    logged loss's, and the loss is the one logged at that step (or says which step it is from)."""
    if run_dir is None:
        return "<div class='rs'>No run yet: press <b>Start training</b>.</div>", _bar(0, 0), False
    curve = curve_of(run_dir)
    if st is None:
        st = runs.read_status(run_dir)
        curve.update()
    last, logged = curve.last, curve.last_train()
    step, total = st.get("step") or 0, st.get("max_steps") or 0
    if logged is not None and logged[0] > step:
        step = logged[0]
    state_name = st.get("state", "queued")
    bits = [f"<span class='badge st-{state_name}'>{state_name}</span>",
            f"<b>{html.escape(Path(run_dir).name)}</b>", f"step {step} / {total}"]
    elapsed = st.get("elapsed_s")
    if elapsed is None and st.get("started_at"):
        elapsed = (st.get("updated_at") or time.time()) - st["started_at"]
    if elapsed:
        bits.append(f"elapsed {_dur(elapsed)}")
    if st.get("eta_s") is not None and state_name == "running":
        bits.append(f"ETA {_dur(st['eta_s'])}")
    if last.get("tokens_per_s"):
        bits.append(f"{last['tokens_per_s']:,.0f} tokens/s")
    if logged is not None:
        at, loss = logged
        bits.append(f"loss {loss:.4f}" + ("" if at == step else f" (step {at})"))
    elif st.get("last_loss") is not None:
        bits.append(f"loss {st['last_loss']:.4f}")
    if st.get("eval_loss") is not None:
        bits.append(f"eval loss {st['eval_loss']:.4f}")
    if last.get("eval_accuracy") is not None:
        bits.append(f"eval accuracy {last['eval_accuracy']:.1%}")
    limit = (st.get("memory") or {}).get("limit_bytes")  # how close the run is to the trainer's memory limit
    for key, what, of in (("peak_rss_mb", "RAM", limit), ("peak_gpu_mb", "GPU", None)):
        if isinstance(st.get(key), (int, float)):
            bits.append(f"peak {what} {st[key] / 1024:.2f}" + (f" of {of / 2**30:.2f}" if of else "") + " GB")
    out = "<div class='rs'>" + " · ".join(bits) + "</div>"
    if st.get("error") and state_name in ("failed", "diverged"):
        out += f"<pre class='rs-err'>{html.escape(str(st['error'])[-3000:])}</pre>"
    active = state_name in runs.ACTIVE_STATES and st.get("alive", False)
    return out, _bar(step, total), active


def _bar(step: int, total: int) -> str:
    pct = 100.0 * step / total if total else 0.0
    return (f"<div class='pbar' data-step='{step}' data-total='{total}'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='pbar-text'>{step} / {total} steps ({pct:.0f}%)</div>")


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_tabs_lock = threading.Lock()
_tabs_until: dict[str, float] = {}  # tab id -> when it counts as closed if it has not asked again
MAX_TABS = 10_000


def next_poll_ms(tab: str | None, active: bool) -> int:
    """When this tab should ask again: TICK_ACTIVE_MS while a run is active (TICK_IDLE_MS when not),
    later when more tabs are open than POLLS_PER_S allows. A tab counts as open until twice its
    interval and a second have passed without a poll from it."""
    now = time.monotonic()
    base = TICK_ACTIVE_MS if active else TICK_IDLE_MS
    with _tabs_lock:
        for t in [t for t, until in _tabs_until.items() if until < now]:
            del _tabs_until[t]
        open_tabs = len(_tabs_until) + (tab is not None and tab not in _tabs_until)
        ms = min(MAX_POLL_MS, max(base, round(1000 * open_tabs / POLLS_PER_S)))
        if tab is not None and (tab in _tabs_until or len(_tabs_until) < MAX_TABS):
            _tabs_until[tab] = now + 2 * ms / 1000 + 1
    return ms


valid_run_id = runs.is_run_id  # the one run-id rule (studio.runs.rundir)


def phase(value) -> dict:
    v = value if isinstance(value, dict) else {}
    run = v.get("run")
    return {"run": run if valid_run_id(run) else None, "active": bool(v.get("active"))}


def run_path(root: Path, run_id: str | None) -> Path | None:
    """The run folder of an id the page sent: a plain name of a folder directly in the runs folder."""
    if not run_id:
        return None
    if not valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id[:80]!r} (a folder name in the runs folder)")
    d = root / run_id
    return d if (d / runs.CONFIG).is_file() or (d / runs.STATUS).is_file() else None


def shown_run(root: Path, asked: Path | None = None) -> Path | None:
    """The run a live view shows: the active one, else `asked`, else the newest."""
    active = active_run(root)
    if active is not None:
        return active
    if asked is not None:
        return asked
    listed = runs.list_runs(root)
    return Path(listed[0]["dir"]) if listed else None


def payload(root: Path, run_id: str | None, seen: str) -> tuple[dict, str | None]:
    """(what changed for a tab that shows `run_id` and holds the chart `seen`, the whole chart's
    JSON when it needs it, else None: then meta["append"] holds the new points per line).

    A run active in the runs folder wins over the one the tab shows (the tab follows a run started
    elsewhere); with none named or found (deleted meanwhile), the newest run."""
    asked = run_path(root, run_id)
    d = shown_run(root, asked)
    if d != asked:
        seen = ""
    if d is None:
        status, bar, _ = status_view(None)
        return {"run": None, "active": False, "status": status, "progress": bar, "seen": ""}, None
    curve = curve_of(d)
    st = runs.read_status(d)  # before the metrics: the step it names is then never ahead of the losses read
    curve.update()
    status, bar, is_active = status_view(d, st)
    token = curve.token()
    meta = {"run": d.name, "active": is_active, "status": status, "progress": bar, "seen": token,
            "marks": best_marks(st)}
    if seen == token:
        return meta, None
    tails = curve.since(seen)
    if tails is None:
        return meta, curve.plot().plot
    meta["append"] = tails
    return meta, None


def body(meta: dict, plot_json: str | None) -> bytes:
    """The answer's JSON; the whole chart, already serialized once for every tab, is spliced in as is."""
    text = json.dumps(meta, allow_nan=False)
    if plot_json is not None:
        text = text[:-1] + ', "plot": ' + plot_json + "}"
    return text.encode()


def routes(root: Path) -> list[Route]:
    """The live route and plotly's script (for a page where gradio has not loaded it yet)."""
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"

    async def live(request: Request) -> Response:
        run_id = request.query_params.get("run") or None
        seen = request.query_params.get("seen", "")
        tab = request.query_params.get("tab") or None
        if len(seen) > 200:
            return JSONResponse({"error": "seen is longer than 200 characters"}, status_code=400)
        if tab is not None and not TAB_ID.fullmatch(tab):
            return JSONResponse({"error": f"not a tab id: {tab[:80]!r} (1-64 letters, digits and '-')"},
                                status_code=400)
        try:
            if run_id is None or not seen or not active_is_cached(root):
                # What may read many files (every run's status, a whole metrics file) runs on a
                # worker thread; the usual poll reads three small files and stays on the loop.
                meta, plot = await run_in_threadpool(payload, root, run_id, seen)
            else:
                meta, plot = payload(root, run_id, seen)
            meta["next_ms"] = next_poll_ms(tab, meta["active"])
            data = body(meta, plot)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def plotly_script(request: Request) -> Response:
        return FileResponse(plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    return [Route(LIVE_PATH, live, methods=["GET"]), Route(PLOTLY_PATH, plotly_script, methods=["GET"])]
