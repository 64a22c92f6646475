"""The whole point-and-click path in a real browser (system Chromium through playwright).

The server and page come from tests/browser.py (shared by every browser test file); this file's
tests run in order on one runs folder: fine-tune, then Playground, Analysis and Evaluate on it.
"""

import zipfile
from pathlib import Path

import pytest
from browser import pick, points, shot, trainable, wait_until

pytestmark = pytest.mark.browser


def test_point_and_click_fine_tune_merge_and_download(server, page):
    from studio import lora
    from studio.config import LoraSettings
    from studio.models.tree import model_tree

    url, runs = server
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    wait_until(lambda: page.locator("#param-count .pc-trainable").count())

    # tick q_proj and v_proj (q and v are the default; untick all, then tick them in the tree)
    ticked = page.locator("#module-tree input[data-leaf]:checked")
    while ticked.count():
        ticked.first.uncheck()
    wait_until(lambda: "No count" in page.locator("#param-count").inner_text())
    page.locator("#module-tree input[data-key$='self_attn.q_proj']").check()
    page.locator("#module-tree input[data-key$='self_attn.v_proj']").check()
    # set r = 4 (and alpha follows the slider's own value)
    r_box = page.locator("#lora-r input[type=number]")
    r_box.fill("4")
    r_box.press("Enter")
    expected = lora.count(model_tree("tiny-llama"), LoraSettings(r=4, target_modules=["q_proj", "v_proj"])).trainable
    wait_until(lambda: trainable(page) == expected, timeout=30)
    # the type checkboxes followed the tree
    checked = page.locator("#target-types input:checked")
    assert checked.count() == 2
    shot(page, "model")

    page.get_by_role("tab", name="Data").click()
    page.wait_for_selector("#dataset-preview table")
    assert "format alpaca" in page.locator("#data-info").inner_text().replace("*", "")
    # the examples as the trainer reads them: the answers (and the EOS) trained, the prompt masked
    page.wait_for_selector("#dataset-tokens .tk-seq")
    tokens = page.locator("#dataset-tokens")
    assert tokens.locator(".tk-on").count() and tokens.locator("[data-trained='0'][data-kind='prompt']").count()
    assert tokens.locator("[data-kind='special'][data-trained='1']").count()  # the EOS that teaches stopping
    assert "### Response:" in "".join(tokens.locator(".tk-seq").first.locator("[data-trained='0']").all_inner_texts())
    shot(page, "data")
    # a chat dataset: the user turns masked, the assistant's answers trained
    pick(page, "dataset-select", "messages, 480 rows")
    wait_until(lambda: tokens.locator("[data-kind='user'][data-trained='0']").count()
          and tokens.locator("[data-kind='assistant'][data-trained='1']").count(), timeout=60)
    assert "format messages" in page.locator("#data-info").inner_text().replace("*", "")
    shot(page, "data-chat")
    pick(page, "dataset-select", "instructions")
    wait_until(lambda: "format alpaca" in page.locator("#data-info").inner_text().replace("*", ""), timeout=60)

    page.get_by_role("tab", name="Train").click()
    steps = page.get_by_label("max_steps")
    steps.fill("400")
    steps.press("Tab")
    page.locator("#train-start").click()
    wait_until(lambda: points(page) >= 3, timeout=180)
    first = points(page)
    wait_until(lambda: points(page) > first + 2, timeout=120)
    assert "running" in page.locator("#run-status").inner_text()
    shot(page, "train")

    # reload: the page re-attaches and shows the whole curve so far, then keeps growing
    before = points(page)
    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: points(page) >= before, timeout=60)
    after = points(page)
    wait_until(lambda: points(page) > after, timeout=120)

    # a second Start while this run trains would queue it behind this one (not clicked here)
    wait_until(lambda: "queues this one" in page.locator("#start-reason").inner_text(), timeout=30)
    assert not page.locator("#train-start").is_disabled()

    page.locator("#train-stop").click()
    wait_until(lambda: "stopped" in page.locator("#run-status").inner_text(), timeout=120)
    run_dir = next(p for p in runs.iterdir() if (p / "config.yaml").is_file())
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    page.get_by_role("tab", name="Runs").click()
    wait_until(lambda: "stopped" in page.locator("#runs-table").inner_text(), timeout=30)
    shot(page, "runs")

    page.get_by_role("tab", name="Export").click()
    wait_until(lambda: page.locator("#download-adapter").is_enabled(), timeout=60)
    page.locator("#merge-btn").click()
    wait_until(lambda: "verification" in page.locator("#merge-report").inner_text(), timeout=180)
    report = page.locator("#merge-report").inner_text()
    assert "✔" in report and "differs from base: True" in report
    assert float(page.locator("#merge-report .mdiff").inner_text()) < 1e-3
    shot(page, "export")

    with page.expect_download() as dl:
        page.locator("#download-adapter").click()
    path = dl.value.path()
    with zipfile.ZipFile(path) as z:
        names = {Path(n).name for n in z.namelist()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names


def test_playground_and_analysis_on_the_trained_run(server, page):
    """Runs after the fine-tune above (same server and runs folder)."""
    url, runs = server
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.get_by_role("tab", name="Playground").click()
    # the run list is filled when the tab opens: generate only once it names the run
    wait_until(lambda: page.locator("#playground-run input").input_value(), timeout=60)
    page.locator("#playground-prompt textarea").fill("What is the capital of Iceland?")
    page.locator("#playground-generate").click()
    wait_until(lambda: page.locator("#playground-tuned textarea").input_value()
          and page.locator("#playground-base textarea").input_value(), timeout=120)
    shot(page, "playground")

    page.get_by_role("tab", name="Analysis").click()
    wait_until(lambda: page.locator("#analysis-run-a input").input_value()
          and page.locator("#analysis-run-b input").input_value(), timeout=60)
    page.locator("#analysis-spectrum").click()
    wait_until(lambda: page.locator("#analysis-spectrum-plot .js-plotly-plot").count(), timeout=120)
    n = page.locator("#analysis-spectrum-plot .js-plotly-plot").evaluate("d => d.data.length")
    assert n == 8  # q_proj and v_proj in 4 layers
    page.locator("#analysis-subspace").click()
    wait_until(lambda: "mean φ(1,1)" in page.locator("#analysis-summary").inner_text(), timeout=120)
    assert "mean φ(1,1) = 1.000" in page.locator("#analysis-summary").inner_text()  # a run with itself
    shot(page, "analysis")


def test_evaluate_the_trained_run_and_see_it_again_after_a_reload(server, page):
    """Runs after the fine-tune above: base vs tuned on the run's held-out split."""
    url, runs = server
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.get_by_role("tab", name="Evaluate").click()
    wait_until(lambda: page.locator("#eval-run input").input_value(), timeout=60)
    limit = page.locator("#eval-limit input")
    limit.fill("4")
    limit.press("Tab")
    page.locator("#eval-start").click()
    wait_until(lambda: page.locator("#eval-table [data-metric='exact_match']").count(), timeout=180)
    for key in ("exact_match", "rouge_l", "loss"):
        assert page.locator(f"#eval-table [data-metric='{key}'] .ev-tuned").inner_text().strip()
    rows = page.locator("#eval-examples tr")
    assert rows.count() == 4 + 1
    assert "saved as eval/heldout.json" in page.locator("#eval-message").inner_text()
    run_dir = next(p for p in runs.iterdir() if (p / "config.yaml").is_file())
    assert (run_dir / "eval" / "heldout.json").is_file()
    shot(page, "evaluate")
    # a new page: picking the run shows the saved result, nothing is computed again
    page.reload()
    page.wait_for_selector("#module-tree input[data-leaf]")
    page.get_by_role("tab", name="Evaluate").click()
    wait_until(lambda: page.locator("#eval-examples tr").count() == 5, timeout=60)
    assert "saved result heldout" in page.locator("#eval-message").inner_text()


def test_start_is_disabled_with_the_cli_reason_for_an_impossible_combination(server, page):
    """minilm-l6 (seq_cls) with the instruction dataset: Start is disabled and says what `studio
    train` says for the same config; no run folder appears. Its own dataset enables Start again."""
    from studio.ui.tabs import data as data_tab
    from studio.ui.tabs import train as train_tab

    url, runs = server
    folders = {p.name for p in runs.iterdir()}
    reason = train_tab.refusal(train_tab.form_for("minilm-l6",
                                                  dataset_select=data_tab.default_dataset("causal_lm")))
    assert reason and "model.task seq_cls needs text + label columns" in reason
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    pick(page, "model-select", "minilm-l6")
    wait_until(lambda: "seq_cls" in page.locator("#model-summary").inner_text(), timeout=60)
    page.get_by_role("tab", name="Data").click()
    wait_until(lambda: "format classification" in page.locator("#data-info").inner_text().replace("*", ""), timeout=60)
    pick(page, "dataset-select", "instructions")
    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: reason in page.locator("#start-reason").inner_text(), timeout=60)
    assert page.locator("#train-start").is_disabled()
    assert page.locator("#start-reason").inner_text().strip() == f"⚠ {reason}"
    shot(page, "train-refused")
    page.get_by_role("tab", name="Data").click()
    pick(page, "dataset-select", "sentiment")
    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: page.locator("#train-start").is_enabled(), timeout=60)
    assert page.locator("#start-reason").inner_text().strip() == ""
    assert {p.name for p in runs.iterdir()} == folders
