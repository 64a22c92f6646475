"""The training-memory estimate, live in the Model tab, and a QLoRA run (4-bit base, gradient
checkpointing) started from the Train tab, trained on this CPU and merged into the fp32 base from
the Export tab, all in a real browser (system Chromium through playwright; tests/browser.py)."""

import json

import pytest
from browser import shot, wait_until

pytestmark = pytest.mark.browser


def shown_bytes(page) -> int:
    return int(page.locator("#memory-total .mem-total").get_attribute("data-bytes"))


def engine_bytes(**run) -> int:
    """What the panel should show for tiny-llama's default selection with the run's settings `run`
    (FORM names), each followed into the panel as the page does (memory_panel.follow)."""
    from studio.ui.tabs import memory_panel
    from studio.ui.tabs import model as model_tab
    from studio.ui.tabs import train as train_tab

    form = train_tab.form_for("tiny-llama", **run)
    panel = {"model.mem_gpu": 24}
    for name in memory_panel.FOLLOWS:
        panel.update(memory_panel.follow(name, form[name]))
    out = model_tab.recount({**{k: form[k] for k in model_tab.LORA_FORM}, **panel})
    return int(out["model.memory_total"].split("data-bytes='")[1].split("'")[0])


def test_the_estimate_follows_the_run_and_a_4bit_checkpointed_run_trains_and_merges(server, page):
    url, runs = server
    before = {p.name for p in runs.iterdir()}
    page.goto(url)
    page.wait_for_selector("#module-tree input[data-leaf]")
    wait_until(lambda: page.locator("#memory-total .mem-total").count(), timeout=60)

    # the estimate as the engine computes it, a stacked bar of its four parts, a fits-on row of seven GPUs
    assert shown_bytes(page) == engine_bytes()
    wait_until(lambda: page.locator("#memory-chart .barlayer .trace").count() == 4, timeout=30)
    assert page.locator("#memory-fits .mem-gpu").count() == 7
    assert page.locator("#memory-fits .mem-gpu[data-fits='true']").count() == 7  # tiny-llama fits on 8 GB
    assert int(page.locator("#memory-fits .mem-largest").get_attribute("data-batch")) > 1
    shot(page, "memory-estimate")

    # live: a longer sequence in the panel grows the activations and so the total
    seq = page.locator("#memory-seq input[type=number]")
    start_bytes = shown_bytes(page)
    seq.fill("4096")
    seq.press("Enter")
    wait_until(lambda: shown_bytes(page) > start_bytes, timeout=30)
    grown = shown_bytes(page)

    # the run's switches on the Train tab: 4-bit base, gradient checkpointing
    page.get_by_role("tab", name="Train").click()
    steps = page.get_by_label("max_steps")
    steps.fill("4")
    steps.press("Tab")
    page.locator("#train-quantization label", has_text="4bit").click()
    page.locator("#train-checkpointing input[type=checkbox]").check()

    # ... which the Model tab's estimate follows: 4bit and checkpointing ticked there too, less memory
    page.get_by_role("tab", name="Model").click()
    wait_until(lambda: page.locator("#memory-quant input[value='4bit']").is_checked(), timeout=30)
    wait_until(lambda: page.locator("#memory-checkpointing input[type=checkbox]").is_checked(), timeout=30)
    wait_until(lambda: shown_bytes(page) < grown, timeout=30)
    # the Train tab's micro-batch and max_length moved the panel back to the run's own sizes
    page.get_by_role("tab", name="Data").click()
    length = page.get_by_role("spinbutton", name="number input for max_length")
    length.fill("64")
    length.press("Tab")
    page.get_by_role("tab", name="Model").click()
    want = engine_bytes(max_steps=4, quantization="4bit", gradient_checkpointing=True, max_length=64)
    wait_until(lambda: shown_bytes(page) == want, timeout=30)
    shot(page, "memory-estimate-qlora")

    page.get_by_role("tab", name="Train").click()
    wait_until(lambda: page.locator("#train-start").is_enabled(), timeout=60)
    page.locator("#train-start").click()
    wait_until(lambda: "completed" in page.locator("#run-status").inner_text(), timeout=300)
    (run,) = [p for p in runs.iterdir() if p.name not in before and (p / "config.yaml").is_file()]
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["quantization"] == "4bit" and cfg["train"]["gradient_checkpointing"] is True
    assert cfg["data"]["max_length"] == 64
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 4
    shot(page, "train-qlora")

    # merged into the full-precision base: the verification passes and every weight is float32
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-run input").click()
    page.locator("li[role=option]", has_text=run.name).first.click()
    wait_until(lambda: page.locator("#merge-btn").is_enabled(), timeout=60)
    page.locator("#merge-btn").click()
    wait_until(lambda: "verification" in page.locator("#merge-report").inner_text(), timeout=180)
    report = page.locator("#merge-report").inner_text()
    assert "✔" in report and "differs from base: True" in report
    from safetensors import safe_open

    files = sorted((run / "merged").glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}
    merged_cfg = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg
