"""UI under load: training slowdown and poll latency with many browser-like clients (a benchmark).

    python bench/ui_load.py [--clients 20] [--phase-s 10] [--rounds 5] [--threads 1,2] [--json out.json] [--no-docs]

One script run: the UI server (`python app.py`, its own process, 127.0.0.1 on a free port, a
temporary runs folder) and one training run (tiny-llama, LoRA r=8 on q/k/v/o_proj, batch 8 x
128 tokens packed, fp32 on CPU, logging every step, no checkpoints or evaluation while measured).
While it trains, phases alternate: idle (the server up, nobody polling), then load (`--clients`
clients polling), `--rounds` times, ending idle: A B A B A. Each load client behaves like an
open browser tab on the Train tab: it opens a session with the page's load event (sent the way
the page's client sends it, read from the page's config: a queue join, then the session's SSE
stream until `process_completed`), then polls the live view's route once a second while the run
is active, as the view's script does (studio/ui/live.py): GET /studio/live with the run it shows
and the curve version it has, accepting brotli like a browser; the chart comes back only when
it changed. Latency is from the request to the whole answer.

Training speed comes from the trainer's own metrics (tokens and training seconds per logged
step, read by byte offset at phase boundaries), so only steps inside a phase count; slowdown =
1 - (tokens/s under load) / (tokens/s idle), phases pooled; and each load phase against the mean
of the idle phases on either side, with the standard error of those: the shared machine's own
speed drifts by 10% and more between phases, which only many pairs average out. Bounded: `--clients` threads,
`--phase-s` seconds a phase, loopback only; everything is stopped at the end.

Prints a markdown section for docs/benchmarks.md ("UI under load", rewritten in place) and,
with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import machine, write_section  # noqa: E402 - bench/report.py

from studio import runs  # noqa: E402
from studio.config import RunConfig  # noqa: E402
from studio.ui import live  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit", "maple"]
TARGET_SLOWDOWN, TARGET_P95_MS = 0.05, 200.0


# --- the pieces --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dataset(path: Path, n: int = 600) -> Path:
    rows = []
    for i in range(n):
        w = WORDS[(i * 7) % len(WORDS)]
        rows.append([{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]},
                     {"instruction": "Write the word in capitals.", "input": w, "output": w.upper()},
                     {"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}][i % 3])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_history(runs_dir: Path, n: int) -> None:
    """Finished runs already in the folder, as a runs folder in use has (a status, a 100-step curve)."""
    cfg = RunConfig()
    for i in range(n):
        d = runs.create_run(cfg, runs_dir, run_id=f"20260101-0000{i:02d}-finished-{i:03d}")
        runs.write_json_atomic(d / runs.STATUS, {"state": "completed", "step": 100, "max_steps": 100,
                                                  "pid": 4_000_000 + i, "pid_started": 0.0, "created_at": i,
                                                  "last_loss": 1.0, "error": None})
        (d / runs.METRICS).write_text("".join(json.dumps({"step": s, "loss": 5 - s / 50, "learning_rate": 1e-3,
                                                          "tokens": 1024, "elapsed_s": s * 0.1}) + "\n"
                                              for s in range(1, 101)))


def start_server(port: int, runs_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir)],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the UI server exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the UI server did not start within 180 s")


def page_load_fn(port: int) -> int:
    """The fn index of the page's load event, from the page's config (it goes through the queue)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/config")
    cfg = json.loads(conn.getresponse().read())
    conn.close()
    return next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == "page_load")


class Tab(threading.Thread):
    """One browser tab on the Train tab: the page's load event once, then the live view's poll
    once a second while the run is active (every 5 s when it is not)."""

    def __init__(self, port: int, load_fn: int, stop: threading.Event, start_at: float):
        super().__init__(daemon=True)
        self.port, self.load_fn, self.stop, self.start_at = port, load_fn, stop, start_at
        self.interval = live.TICK_ACTIVE_MS / 1000  # until the first answer says when to ask next
        self.session = uuid.uuid4().hex[:11]
        self.latencies: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self.shown, self.seen = None, ""  # the run the tab shows and the chart it holds (the answer's token)
        self.plots = self.appends = 0  # answers with the whole chart, with new points only
        self.conn: http.client.HTTPConnection | None = None
        self.errors: list[str] = []
        self.loaded = threading.Event()

    def load_page(self) -> float:
        """The page's load event as the page sends it: a queue join, then the session's event
        stream until the result."""
        t0 = time.perf_counter()
        join = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = json.dumps({"data": [None], "fn_index": self.load_fn, "session_hash": self.session,
                           "event_data": None, "trigger_id": None})
        join.request("POST", "/gradio_api/queue/join", body=body, headers={"Content-Type": "application/json"})
        r = join.getresponse()
        r.read()
        join.close()
        if r.status != 200:
            raise RuntimeError(f"join answered {r.status}")
        stream = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            stream.request("GET", f"/gradio_api/queue/data?session_hash={self.session}")
            resp = stream.getresponse()
            while True:
                line = resp.readline()
                if not line:
                    raise RuntimeError("the event stream ended without a result")
                if line.startswith(b"data:") and b'"process_completed"' in line:
                    if b'"success":true' not in line.replace(b" ", b""):
                        raise RuntimeError(line[:300].decode("utf-8", "replace"))
                    return time.perf_counter() - t0
        finally:
            stream.close()

    def live(self) -> tuple[float, dict]:
        """One poll of the Train tab's live view, as its script sends it (studio/ui/live.py): the
        run it shows and the token of the chart it holds; new points come back, the whole chart
        only when needed. Like a browser's fetch, on one kept-alive connection per tab (opened
        again when the server has closed it)."""
        query = urllib.parse.urlencode({"seen": self.seen, "tab": self.session,
                                        **({"run": self.shown} if self.shown else {})})
        t0 = time.perf_counter()
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("GET", f"{live.LIVE_PATH}?{query}", headers={"Accept-Encoding": "gzip, deflate, br"})
                r = self.conn.getresponse()
                out = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        took = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"{live.LIVE_PATH} answered {r.status}: {out[:300]!r}")
        if r.getheader("Content-Encoding") == "br":
            import brotli

            out = brotli.decompress(out)
        d = json.loads(out)
        self.shown, self.seen = d["run"], d["seen"]  # what the view's script keeps for the next poll
        self.plots += "plot" in d
        self.appends += "append" in d
        return took, d

    def run(self) -> None:
        try:
            self.load_page()  # a new tab: the model tab's tree and the run to follow
        except Exception as e:
            self.errors.append(f"page_load: {e}")
        self.loaded.set()
        next_at = max(time.monotonic(), self.start_at)
        while not self.stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                break
            t = time.monotonic()
            interval = self.interval
            try:
                took, d = self.live()
                self.latencies.append((t, took))
                interval = d["next_ms"] / 1000  # when the page's script asks next
            except Exception as e:
                self.errors.append(str(e))
            next_at = max(next_at + interval, time.monotonic())  # a late tick is not made up twice
        if self.conn is not None:
            self.conn.close()


def phase_speed(rows: list[dict]) -> dict:
    """Tokens/s and seconds per step over the training rows logged inside one phase."""
    rows = [r for r in rows if r.get("tokens") and r.get("elapsed_s") is not None]
    if len(rows) < 3:
        return {"steps": len(rows), "tokens_per_s": None, "step_s_median": None}
    # elapsed_s is training time since the run began; rows are one per step (logging_steps=1)
    span = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    tokens = sum(r["tokens"] for r in rows[1:])
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    return {"steps": len(rows), "tokens_per_s": tokens / span if span > 0 else None,
            "step_s_median": statistics.median(gaps), "tokens": tokens, "seconds": span}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# --- the benchmark -------------------------------------------------------------------------------

def measure(a) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="studio-ui-load-"))
    runs_dir = tmp / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})
    port = free_port()
    server = run_dir = None
    try:
        write_history(runs_dir, a.history)
        server = start_server(port, runs_dir, tmp / "server.log", env)
        cfg = RunConfig.from_dict({
            "model": {"name_or_path": "tiny-llama"},
            "data": {"path": str(write_dataset(tmp / "data.jsonl")), "max_length": 128, "packing": True,
                     "eval_fraction": 0.0},
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"learning_rate": 1e-3, "max_steps": 100_000, "per_device_train_batch_size": 8,
                      "logging_steps": 1, "save_steps": 1_000_000, "warmup_ratio": 0.0, "seed": 0}})
        run_dir = runs.start_run(cfg, runs_dir)
        deadline = time.monotonic() + 180
        while runs.read_status(run_dir)["step"] < a.warmup_steps:
            if time.monotonic() > deadline or runs.read_status(run_dir)["state"] in runs.FINAL_STATES:
                raise RuntimeError(f"training did not reach step {a.warmup_steps}: {runs.log_tail(run_dir)}")
            time.sleep(0.2)
        load_fn = page_load_fn(port)
        server_proc, me = psutil.Process(server.pid), psutil.Process()
        trainer = psutil.Process(runs.read_status(run_dir)["pid"])
        _, offset = runs.read_metrics(run_dir)
        phases = []
        for kind in ["idle", "load"] * a.rounds + ["idle"]:
            stop, tabs = threading.Event(), []
            if kind == "load":
                start_at = time.monotonic() + 0.5
                tabs = [Tab(port, load_fn, stop, start_at + i / a.clients) for i in range(a.clients)]
                for t in tabs:  # ticks spread over the second, as independent tabs would be
                    t.start()
                for t in tabs:
                    t.loaded.wait(120)
                time.sleep(1.0)  # every tab polling before the phase starts
            _, offset = runs.read_metrics(run_dir, offset)
            cpu0 = {n: p.cpu_times() for n, p in (("server", server_proc), ("clients", me), ("trainer", trainer))}
            t0 = time.monotonic()
            time.sleep(a.phase_s)
            t1 = time.monotonic()
            rows, offset = runs.read_metrics(run_dir, offset)
            cpu = {n: (sum(p.cpu_times()[:2]) - sum(cpu0[n][:2])) / (t1 - t0)
                   for n, p in (("server", server_proc), ("clients", me), ("trainer", trainer))}
            stop.set()
            for t in tabs:
                t.join(30)
            lat = [s for t in tabs for (when, s) in t.latencies if t0 <= when <= t1]
            phases.append({"kind": kind, **phase_speed(rows), "cpu": cpu, "polls": len(lat),
                           "poll_p50_ms": pct(lat, 50) * 1000 if lat else None,
                           "poll_p95_ms": pct(lat, 95) * 1000 if lat else None,
                           "latencies_s": lat, "errors": [e for t in tabs for e in t.errors],
                           "charts": sum(t.plots for t in tabs), "appends": sum(t.appends for t in tabs)})
            print(f"{kind:>4}: {phases[-1]['tokens_per_s'] or 0:8,.0f} tokens/s over {phases[-1]['steps']} steps; "
                  f"server CPU {cpu['server']:.0%}, trainer CPU {cpu['trainer']:.0%}"
                  + (f"; {len(lat)} polls, p50 {pct(lat, 50) * 1000:.0f} ms, p95 {pct(lat, 95) * 1000:.0f} ms"
                     if lat else ""), flush=True)
        st = runs.read_status(run_dir)
    finally:
        if run_dir is not None:
            runs.stop_run(run_dir, timeout=30)
        if server is not None:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    def pooled(kind):
        ph = [p for p in phases if p["kind"] == kind and p["tokens_per_s"]]
        return sum(p["tokens"] for p in ph) / sum(p["seconds"] for p in ph)

    idle, load = pooled("idle"), pooled("load")
    # Each load phase against the mean of the idle phases on either side: a drift of the shared
    # machine's speed cancels, and the spread of these says how far to trust the pooled figure.
    pairs = [1 - phases[i]["tokens_per_s"] / ((phases[i - 1]["tokens_per_s"] + phases[i + 1]["tokens_per_s"]) / 2)
             for i in range(1, len(phases) - 1, 2)
             if all(phases[j]["tokens_per_s"] for j in (i - 1, i, i + 1))]
    spread = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else None
    lat = [s for p in phases for s in p["latencies_s"]]
    return {
        "date": datetime.date.today().isoformat(), "clients": a.clients, "polls_per_s_budget": live.POLLS_PER_S, "history": a.history,
        "phase_s": a.phase_s, "rounds": a.rounds, "threads": a.threads, "machine": machine(),
        "load_average": os.getloadavg()[0], "steps_at_end": st.get("step"),
        "idle_tokens_per_s": idle, "load_tokens_per_s": load, "slowdown": 1 - load / idle,
        "slowdown_pairs": pairs, "slowdown_pairs_mean": statistics.mean(pairs) if pairs else None,
        "slowdown_pairs_se": spread,
        "poll_count": len(lat), "charts": sum(p["charts"] for p in phases), "appends": sum(p["appends"] for p in phases),
        "poll_p50_ms": pct(lat, 50) * 1000, "poll_p95_ms": pct(lat, 95) * 1000,
        "poll_p99_ms": pct(lat, 99) * 1000, "poll_max_ms": max(lat) * 1000,
        "errors": [e for p in phases for e in p["errors"]][:20],
        "phases": [{k: v for k, v in p.items() if k != "latencies_s"} for p in phases],
    }


# --- the report ----------------------------------------------------------------------------------

def _pairs(r: dict) -> str:
    if not r.get("slowdown_pairs"):
        return ""
    se = f" ± {r['slowdown_pairs_se']:.1%}" if r.get("slowdown_pairs_se") is not None else ""
    return f"{r['slowdown_pairs_mean']:.1%}{se} ({', '.join(f'{x:.1%}' for x in r['slowdown_pairs'])})"


def markdown(results: list[dict]) -> str:
    r0 = results[0]
    ok = all(r["slowdown"] < TARGET_SLOWDOWN and r["poll_p95_ms"] < TARGET_P95_MS for r in results)

    def phase_rows(r):
        out = []
        for i, p in enumerate(r["phases"]):
            lat = (f"{p['poll_p50_ms']:.0f} / {p['poll_p95_ms']:.0f}" if p.get("polls") else "")
            out.append(f"| {r['threads']} | {i + 1} | {p['kind']} | {p['steps']} | {p['tokens_per_s'] or 0:,.0f} | "
                       f"{(p['step_s_median'] or 0) * 1000:.0f} | {p['cpu']['server']:.0%} | {p['cpu']['trainer']:.0%} | "
                       f"{p['cpu']['clients']:.0%} | {p['polls'] or ''} | {lat} |")
        return "\n".join(out)

    def met(r):
        return "yes" if r["slowdown"] < TARGET_SLOWDOWN and r["poll_p95_ms"] < TARGET_P95_MS and not r["errors"] else "no"

    summary = "\n".join(
        f"| {r['threads']} | **{r['slowdown']:.1%}** ({r['idle_tokens_per_s']:,.0f} -> {r['load_tokens_per_s']:,.0f}) | "
        f"{_pairs(r)} | "
        f"{r['poll_p50_ms']:.0f} / **{r['poll_p95_ms']:.0f}** / {r['poll_p99_ms']:.0f} / {r['poll_max_ms']:.0f} | "
        f"{r['poll_count']} | {r['charts']} / {r['appends']} | {len(r['errors'])} | {met(r)} |" for r in results)
    return f"""## UI under load

`bench/ui_load.py`: the UI server (`python app.py` on 127.0.0.1) and one training run (tiny-llama,
LoRA r=8 on q/k/v/o_proj, batch 8 x 128 tokens packed, fp32 on CPU, a metrics line every step),
with {r0['history']} finished runs already in the runs folder. Phases of {r0['phase_s']:g} s
alternate while it trains: idle (nobody polling) and load ({r0['clients']} browser-like clients on
the same machine, each a session that ran the page's load event, then polls the Train tab's live
view the way its script does: GET /studio/live with its tab id, the run it shows and the token of
the chart it holds, on one kept-alive connection as a browser's fetch does, and again when the
answer says: once a second, or less often with more than {r0['polls_per_s_budget']:g} tabs open, so
that the server answers at most {r0['polls_per_s_budget']:g} polls a second (every 2 s each with 20
tabs). The first answer carries the whole chart, later ones the new points. Training speed is the trainer's own tokens per training second over the steps logged
inside each phase. Measured {r0['date']} on {r0['machine']}; 1-minute load average
{r0['load_average']:.1f} at the end (a shared machine).

| trainer threads | **training slowdown** (tokens/s idle -> load, pooled phases) | each load phase vs its idle neighbours: mean ± s.e. (per phase) | poll latency p50 / **p95** / p99 / max (ms) | polls | whole charts / new points sent | failed | targets met |
| ---: | --- | --- | --- | ---: | --- | ---: | --- |
{summary}

Targets: slowdown < {TARGET_SLOWDOWN:.0%} and p95 < {TARGET_P95_MS:.0f} ms, {"met by every configuration" if ok else "not met by every configuration (see the last column)"}.
Single phases swing by several points either way on this shared machine, with a core to spare as
much as without (its own speed drifts between phases): read the pooled figure and the mean of the
pairs with its standard error, not one phase.

| threads | phase | kind | steps | tokens/s | median step (ms) | server CPU | trainer CPU | clients CPU | polls | p50 / p95 (ms) |
| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |
""" + "\n".join(phase_rows(r) for r in results) + """

Server CPU is the UI process's share of one core over the phase. With the trainer's threads on
every core, anything else that runs takes a core from one of them while OpenMP's other thread
waits for it, so training loses more than the CPU share the server and clients use; with a core
to spare they run beside it.

How the poll got here (2 trainer threads, 20 clients, 2-3 load phases of 10-12 s each,
2026-11-22; differences under about 4 points are within this shared machine's noise):

| what a tick was | server CPU under load | training slowdown |
| --- | ---: | ---: |
| gradio timer event, POST /gradio_api/run/poll, 8 outputs (the design before) | 13-18% | 7-16% |
| the same as a coroutine with pre/postprocessing off (no worker thread woken) | 13-14% | 8.1% |
| ... and gradio's queue polling for work every 20 ms instead of every 1 ms | 9-13% | 12.5% |
| own route, whole chart (30-60 kB) in every answer | 6-8% | 9-12% |
| own route, a trivial answer (robots.txt) at the same rate, for scale | 4-5% | 0.9% |
| ... the same plus 2 /proc/PID/stat reads of the trainer per poll | 5% | 7.3% |
| own route, no chart at all, for scale | 4-5% | 5.9% |
| own route, new points only, liveness remembered for 1 s, every tab once a second | 5% | 3.1-7.7% |

Rows above: every tab polled once a second on a new connection. Now: one kept-alive connection
per tab, and all tabs together at most 10 polls a second (the table at the top).

Three things mattered, and then the number of polls. A gradio event costs 3-4 ms of server CPU however little the handler does
(routing, session state, a schema per update, the handler and every output postprocessed on
worker threads); the live view's own route costs about 0.5 ms. Each status read checked the
trainer's pid through /proc/PID/stat, for which the kernel sums the CPU time of every trainer
thread: two such reads per poll cost the run 6 points on their own; the answer is now reused for
a second. And the whole chart, re-sent every second to every tab and parsed there, cost another
3-6 points: a tab that holds the chart now gets only the points added since its last answer (a
few hundred bytes). What was left is the poll itself, about 0.5 ms of server CPU and as much in
the client, which the trainer pays 2-3 times over: 20 polls a second still cost 3-8% (5 paired
phases: 17, 2.9, 7, -0.4 and 11%), so the server now spreads a budget of 10 polls a second over
the open tabs, and the UI costs the same with 20 tabs or 100. Separately, gradio's queue looked for work every millisecond when idle, 5.8% of a
core on a server nobody used (now 1.5%; a queued click waits up to 20 ms more).

Earlier fixes, on 2026-11-22 too (1 trainer thread, the tick then through the queue): 14.7%
slowdown and a p95 of 1,945 ms before; the chart was a validating plotly Figure rebuilt per tab per
tick (22-28 ms, now plain JSON built once per version), gradio rebuilt a pandas summary of every
event for its monitoring page after each event (about 15 ms, now never), and each tab rebuilt the
chart from all rows (O(steps) a tick, now one curve per run extended by the new rows).
Re-run: `python bench/ui_load.py` (rewrites this section only).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20, help="browser-like clients polling in a load phase (1-100)")
    p.add_argument("--phase-s", type=float, default=10.0, help="seconds a phase (2-120)")
    p.add_argument("--rounds", type=int, default=5, help="idle/load pairs (1-20); one more idle phase ends it")
    p.add_argument("--threads", default="1,2", help="torch threads of the trainer (OMP_NUM_THREADS); "
                   "a comma-separated list measures each in turn")
    p.add_argument("--warmup-steps", type=int, default=15, help="steps trained before the first phase")
    p.add_argument("--history", type=int, default=50, help="finished runs already in the runs folder (0-500)")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the section of docs/benchmarks.md")
    a = p.parse_args(argv)
    if not (1 <= a.clients <= 100 and 2 <= a.phase_s <= 120 and 1 <= a.rounds <= 20
            and 0 <= a.history <= 500):
        p.error("bounded on purpose: --clients 1-100, --phase-s 2-120, --rounds 1-20, "
                "--history 0-500")
    results = []
    for threads in [int(t) for t in str(a.threads).split(",")]:
        print(f"--- trainer with {threads} torch thread(s)", flush=True)
        results.append(measure(argparse.Namespace(**{**vars(a), "threads": threads})))
    section = markdown(results)
    print("\n" + section)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if not a.no_docs:
        write_section("UI under load", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
