"""The first hour in a real browser: choices that survive a reload, one message where the user looks,
and the next step offered when a run completes.

Shares the server and page of tests/browser.py; the runs folder may hold other files' runs, so the
runs these tests need are made here (tiny-llama, few steps) and found by their ids.
"""

import json

import pytest
from browser import points, shot, wait_until

pytestmark = pytest.mark.browser


def _open(page, url):
    try:
        page.goto(url)
    except Exception:  # a navigation the page's own last requests cut short (net::ERR_ABORTED): once more
        page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    wait_until(lambda: page.locator("#param-count .pc-trainable").count(), timeout=60)


def _info(page) -> str:
    return page.locator("#data-info").inner_text().replace("*", "")


def _tab(page, name):
    page.get_by_role("tab", name=name, exact=True).click()


def test_a_bad_model_path_is_one_message_next_to_load_and_the_tree_stays_with_the_box(server, page, tmp_path):
    url, _ = server
    _open(page, url)
    summary = page.locator("#model-summary").inner_text()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    box = page.locator("#model-select input")
    for ref, needle in ((str(weights), "is a file, not a model folder"), (str(tmp_path / "nope"), "does not exist")):
        box.fill(ref)
        box.press("Enter")
        page.locator("#model-load").click()
        wait_until(lambda n=needle: n in page.locator("#model-message").inner_text(), timeout=60)
        message = page.locator("#model-message").inner_text()
        assert ref in message and "Still showing tiny-llama" in message
        # the box, the tree and the summary describe one model, the one shown, with no error badges
        wait_until(lambda: box.input_value().split()[0] == "tiny-llama", timeout=30)  # its label: "tiny-llama  ·  built-in"
        assert page.locator("#model-summary").inner_text() == summary
        assert page.locator("#module-tree input[data-key='lm_head']").count() == 1
        assert page.get_by_text("Error", exact=True).count() == 0
    shot(page, "first-hour-bad-model")
    page.locator("#model-load").click()  # the model shown loads again; the message goes
    wait_until(lambda: page.locator("#model-message").inner_text().strip() == "", timeout=60)


def test_an_upload_survives_a_reload_is_kept_once_and_a_typed_path_stays(server, page, tmp_path):
    url, runs = server
    rows = [{"instruction": f"Say {w} twice.", "output": f"{w} {w}"} for w in ("red", "blue", "green", "gold")] * 3
    upload = tmp_path / "first-hour-notes.jsonl"
    upload.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _open(page, url)
    _tab(page, "Data")
    page.locator("#dataset-upload").locator("xpath=..").locator("input[type=file]").set_input_files(str(upload))
    wait_until(lambda: "12 examples" in _info(page) and "format alpaca" in _info(page), timeout=60)
    kept = runs / "uploads" / upload.name
    assert kept.is_file()

    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    _tab(page, "Data")
    page.locator("#dataset-select input").click()
    wait_until(lambda: page.locator("li[role=option]", has_text=upload.name).count(), timeout=30)
    page.locator("li[role=option]", has_text=upload.name).first.click()
    wait_until(lambda: "12 examples" in _info(page), timeout=60)
    # the same file again: the copy kept before is selected, nothing is added
    page.locator("#dataset-upload").locator("xpath=..").locator("input[type=file]").set_input_files(str(upload))
    wait_until(lambda: page.get_by_text("was uploaded before (same content)").count(), timeout=60)
    assert sorted(p.name for p in (runs / "uploads").iterdir() if p.name.startswith("first-hour-notes")) == [
        upload.name]

    # a typed path stays in the box and is loaded; one that is not there is refused beside it
    typed = tmp_path / "typed.jsonl"
    typed.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))
    box = page.locator("#dataset-select input")
    box.fill(str(typed))
    box.press("Enter")
    wait_until(lambda: "5 examples" in _info(page) and "format text" in _info(page), timeout=60)
    assert box.input_value() == str(typed)
    box.fill(str(tmp_path / "missing.jsonl"))
    box.press("Enter")
    wait_until(lambda: "no such file or folder" in _info(page), timeout=60)
    assert box.input_value() == str(tmp_path / "missing.jsonl")
    shot(page, "first-hour-typed-path")
    # back to the upload for the tests that follow
    box.fill(str(kept))
    box.press("Enter")
    wait_until(lambda: "12 examples" in _info(page), timeout=60)


def _number(page, elem_id):
    return page.locator(f"#{elem_id} input")


def _set_number(page, elem_id, value):
    box = _number(page, elem_id)
    box.fill(str(value))
    box.press("Tab")


def test_a_completed_run_offers_next_steps_a_reload_mid_run_fills_the_form_and_export_picks_the_completed_run(
        server, page):
    url, runs = server
    from studio.runs.manager import list_runs

    _open(page, url)  # it follows the newest run of the shared folder, which another file may have made
    # a short run, completed while the page watches: the note and its buttons, for this run
    _tab(page, "Train")
    _set_number(page, "train-max-steps", 12)
    wait_until(lambda: page.locator("#train-start").is_enabled(), timeout=60)
    before = {r["id"] for r in list_runs(runs)}
    page.locator("#train-start").click()
    done = wait_until(lambda: next((r["id"] for r in list_runs(runs) if r["id"] not in before), None), timeout=60)
    note = page.locator("#run-next-note .next-note")
    try:  # a loaded machine: the run's start-up alone can take minutes
        wait_until(lambda: note.count() and note.get_attribute("data-run") == done and "completed" in note.inner_text(),
                   timeout=600)
    except AssertionError:
        raise AssertionError(f"no note for {done}; run status: {page.locator('#run-status').inner_text()}") from None
    assert "completed" in page.locator("#run-status").inner_text() and done in page.locator("#run-status").inner_text()
    shot(page, "first-hour-next-steps")
    page.locator("#next-export").click()
    wait_until(lambda: page.locator("#export-run input").input_value() == done, timeout=60)
    wait_until(lambda: page.locator("#export-gguf").is_visible(), timeout=30)  # the GGUF format, picked with it
    assert not page.locator("#export-empty").is_visible()
    _tab(page, "Train")
    page.locator("#next-evaluate").click()
    wait_until(lambda: page.locator("#eval-run input").input_value() == done, timeout=60)

    # a long run with settings of its own; the page reloaded while it trains shows them in the form
    _tab(page, "Train")
    _set_number(page, "train-max-steps", 3000)
    _set_number(page, "train-seed", 7)
    page.locator("#train-start").click()
    wait_until(lambda: points(page) >= 2 and "running" in page.locator("#run-status").inner_text(), timeout=600)
    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    _tab(page, "Train")
    wait_until(lambda: _number(page, "train-max-steps").input_value() == "3000", timeout=60)
    assert _number(page, "train-seed").input_value() == "7"
    long_run = page.locator("#train-form-note b").inner_text()
    assert long_run != done and (runs / long_run / "config.yaml").is_file()
    assert page.locator("#train-from-run").is_enabled()
    shot(page, "first-hour-reload-mid-run")
    page.locator("#train-stop").click()
    wait_until(lambda: "stopped" in page.locator("#run-status").inner_text(), timeout=300)
    wait_until(lambda: (runs / long_run / "adapter" / "adapter_config.json").is_file(), timeout=60)

    # the newest run is the stopped one; Export and Analysis preselect the newest completed one
    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    _tab(page, "Export")
    wait_until(lambda: page.locator("#export-run input").input_value() == done, timeout=60)
    assert not page.locator("#export-empty").is_visible()
    _tab(page, "Analysis")
    wait_until(lambda: page.locator("#analysis-run-a input").input_value() == done, timeout=60)
    assert page.locator("#analysis-run-b input").input_value() == done
