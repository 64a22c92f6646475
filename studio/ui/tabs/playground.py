"""Playground tab: the base model and base + a run's adapter side by side, streaming.

One model is loaded per run (the engine toggles the adapter on it); classification runs show
the predicted label and class probabilities of both, and accuracy on a sample of the eval set.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.errors import StudioError
from studio.ui.tabs.export import exportable
from studio.ui.tabs.runs import run_folder


def _playground(runs_dir: Path, run_id: str):
    from studio.playground import Playground

    if not run_id:
        raise gr.Error("pick a run with an adapter (train one on the Train tab first)", print_exception=False)
    run_dir = run_folder(runs_dir, run_id)
    try:
        return Playground.for_run(run_dir)  # refuses a pickle-only adapter (PEFT would torch.load it)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def usable_runs(runs_dir: Path) -> list[str]:
    """Runs with a final adapter, or a complete checkpoint while still training."""
    from studio import runs

    ids = set(exportable(runs_dir))
    for r in runs.list_runs(runs_dir):
        if runs.last_complete_checkpoint(r["dir"]) is not None:
            ids.add(r["id"])
    return [r["id"] for r in runs.list_runs(runs_dir) if r["id"] in ids]


def _probs(out: dict) -> str:
    ranked = sorted(out["probs"].items(), key=lambda kv: -kv[1])
    return f"{out['label']}\n\n" + "\n".join(f"{k}: {v:.1%}" for k, v in ranked)


def generate(runs_dir: Path, run_id: str, prompt: str, max_new_tokens: float, temperature: float, top_p: float,
             seed: float, template: str):
    """Yields (base text, tuned text) as both grow; for classification runs, the two predictions."""
    if not (prompt or "").strip():
        raise gr.Error("type a prompt first", print_exception=False)
    pg = _playground(runs_dir, run_id)
    try:
        if pg.info()["task"] == "seq_cls":
            base = pg.classify([prompt], adapter=False)[0]
            tuned = pg.classify([prompt], adapter=True)[0]
            yield _probs(base), _probs(tuned)
            return
        for base, tuned in pg.side_by_side(prompt, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                           top_p=float(top_p), seed=int(seed), template=template):
            yield base, tuned
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None


def evaluate(runs_dir: Path, run_id: str):
    """(accuracy markdown, example rows) of base vs tuned on a sample of the run's eval split."""
    pg = _playground(runs_dir, run_id)
    try:
        out = pg.eval_sample(n=64)
    except StudioError as e:
        raise gr.Error(str(e), print_exception=False) from None
    acc = out["accuracy"]
    text = (f"On {out['n']} examples of the {out['split']} split: base accuracy **{acc['base']:.1%}**, "
            f"tuned accuracy **{acc['tuned']:.1%}**.")
    rows = [[e["text"][:160], e["gold"], e["base"], e["tuned"]] for e in out["examples"]]
    return text, rows


def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ids = usable_runs(runs_dir)
    with gr.Row():
        ui.run = gr.Dropdown(ids, value=ids[0] if ids else None, label="Run", elem_id="playground-run", scale=3)
        ui.template = gr.Radio(["auto", "alpaca", "chat", "none"], value="auto", label="prompt template", scale=2,
                               info="auto: the run's training template; none: the text as typed")
    ui.prompt = gr.Textbox(label="Prompt", lines=3, elem_id="playground-prompt",
                           placeholder="e.g. What is the capital of Iceland?")
    with gr.Row():
        ui.max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
        ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature", info="0 = greedy")
        ui.top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
        ui.seed = gr.Number(0, precision=0, label="seed")
    ui.generate = gr.Button("Generate", variant="primary", elem_id="playground-generate")
    with gr.Row():
        ui.base = gr.Textbox(label="Base model", lines=8, elem_id="playground-base", interactive=False)
        ui.tuned = gr.Textbox(label="Base + adapter", lines=8, elem_id="playground-tuned", interactive=False)
    with gr.Accordion("Classification runs: accuracy on a sample of the eval set", open=False):
        ui.evaluate = gr.Button("Evaluate base vs tuned", elem_id="playground-evaluate")
        ui.eval_text = gr.Markdown(elem_id="playground-eval")
        ui.eval_rows = gr.Dataframe(headers=["text", "gold", "base", "tuned"], interactive=False, max_height=300)
    return ui
