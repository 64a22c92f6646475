"""The newcomer's whole path, walked in a real browser on the studio's real default model.

What `make run` gives a person, with nothing prepared: a fresh model cache (so the one-time
SmolLM2 conversion is part of the walk), the studio's opening model, a chat dataset of their own
uploaded in the Data tab, Start with the starter settings, a page reload while it trains, the
completed run's next steps, a bfloat16 merge, a GGUF export and a two-turn chat in the Playground.
At each step it checks what issue-17-style surprises would break (the form after a reload, stale
token statistics, a verification that cries wolf, error toasts, tracebacks in the server log) and
records how long the step took and the machine's load; screenshots go to test-artifacts/walk/.

    .venv/bin/python bench/walk_first_hour.py [--steps N] [--keep DIR]

Minutes on a 2-core CPU (the conversion, about 4 of training at the starter's 24 steps, the merge,
the export); not part of `make test`. Prints one JSON line; exits 1 on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from browser import CHROMIUM, free_port_number, points, serving, wait_until  # noqa: E402

SHOTS = ROOT / "test-artifacts" / "walk"
DATASET = ROOT / "studio" / "assets" / "datasets" / "profile-json.jsonl"


class Walk:
    def __init__(self, page, log: Path):
        self.page, self.log, self.phases, self.t0 = page, log, [], time.time()

    def phase(self, name: str, started: float, **facts):
        self.phases.append({"phase": name, "seconds": round(time.time() - started, 1),
                            "load": round(os.getloadavg()[0], 1), **facts})
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{len(self.phases):02d}-{name}.png"), full_page=True)
        print(json.dumps(self.phases[-1]), flush=True)

    def check(self, ok: bool, what: str):
        if not ok:
            SHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SHOTS / "failed.png"), full_page=True)
            raise SystemExit(f"walk failed: {what}")

    def no_error_toasts(self, where: str):
        self.check(self.page.get_by_text("Error", exact=True).count() == 0, f"an error toast on {where}")

    def tab(self, name: str):
        self.page.get_by_role("tab", name=name, exact=True).click()


def walk(url: str, runs: Path, steps: int) -> dict:
    from playwright.sync_api import sync_playwright

    from studio.models.registry import load_tokenizer

    upload = runs.parent / "my-profile-chats.jsonl"
    shutil.copyfile(DATASET, upload)  # the person's own file, uploaded (a copy of the shipped chats)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
        page.set_default_timeout(120_000)
        w = Walk(page, runs.parent / "server.log")

        # 1. the page opens on the real chat model, its tree and live count
        t = time.time()
        page.goto(url)
        page.wait_for_selector("#module-tree input[data-leaf]", timeout=600_000)
        wait_until(lambda: page.locator("#param-count .pc-trainable").count(), timeout=120)
        summary = page.locator("#model-summary").inner_text()
        w.check("smollm2" in page.locator("#model-select input").input_value().lower(), "opens on SmolLM2")
        trainable = int(page.locator("#param-count .pc-trainable").get_attribute("data-trainable"))
        w.phase("open", t, trainable=trainable, summary=summary.splitlines()[0] if summary else "")

        # 2. the person's chat file, uploaded; its token statistics come from SmolLM2's tokenizer
        t = time.time()
        w.tab("Data")
        page.locator("#dataset-upload").locator("xpath=..").locator("input[type=file]").set_input_files(str(upload))
        info = lambda: page.locator("#data-info").inner_text().replace("*", "")
        # the starter dataset is profile-json too (480 examples): wait for the upload to be the one picked
        wait_until(lambda: (runs / "uploads" / upload.name).is_file()
                   and upload.name in page.locator("#dataset-select input").input_value(), timeout=120)
        wait_until(lambda: "480 examples" in info() and "format messages" in info(), timeout=120)
        page.wait_for_selector("#dataset-tokens .tk-seq")
        w.check(page.locator("#dataset-tokens [data-kind='assistant'][data-trained='1']").count() > 0,
                "assistant turns are trained")
        w.no_error_toasts("Data")
        tok = load_tokenizer("smollm2-135m-instruct")
        rows = [json.loads(line) for line in upload.read_text().splitlines()]
        lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False).input_ids)
                   for r in rows]
        mean = sum(lengths) / len(lengths)
        shown = info()
        w.check("smollm2-135m-instruct's tokenizer" in shown, f"token statistics name SmolLM2's tokenizer: {shown}")
        ui_mean = float(shown.split(", mean ")[1].split(",")[0])
        w.check(abs(ui_mean - mean) <= 0.1 * mean, f"token mean {ui_mean} shown vs {mean:.1f} from the tokenizer")
        w.phase("upload", t, info=shown.splitlines()[:2])

        # 3. Start with the starter settings (fewer steps when asked); a reload while it trains
        t = time.time()
        w.tab("Train")
        box = page.locator("#train-max-steps input")
        starter_steps = int(box.input_value())
        if steps and steps != starter_steps:
            box.fill(str(steps))
            box.press("Tab")
        wait_until(lambda: page.locator("#train-start").is_enabled(), timeout=120)
        page.locator("#train-start").click()
        wait_until(lambda: points(page) >= 2, timeout=900, step=2)
        w.phase("train-first-points", t)
        page.reload()
        page.wait_for_selector("#module-tree input[data-leaf]", timeout=300_000)
        w.tab("Train")
        run = wait_until(lambda: page.locator("#train-form-note b").count()
                         and page.locator("#train-form-note b").inner_text(), timeout=120)
        cfg = yaml.safe_load((runs / run / "config.yaml").read_text())
        wait_until(lambda: page.locator("#train-max-steps input").input_value() == str(cfg["train"]["max_steps"]),
                   timeout=60)
        w.check(cfg["data"]["path"].endswith(upload.name), f"the run trains on the upload ({cfg['data']['path']})")
        w.tab("Data")  # a tab's widgets are drawn when it is first opened
        shown_data = page.locator("#dataset-select input").input_value()
        w.check(upload.name in shown_data, f"after the reload the dataset box shows the run's dataset, not {shown_data}")
        w.tab("Train")
        w.no_error_toasts("Train after a reload")
        w.phase("reload-mid-run", t, run=run)
        note = page.locator("#run-next-note .next-note")
        wait_until(lambda: note.count() and note.get_attribute("data-run") == run and "completed" in note.inner_text(),
                   timeout=1800, step=3)
        status = json.loads((runs / run / "status.json").read_text())
        w.phase("train-completed", t, steps=status.get("step"), final_loss=status.get("last_loss"),
                eval_loss=status.get("eval_loss"), peak_rss_mb=status.get("peak_rss_mb"))

        # 4. Merge it, in bfloat16: the verification judges it at that precision
        t = time.time()
        page.locator("#next-merge").click()
        wait_until(lambda: page.locator("#export-run input").input_value() == run, timeout=60)
        page.locator("#merge-dtype label", has_text="bfloat16").click()
        page.locator("#merge-btn").click()
        report = page.locator("#merge-report")
        wait_until(lambda: "verification" in report.inner_text(), timeout=900, step=2)
        w.check("✔" in report.inner_text() and "✘" not in report.inner_text(), f"bf16 merge: {report.inner_text()}")
        mdiff = float(page.locator("#merge-report .mdiff").inner_text())
        w.no_error_toasts("Export (merge)")
        w.phase("merge-bf16", t, max_abs_logit_diff=mdiff)

        # 5. GGUF for llama.cpp / Ollama, verified by transformers' reader
        t = time.time()
        page.locator("#export-format label").filter(has_text=re.compile(r"^\s*GGUF\s*$")).click()
        wait_until(lambda: page.locator("#export-gguf").is_visible(), timeout=30)
        page.locator("#export-ollama input").check()
        page.locator("#export-gguf").click()
        export = page.locator("#export-report")
        wait_until(lambda: "tokenizer round trip" in export.inner_text(), timeout=900, step=2)
        w.check("✘" not in export.inner_text(), f"GGUF export: {export.inner_text()}")
        w.check(page.locator("#download-gguf").is_enabled(), "the GGUF can be downloaded")
        w.no_error_toasts("Export (GGUF)")
        w.phase("export-gguf", t, report=export.inner_text().splitlines()[:3])

        # 6. the Playground: two chat turns, base and tuned side by side
        t = time.time()
        w.tab("Playground")
        wait_until(lambda: page.locator("#playground-run input").input_value() == run, timeout=60)
        page.get_by_role("tab", name="Chat").click()
        box = page.locator("#playground-chat-input textarea")
        rows_of = lambda c: page.locator(f"#playground-chat-{c} .message-row")
        answers = {}
        for turn, text in enumerate(("Lena Okafor is 29, a nurse, and lives in Oslo.",
                                     "Now this one: Marco Rossi, 54, teaches music in Lyon."), start=1):
            box.fill(text)
            page.locator("#playground-send").click()
            wait_until(lambda n=2 * turn: all(rows_of(c).count() == n for c in ("base", "tuned")), timeout=600)
            wait_until(lambda n=2 * turn: all(rows_of(c).nth(n - 1).inner_text().strip() for c in ("base", "tuned")),
                       timeout=600)
            reply = lambda n=2 * turn - 1: {c: rows_of(c).nth(n).inner_text().strip() for c in ("base", "tuned")}
            last = None
            while last != reply():  # the stream has ended when nothing changed for 3 s
                last = reply()
                time.sleep(3)
            answers[turn] = last
        tuned_json = 0
        for a in answers.values():
            try:
                tuned_json += isinstance(json.loads(a["tuned"]), dict)
            except ValueError:
                pass
        w.no_error_toasts("Playground")
        w.phase("playground-chat", t, answers=answers, tuned_answers_that_are_json=tuned_json)
        browser.close()
    tracebacks = w.log.read_text().count("Traceback")
    return {"phases": w.phases, "minutes": round((time.time() - w.t0) / 60, 1), "token_mean": [ui_mean, round(mean, 1)],
            "server_log_tracebacks": tracebacks, "run": run}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="max_steps (default: the starter's)")
    ap.add_argument("--keep", type=Path, help="keep the runs folder and cache here")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="studio-walk-"))
    runs, cache = work / "runs", work / "cache"
    runs.mkdir(parents=True, exist_ok=True)
    port = free_port_number()
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_UI_MODEL"}
    env.update(STUDIO_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    os.environ["STUDIO_CACHE_DIR"] = str(cache)  # this process reads the converted model from the same cache
    log = work / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(runs)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            if not serving(proc, port, log, timeout=900):
                raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
            result = walk(f"http://127.0.0.1:{port}", runs, args.steps)
        finally:
            proc.terminate()
            proc.wait(30)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["server_log_tracebacks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
