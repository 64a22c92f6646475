"""Playground tab: the base model and a run's adapter (and up to two more of the same base) side by side.

One base model is loaded per run; the engine (studio.playground) switches between the adapters
loaded on it per generation, never reloading. Two modes share the run, the adapters and the
sampling settings: a single prompt, every column streaming its answer, and a chat, multi-turn with
a system prompt and the model's chat template, where every column keeps its own history (their
replies differ, so the next turn's context does too). Classification runs show the predicted label
and class probabilities of each column, and accuracy on a sample of the eval set.

Handlers take and return values by name ("playground.x", studio/ui/registry.py); bad input is a
message next to the button, and the tab stays usable.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.ui.tabs.export import exportable
from studio.ui.tabs.runs import run_folder

EXTRA = ("extra_1", "extra_2")  # the columns of the adapters picked beside the run's own
COLUMNS = ("base", "tuned") + EXTRA
NO_RUNS = ("No run with an adapter yet. Train one on the **Train** tab (tiny-llama and a few dozen steps are "
           "enough to try this tab), or wait for a running run's first checkpoint; then pick it here.")


# --- what can be picked ---------------------------------------------------------------------

def usable_runs(runs_dir: Path) -> list[str]:
    """Runs with a final adapter, or a complete checkpoint while still training."""
    from studio import runs

    ids = set(exportable(runs_dir))
    for r in runs.list_runs(runs_dir):
        if runs.last_complete_checkpoint(r["dir"]) is not None:
            ids.add(r["id"])
    return [r["id"] for r in runs.list_runs(runs_dir) if r["id"] in ids]


def default_run(runs_dir: Path, ids: list[str] | None = None) -> str | None:
    """The newest completed run among the usable ones, else the newest usable one."""
    from studio import runs

    ids = usable_runs(runs_dir) if ids is None else ids
    states = {r["id"]: r["state"] for r in runs.list_runs(runs_dir)}
    return next((i for i in ids if states.get(i) == "completed"), ids[0] if ids else None)


def adapter_choices(runs_dir: Path, run_id: str | None) -> dict[str, str]:
    """{library name: what to load} of the adapters that can go beside `run_id`'s own: same base,
    not the run's own adapter (runs' adapters, checkpoints, combined and imported ones)."""
    from studio import runs
    from studio.adapters import library

    if not run_id:
        return {}
    try:
        found = library.entries(runs_dir)
    except StudioError:
        return {}
    final = (runs_dir / run_id / runs.ADAPTER).is_dir()
    own = lambda e: e.name == run_id or (not final and e.name.startswith(run_id + "@"))
    mine = next((e for e in found if own(e)), None)
    if mine is None:
        return {}
    # A run's final adapter is loaded by its run folder, so its base is the config's, as written.
    return {e.name: str(Path(e.path).parent) if e.origin == "run" else e.path
            for e in found if not own(e) and library.same_base(mine, e)}


def picked(known: Mapping[str, str], names: list[str] | None) -> dict[str, str]:
    """{column: library name} of the adapters picked beside the run's own, in order; `known` is
    adapter_choices of the run (a value posted by hand that is not among them is refused)."""
    bad = [n for n in names or [] if n not in known]
    if bad:
        raise ValueError(f"adapter {bad[0]!r} is not an adapter of this run's base; pick from: {', '.join(known) or 'none'}")
    if len(names or []) > len(EXTRA):
        raise ValueError(f"{len(names)} adapters picked; at most {len(EXTRA)} go beside the run's own")
    return dict(zip(EXTRA, names or []))


# --- views ----------------------------------------------------------------------------------

def message(text: str, bad: bool = True) -> str:
    return f"<div class='{'bad' if bad else 'pg-ok'}'>{'⚠ ' if bad else ''}{html.escape(text)}</div>" if text else ""


def columns_view(run_id: str | None, extras: Mapping[str, str], new_chat: bool = False) -> dict[str, Any]:
    """Labels and visibility of every column, prompt and chat alike; new_chat: the chat emptied too
    (other columns make another conversation)."""
    labels = {"base": "Base model", "tuned": f"Base + {run_id}" if run_id else "Base + adapter",
              **{c: f"Base + {extras[c]}" if c in extras else "" for c in EXTRA}}
    out = {}
    for c in COLUMNS:
        shown = c in ("base", "tuned") or c in extras
        out[f"playground.{c}"] = gr.update(label=labels[c], visible=shown)
        out[f"playground.chat_{c}"] = gr.update(label=labels[c], visible=shown, **({"value": []} if new_chat else {}))
    if new_chat:
        out.update({"playground.chat_state": {}, "playground.chat_message": ""})
    return out


def empty_chat() -> dict[str, Any]:
    return {"playground.chat_state": {}, **{f"playground.chat_{c}": [] for c in COLUMNS},
            "playground.chat_message": ""}


def refresh(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """The tab opened: the runs now usable (the current one kept, else the newest completed one)."""
    ids = usable_runs(runs_dir)
    current = v["playground.run"]
    run_id = current if current in ids else default_run(runs_dir, ids)
    out = {"playground.run": gr.update(choices=ids, value=run_id),
           "playground.notice": "" if ids else NO_RUNS}
    if run_id == current:  # no change event follows (and the chat stays): bring the adapter list up to date
        known = adapter_choices(runs_dir, run_id)
        keep = [n for n in v["playground.adapters"] or [] if n in known][: len(EXTRA)]
        out.update({"playground.adapters": gr.update(choices=list(known), value=keep),
                    **columns_view(run_id, dict(zip(EXTRA, keep)))})
    return out


def run_changed(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    """Another run: the adapters of its base to pick from (those still valid kept), a fresh chat."""
    run_id = v["playground.run"]
    known = adapter_choices(runs_dir, run_id)
    keep = [n for n in v["playground.adapters"] or [] if n in known][: len(EXTRA)]
    return {"playground.adapters": gr.update(choices=list(known), value=keep),
            **columns_view(run_id, dict(zip(EXTRA, keep)), new_chat=True)}


def adapters_changed(runs_dir: Path, v: Mapping[str, Any]) -> dict[str, Any]:
    names = list(v["playground.adapters"] or [])[: len(EXTRA)]
    return columns_view(v["playground.run"], dict(zip(EXTRA, names)), new_chat=True)


# --- generation -----------------------------------------------------------------------------

def _open(runs_dir: Path, v: Mapping[str, Any]):
    """(playground, {column: the engine's adapter argument}) for the run and adapters picked."""
    from studio.playground import Playground

    run_id = v["playground.run"]
    if not run_id:
        raise ValueError("pick a run with an adapter first (train one on the Train tab)")
    try:
        run_dir = run_folder(runs_dir, run_id)
    except gr.Error as e:
        raise ValueError(e.message) from None
    known = adapter_choices(runs_dir, run_id)
    extras = picked(known, v["playground.adapters"])
    pg = Playground.for_run(run_dir)  # refuses a pickle-only adapter (PEFT would torch.load it)
    loaded = pg.load_adapters([known[n] for n in extras.values()]) if extras else []
    return pg, {"base": False, "tuned": True, **dict(zip(extras, loaded))}


def _sampling(v: Mapping[str, Any]) -> dict:
    return {"max_new_tokens": int(v["playground.max_new_tokens"]), "temperature": float(v["playground.temperature"]),
            "top_p": float(v["playground.top_p"]), "seed": int(v["playground.seed"] or 0)}


def _probs(out: dict) -> str:
    ranked = sorted(out["probs"].items(), key=lambda kv: -kv[1])
    return f"{out['label']}\n\n" + "\n".join(f"{k}: {v:.1%}" for k, v in ranked)


def generate(runs_dir: Path, v: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every column's answer to the prompt as they grow (a classifier's: its prediction)."""
    prompt = v["playground.prompt"] or ""
    if not prompt.strip():
        yield {"playground.message": message("type a prompt first")}
        return
    try:
        pg, columns = _open(runs_dir, v)
        yield {"playground.message": "", **{f"playground.{c}": "" for c in COLUMNS}}
        if pg.task == "seq_cls":
            yield {f"playground.{c}": _probs(pg.classify([prompt], adapter=a)[0]) for c, a in columns.items()}
            return
        names = {("base" if a is False else "default" if a is True else a): c for c, a in columns.items()}
        row = {}
        for row in pg.compare(prompt, [n for n in names if n != "base"], template=v["playground.template"],
                              **_sampling(v)):
            yield {f"playground.{names[n]}": text for n, text in row.items()}
        # an empty column says why (the engine keeps the last generation's figures per column)
        notes = {n: pg.empty_answer_note("tuned" if n == "default" else n, v["playground.template"])
                 for n, text in row.items() if not text.strip()}
        if any(notes.values()):
            yield {f"playground.{names[n]}": f"({note})" for n, note in notes.items() if note}
    except (StudioError, ValueError) as e:
        yield {"playground.message": message(str(e))}


def send(runs_dir: Path, v: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The next chat turn: the message goes to every column, each answers from its own history."""
    text = v["playground.chat_input"] or ""
    if not text.strip():
        yield {"playground.chat_message": message("type a message first")}
        return
    try:
        pg, columns = _open(runs_dir, v)
        if pg.task != "causal_lm":
            raise ValueError(f"chat needs a language model; run {v['playground.run']} is a classifier: "
                             "use the Prompt tab for its predictions")
        history = (v["playground.chat_state"] or {}).get("history") or {}
        turn = {c: [*history.get(c, []), {"role": "user", "content": text}] for c in columns}
        note = "" if pg.template == "chat" else (
            f"run {v['playground.run']} was trained on {pg.template} prompts, not conversations: the chat is "
            "rendered with the model's chat template, which its adapter has not seen")
        yield {"playground.chat_input": "", "playground.chat_message": message(note, bad=False),
               **{f"playground.chat_{c}": turn[c] for c in columns}}
        names = {("base" if a is False else "default" if a is True else a): c for c, a in columns.items()}
        replies = {c: "" for c in columns}
        for row in pg.chat({n: turn[c] for n, c in names.items()}, system=v["playground.system"] or "",
                           **_sampling(v)):
            replies.update({names[n]: reply for n, reply in row.items()})
            yield {f"playground.chat_{c}": [*turn[c], {"role": "assistant", "content": replies[c]}] for c in columns}
        history = {c: [*turn[c], {"role": "assistant", "content": replies[c]}] for c in columns}
        yield {"playground.chat_state": {"history": history}}
    except (StudioError, ValueError) as e:
        yield {"playground.chat_message": message(str(e))}


def evaluate(runs_dir: Path, run_id: str):
    """(accuracy markdown, example rows) of base vs tuned on a sample of the run's eval split."""
    from studio.playground import Playground

    if not run_id:
        return message("pick a classification run first"), []
    try:
        out = Playground.for_run(run_folder(runs_dir, run_id)).eval_sample(n=64)
    except StudioError as e:
        return message(str(e)), []
    acc = out["accuracy"]
    text = (f"On {out['n']} examples of the {out['split']} split: base accuracy <b>{acc['base']:.1%}</b>, "
            f"tuned accuracy <b>{acc['tuned']:.1%}</b>.")
    rows = [[e["text"][:160], e["gold"], e["base"], e["tuned"]] for e in out["examples"]]
    return text, rows


# --- layout ---------------------------------------------------------------------------------

def build(runs_dir: Path) -> SimpleNamespace:
    ui = SimpleNamespace()
    ids = usable_runs(runs_dir)
    run_id = default_run(runs_dir, ids)
    ui.notice = gr.Markdown("" if ids else NO_RUNS, elem_id="playground-notice")
    with gr.Row():
        ui.run = gr.Dropdown(ids, value=run_id, label="Run", elem_id="playground-run", scale=3,
                             info="its base model and its adapter; the newest completed run first")
        ui.adapters = gr.Dropdown(list(adapter_choices(runs_dir, run_id)), value=[], multiselect=True,
                                  max_choices=len(EXTRA), label="Compare with (same base)", scale=3,
                                  elem_id="playground-adapters",
                                  info="up to two more adapters: runs, checkpoints, combined or imported ones")
    with gr.Row():
        ui.max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens",
                                      elem_id="playground-max-new-tokens")
        ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature", info="0 = greedy")
        ui.top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
        ui.seed = gr.Number(0, precision=0, label="seed")
    labels = columns_view(run_id, {})
    with gr.Tabs():
        with gr.Tab("Prompt", id="playground-mode-prompt"):
            ui.template = gr.Radio(["auto", "alpaca", "chat", "none"], value="auto", label="prompt template",
                                   elem_id="playground-template",
                                   info="auto: the run's training template; none: the text as typed")
            ui.prompt = gr.Textbox(label="Prompt", lines=3, elem_id="playground-prompt",
                                   placeholder="e.g. What is the capital of Iceland?")
            with gr.Row():
                ui.generate = gr.Button("Generate", variant="primary", elem_id="playground-generate", scale=1)
                ui.message = gr.HTML(elem_id="playground-message")
            with gr.Row():
                for c in COLUMNS:
                    lab = labels[f"playground.{c}"]
                    setattr(ui, c, gr.Textbox(label=lab["label"], visible=lab["visible"], lines=8, interactive=False,
                                              elem_id=f"playground-{c.replace('_', '-')}"))
        with gr.Tab("Chat", id="playground-mode-chat"):
            ui.system = gr.Textbox(label="System prompt", lines=1, elem_id="playground-system",
                                   placeholder="e.g. You are a concise assistant.",
                                   info="the first message of every column's conversation; changing it applies "
                                        "from the next turn")
            with gr.Row():
                for c in COLUMNS:
                    lab = labels[f"playground.chat_{c}"]
                    setattr(ui, f"chat_{c}", gr.Chatbot(label=lab["label"], visible=lab["visible"], height=360,
                                                        elem_id=f"playground-chat-{c.replace('_', '-')}"))
            ui.chat_input = gr.Textbox(label="Message", lines=2, elem_id="playground-chat-input",
                                       placeholder="Each column answers from its own history (Enter sends)")
            with gr.Row():
                ui.send = gr.Button("Send", variant="primary", elem_id="playground-send", scale=1)
                ui.clear = gr.Button("Clear", elem_id="playground-clear", scale=1)
                ui.chat_message = gr.HTML(elem_id="playground-chat-message")
            ui.chat_state = gr.State({})
    with gr.Accordion("Classification runs: accuracy on a sample of the eval set", open=False):
        ui.evaluate = gr.Button("Evaluate base vs tuned", elem_id="playground-evaluate")
        ui.eval_text = gr.HTML(elem_id="playground-eval")
        ui.eval_rows = gr.Dataframe(headers=["text", "gold", "base", "tuned"], interactive=False, max_height=300)
    return ui
