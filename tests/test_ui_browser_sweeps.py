"""A sweep queued from the Sweeps tab, the queue in the Runs tab, and the results view, in a real browser.

Shares the session's server and page (tests/browser.py) and its runs folder, where earlier browser
files leave runs of their own: this file looks only at the runs it makes.
"""

import dataclasses
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from browser import ROOT, shot, wait_until

pytestmark = pytest.mark.browser
SWEEP = "ui-sweep"


def _fill(page, elem_id, text):
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.press("Tab")


def _cell(page, run_id, table="runs-table"):
    """The id cell of a run's row (gradio's table draws its cells as elements with data-row and data-col)."""
    cells = page.locator(f"#{table} [data-row][data-col='0']")
    return cells.filter(has_text=re.compile(rf"^\s*{re.escape(run_id)}\s*$")).first


def _row_text(page, run_id, table="runs-table") -> str:
    cell = _cell(page, run_id, table)
    if not cell.count():
        return ""
    return " ".join(page.locator(f"#{table} [data-row='{cell.get_attribute('data-row')}']").all_inner_texts())


def _table_text(page) -> str:
    return page.locator("#runs-table").inner_text()


class Watch:
    """Reads the sweep's run folders every 0.2 s: the most runs that were ever running at once."""

    def __init__(self, root):
        self.root, self.most, self.done = root, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        from studio import runs
        from studio.runs import sweep

        while not self.done.is_set():
            try:
                members = [r["run"] for r in sweep.rows(SWEEP, self.root)]
            except Exception:  # the sweep is not there yet
                members = []
            now = sum(runs.read_status(self.root / m)["state"] in ("running", "stopping") for m in members)
            self.most = max(self.most, now)
            time.sleep(0.2)

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.most


def test_a_sweep_from_the_ui_trains_one_run_at_a_time_across_a_closed_page(server, page):
    from studio import lora, runs
    from studio.models.tree import model_tree
    from studio.runs import sweep
    from studio.ui.tabs import train as train_tab

    url, root = server
    watch = Watch(root)
    # queue it from a page that is then closed: the sweep needs no page open
    first = page.context.browser.new_page(viewport={"width": 1400, "height": 1300})
    first.set_default_timeout(60_000)
    first.goto(url)
    first.wait_for_selector("#module-tree input[data-leaf]")
    first.get_by_role("tab", name="Train").click()
    for label, value in (("max_steps", "6"), ("eval_steps", "3"), ("save_steps", "6")):
        box = first.get_by_label(label)
        box.fill(value)
        box.press("Tab")
    first.get_by_role("tab", name="Sweeps").click()
    _fill(first, "sweep-values-1", "2,4,8")
    _fill(first, "sweep-name", SWEEP)
    base = train_tab.build_config(train_tab.form_for("tiny-llama")).lora
    expected = sum(lora.count(model_tree("tiny-llama"), dataclasses.replace(base, r=r)).trainable for r in (2, 4, 8))
    plan = first.locator("#sweep-plan .sw-plan")
    wait_until(lambda: plan.count() and plan.get_attribute("data-runs") == "3", timeout=60)
    assert plan.get_attribute("data-total") == str(expected)  # the engine's exact count, before queueing
    shot(first, "sweep-plan")
    first.locator("#sweep-start").click()
    wait_until(lambda: "3 runs queued" in first.locator("#sweep-message").inner_text(), timeout=120)
    first.close()

    members = [r["run"] for r in sweep.rows(SWEEP, root)]
    assert len(members) == 3
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.get_by_role("tab", name="Runs").click()
    # the first member trains, the other two wait with their places in the queue
    wait_until(lambda: "queued #2" in _table_text(page), timeout=120)
    # one more run queued from the command line behind the sweep, to be cancelled from the table
    cfg = root.parent / "extra.yaml"
    train_tab.build_config(train_tab.form_for("tiny-llama", max_steps=4)).save(cfg)
    out = subprocess.run([sys.executable, "-m", "studio", "train", str(cfg), "--queue", "--runs-dir", str(root)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "queued at position" in out.stderr, out.stderr
    extra = Path(out.stdout.strip().splitlines()[-1]).name
    wait_until(lambda: extra in _table_text(page), timeout=30)  # the tab's timer refreshes the table
    # the last member moves up one place: clicking its row picks it for the buttons
    _cell(page, members[2]).click()
    wait_until(lambda: page.locator("#runs-pick input").input_value() == members[2], timeout=30)
    wait_until(lambda: f"sweep {SWEEP}" in page.locator("#runs-detail").inner_text(), timeout=30)
    page.locator("#runs-queue-up").click()
    wait_until(lambda: f"{members[2]}: position 1" in page.locator("#runs-message").inner_text(), timeout=30)
    # the extra run leaves the queue before it starts
    _cell(page, extra).click()
    wait_until(lambda: page.locator("#runs-pick input").input_value() == extra, timeout=30)
    page.locator("#runs-queue-cancel").click()
    wait_until(lambda: f"{extra}: removed from the queue" in page.locator("#runs-message").inner_text(), timeout=30)
    wait_until(lambda: "stopped" in _row_text(page, extra), timeout=30)
    # the table fits a 1400 px page: nothing in it scrolls sideways
    overflow = page.locator("#runs-table").evaluate(
        "el => [el, ...el.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1 && "
        "['auto', 'scroll'].includes(getComputedStyle(e).overflowX)).length")
    assert overflow == 0 and page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "runs-queue")

    # the results view refreshes itself while the sweep runs, until all three are completed
    page.get_by_role("tab", name="Sweeps").click()
    wait_until(lambda: page.locator("#sweep-pick input").input_value() == SWEEP, timeout=30)
    wait_until(lambda: "3 of 3 runs completed" in page.locator("#sweep-progress").inner_text(), timeout=900, step=2)
    assert watch.stop() == 1  # never two trainers at once
    spans = sorted((runs.read_json(root / m / runs.STATUS)["started_at"],
                    runs.read_json(root / m / runs.STATUS)["finished_at"]) for m in members)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one after another
    assert runs.read_status(root / extra)["state"] == "stopped" and not (root / extra / runs.LOG).exists()
    wait_until(lambda: page.locator("#sweep-table [data-row][data-col='0']").count() == 3, timeout=30)
    assert all("completed" in _row_text(page, m, "sweep-table") for m in ("2", "4", "8"))  # lora.r, the first column
    chart = page.locator("#sweep-chart .js-plotly-plot")
    wait_until(lambda: chart.count() and chart.evaluate("d => d.data[0].x.length") == 3, timeout=30)
    assert chart.evaluate("d => d.layout.xaxis.type") == "log"
    labels = chart.evaluate("d => d.data[0].text")
    assert sorted(labels) == ["r=2", "r=4", "r=8"]
    shot(page, "sweep-results")

    # compare: the members' curves overlaid, then two of them in the Analysis tab's similarity
    page.locator("#sweep-compare").click()
    curves = page.locator("#sweep-curves .js-plotly-plot")
    wait_until(lambda: curves.count() and curves.evaluate("d => d.data.length") >= 6, timeout=60)
    names = " ".join(curves.evaluate("d => d.data.map(t => t.name)"))
    assert all(m in names for m in members)
    wait_until(lambda: page.locator("#sweep-run-b input").input_value(), timeout=30)
    a, b = page.locator("#sweep-run-a input").input_value(), page.locator("#sweep-run-b input").input_value()
    assert a != b and {a, b} <= set(members)
    page.locator("#sweep-similarity").click()
    wait_until(lambda: "mean φ(1,1)" in page.locator("#analysis-summary").inner_text(), timeout=120)
    assert page.get_by_role("tab", name="Analysis").get_attribute("aria-selected") == "true"
    assert page.locator("#analysis-run-a input").input_value() == a
    assert page.locator("#analysis-run-b input").input_value() == b
    assert page.locator("#analysis-heatmap .js-plotly-plot").count()
    shot(page, "sweep-similarity")
