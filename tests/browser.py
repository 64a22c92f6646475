"""Browser-test support: one studio server and one Chromium page for the whole test session.

`server` starts `python app.py` on a free 127.0.0.1 port with a temporary runs folder and stops it
at the end; every tests/test_ui_browser*.py file shares it (one start-up, not one per file), so a
file must not assume it is the only one that made runs there. A test leaves no run behind it:
after each test that uses the server, what is still queued leaves the queue and what still trains
is killed (`no_run_left_behind`), so a failed walk cannot make the next file queue behind its run.
Screenshots go to test-artifacts/ (not committed).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def free_port_number() -> int:
    """A free TCP port on 127.0.0.1, where test servers bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(proc, port, log_path, timeout=180) -> bool:
    """True once the server answers on `port` and has passed gradio's own start-up check
    (studio.ui.app.serving_line, printed after gradio's launch returns)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        # the studio says where it serves once gradio's launch (and its check of itself) returned
        if f"serving on http://127.0.0.1:{port} " in log_path.read_text():
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return True
        time.sleep(0.5)
    raise RuntimeError(f"server did not start within {timeout} s: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory, free_port):
    runs = tmp_path_factory.mktemp("runs")
    log_path = runs.parent / "server.log"
    log = open(log_path, "w")
    # tiny-llama, not the studio's opening SmolLM2: its first use converts a GGUF (tens of seconds)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STUDIO_UI_MODEL": "tiny-llama"}
    # gradio's launch asks its own page for a response within 3 s and exits when none comes; on a
    # machine this busy that can miss, so a server that exits that way is started again.
    for attempt in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(runs)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if serving(proc, port, log_path):
            break
        if "localhost is not accessible" not in log_path.read_text() or attempt == 2:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
    yield f"http://127.0.0.1:{port}", runs
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def stop_every_run(root: Path, timeout: float = 60) -> None:
    """Empty the queue of `root` and kill its training runs."""
    from studio.runs import manager, queue

    active = [r["id"] for r in manager.list_runs(root) if r["state"] in manager.ACTIVE_STATES]
    for run_id in active:
        queue.stop(root / run_id, kill=True)
    wait_until(lambda: not any(r["state"] in manager.ACTIVE_STATES for r in manager.list_runs(root)), timeout)


@pytest.fixture(autouse=True)
def no_run_left_behind(request):
    yield
    if "server" in request.fixturenames:
        _, root = request.getfixturevalue("server")
        stop_every_run(root)


@pytest.fixture(scope="session")
def page(server):
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def points(page) -> int:
    return page.locator("#loss-plot .js-plotly-plot").evaluate(
        "d => (d.data || []).filter(t => t.name === 'train loss').map(t => t.x.length).concat([0])[0]")


def wait_until(predicate, timeout=120, step=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


def trainable(page) -> int:
    return int(page.locator("#param-count .pc-trainable").get_attribute("data-trainable"))


def pick(page, dropdown_id, text):
    page.locator(f"#{dropdown_id} input").click()
    page.locator("li[role=option]", has_text=text).first.click()
