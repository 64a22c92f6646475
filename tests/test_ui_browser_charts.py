"""The Train tab's loss chart in a real browser: the smoothed line the page draws is the debiased
moving average of the raw points it holds, also after points were appended and the smoothing was
moved; the learning-rate axis stays at or above 0; the best evaluation's step is marked.

Shares the session's server (tests/browser.py); makes its own run through the CLI."""

import os
import subprocess
import sys

import pytest
import yaml
from browser import ROOT, points, wait_until

pytestmark = pytest.mark.browser

TRACES = "d => d.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y), visible: t.visible, meta: t.meta}))"


def _debiased(values, smoothing, ref):
    if smoothing <= 0:
        return list(values)
    w = min(smoothing, 0.999) ** (ref / len(values))
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = w * acc + (1 - w) * v
        out.append(acc / (1 - w ** t))
    return out


def _check_smoothed(page, smoothing):
    from studio.ui.widgets.charts import SMOOTHING_REF_POINTS

    traces = page.locator("#loss-plot .js-plotly-plot").evaluate(TRACES)
    raw = next(t for t in traces if t["name"] == "train loss")
    sm = next(t for t in traces if t["name"] == "train loss (smoothed)")
    assert sm["meta"] == {"smooth_of": 0} and sm["x"] == raw["x"]
    assert sm["y"] == pytest.approx(_debiased(raw["y"], smoothing, SMOOTHING_REF_POINTS), rel=1e-9, abs=1e-12)
    assert sm["visible"] is (smoothing > 0)
    return len(raw["x"])


def _set_smoothing(page, value):
    page.locator("#loss-smoothing").evaluate(
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def test_smoothed_line_is_the_debiased_average_of_the_raw_points(server, page, tmp_path):
    from studio import runs

    url, root = server
    cfg = yaml.safe_load((ROOT / "examples" / "tiny-llama.yaml").read_text())
    cfg["train"].update(max_steps=24, eval_steps=6, save_steps=24, logging_steps=1)
    cfg["lora"]["target_modules"] = ["q_proj", "v_proj"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # one thread: on a shared machine several OpenMP threads per process slow every step to a crawl
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUDIO_SLOW_STEP_S": "0.2"}  # the page appends points as they come
    out = subprocess.run([sys.executable, "-m", "studio", "train", str(path), "--runs-dir", str(root), "--detach"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    run_dir = out.stdout.strip().splitlines()[-1]

    try:
        _follow(page, url, run_dir)
    finally:  # a failed wait leaves no trainer behind
        runs.stop_run(run_dir, kill=True)


def _follow(page, url, run_dir):
    from studio import runs

    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: points(page) >= 5, timeout=180)
    assert page.locator("#loss-smoothing").input_value() == "0.6"
    first = _check_smoothed(page, 0.6)
    wait_until(lambda: points(page) >= first + 3, timeout=300)  # appended by the page, not redrawn whole
    _check_smoothed(page, 0.6)
    _set_smoothing(page, 0.9)
    _check_smoothed(page, 0.9)
    _set_smoothing(page, 0)
    _check_smoothed(page, 0)
    assert page.locator("#loss-smoothing").evaluate("el => el.parentElement.textContent").endswith("off")
    _set_smoothing(page, 0.95)

    wait_until(lambda: runs.read_status(run_dir)["state"] == "completed", timeout=900)
    wait_until(lambda: "completed" in page.locator("#run-status").inner_text(), timeout=60)
    wait_until(lambda: points(page) == 24, timeout=60)
    _check_smoothed(page, 0.95)
    # the learning rate (cosine, ends at 0) is drawn on an axis that does not go below 0
    lo = page.locator("#loss-plot .js-plotly-plot").evaluate("d => d._fullLayout.yaxis2.range[0]")
    ticks = page.locator("#loss-plot .js-plotly-plot").evaluate(
        "d => Array.from(d.querySelectorAll('.y2tick text')).map(t => t.textContent)")
    assert lo >= 0 and ticks and not any(t.startswith(("-", "−")) for t in ticks), ticks
    # the best evaluation's step is marked with a labelled line
    best = runs.read_status(run_dir)["best_step"]
    marks = page.locator("#loss-plot .js-plotly-plot").evaluate(
        "d => ({shapes: (d.layout.shapes || []).map(s => s.x0), labels: (d.layout.annotations || []).map(a => a.text)})")
    assert marks["shapes"] == [best] and marks["labels"][0].startswith("best eval_loss") and f"step {best}" in marks["labels"][0]
    # the smoothing chosen survives a reload
    page.reload()
    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: points(page) >= 24, timeout=60)
    assert page.locator("#loss-smoothing").input_value() == "0.95"
    _check_smoothed(page, 0.95)


def test_server_log_has_no_share_link_hint_and_no_event_loop_noise(server, page):
    url, root = server
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    log = (root.parent / "server.log").read_text()
    assert "serving on http://127.0.0.1:" in log
    assert "public link" not in log and "share=True" not in log
    assert "_UnixSelectorEventLoop" not in log and "Exception ignored" not in log, log[-3000:]
