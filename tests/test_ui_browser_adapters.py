"""Several adapters in a real browser: a combination made on the Adapters tab, the Playground side by
side with three adapters (two runs and their combination) streaming in every column, and the chat.

Shares the session's server (tests/browser.py); its runs folder may already hold other runs, so
this file makes its own two short tiny-llama runs there and finds them by id.
"""

import contextlib
import io

import pytest
from browser import pick, shot, wait_until

pytestmark = pytest.mark.browser

COLUMNS = ("base", "tuned", "extra-1", "extra-2")


def _train(runs, run_id: str, seed: int):
    from studio.config import RunConfig
    from studio.runs import trainer
    from studio.runs.manager import create_run

    cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"}, "data": {"format": "alpaca"},
                               "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                               "train": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                                         "eval_steps": 100, "save_steps": 100, "seed": seed}})
    run = create_run(cfg, runs, run_id=run_id)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert trainer.train(run, False, trainer.Reporter(run, True)) == "completed"
    return run


@pytest.fixture(scope="module")
def two_runs(server):
    _, runs = server
    return _train(runs, "adapters-a", 1).name, _train(runs, "adapters-b", 2).name


def test_combine_on_the_adapters_tab_then_it_is_in_the_library(server, page, two_runs):
    url, runs = server
    a, b = two_runs
    page.goto(url)
    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    wait_until(lambda: a in table.inner_text() and b in table.inner_text(), timeout=60)
    pick(page, "adapters-pick", a)
    pick(page, "adapters-pick", b)
    methods = page.locator("#adapters-methods")
    wait_until(lambda: "linear can combine" in methods.inner_text(), timeout=30)
    assert "cat" in methods.inner_text() and page.locator("#adapters-combine").is_enabled()
    page.locator("#adapters-name textarea, #adapters-name input").first.fill("mix-ab")
    page.locator("#adapters-combine").click()
    wait_until(lambda: "combined" in page.locator("#adapters-combine-message").inner_text(), timeout=120)
    wait_until(lambda: "mix-ab" in table.inner_text(), timeout=30)
    assert "combined" in table.inner_text()  # its origin: the only combination in this runs folder
    assert (runs / "adapters" / "mix-ab" / "adapter_model.safetensors").is_file()
    shot(page, "adapters")


def test_playground_side_by_side_with_three_adapters_streams_every_column(server, page, two_runs):
    url, _ = server
    a, b = two_runs
    page.goto(url)
    page.get_by_role("tab", name="Playground").click()
    # the newest completed run is preselected (the main browser test's run is a stopped one)
    wait_until(lambda: page.locator("#playground-run input").input_value() == b, timeout=60)
    pick(page, "playground-adapters", a)
    pick(page, "playground-adapters", "mix-ab")
    wait_until(lambda: page.locator("#playground-extra-2").is_visible(), timeout=30)
    assert f"Base + {a}" in page.locator("#playground-extra-1").inner_text()
    tokens = page.locator("#playground-max-new-tokens input[type=number]")
    tokens.fill("200")
    tokens.press("Enter")
    page.locator("#playground-prompt textarea").fill("Name three rivers.")
    # record every length each column shows while it streams
    page.evaluate("""cols => { window.__seen = {}; for (const c of cols) window.__seen[c] = [];
        window.__timer = setInterval(() => { for (const c of cols) {
            const t = document.querySelector(`#playground-${c} textarea`);
            const n = t ? t.value.length : 0; const s = window.__seen[c];
            if (n && s[s.length - 1] !== n) s.push(n); } }, 15); }""", list(COLUMNS))
    page.locator("#playground-generate").click()
    wait_until(lambda: all(page.locator(f"#playground-{c} textarea").input_value() for c in COLUMNS), timeout=180)
    lengths = lambda: page.evaluate("() => JSON.stringify(Object.values(window.__seen).map(s => s.length))")

    def settled():  # no column changed for a second: the stream has ended
        before = lengths()
        page.wait_for_timeout(1000)
        return lengths() == before

    wait_until(settled, timeout=180)
    seen = page.evaluate("() => { clearInterval(window.__timer); return window.__seen; }")
    for c in COLUMNS:
        assert len(seen[c]) >= 2, (c, seen[c])  # it grew in the page, not in one piece
    texts = {c: page.locator(f"#playground-{c} textarea").input_value() for c in COLUMNS}
    assert len(set(texts.values())) > 1
    shot(page, "playground-adapters")


def test_playground_chat_two_turns_each_column_its_own_history_then_clear(server, page, two_runs):
    page.get_by_role("tab", name="Chat").click()
    page.locator("#playground-system textarea").fill("Answer briefly.")
    tokens = page.locator("#playground-max-new-tokens input[type=number]")
    tokens.fill("24")
    tokens.press("Enter")
    box = page.locator("#playground-chat-input textarea")
    rows = lambda c: page.locator(f"#playground-chat-{c} .message-row")
    for turn, text in enumerate(("Hello there", "And then?"), start=1):
        box.fill(text)
        page.locator("#playground-send").click()
        wait_until(lambda n=2 * turn: all(rows(c).count() == n for c in COLUMNS), timeout=180)
        wait_until(lambda n=2 * turn: all(rows(c).nth(n - 1).inner_text().strip() for c in COLUMNS), timeout=180)
    assert box.input_value() == ""
    for c in COLUMNS:
        assert "Hello there" in rows(c).nth(0).inner_text() and "And then?" in rows(c).nth(2).inner_text()
    shot(page, "playground-chat")
    page.locator("#playground-clear").click()
    wait_until(lambda: all(rows(c).count() == 0 for c in COLUMNS), timeout=30)
