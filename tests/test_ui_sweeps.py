"""The Sweeps tab and the Runs tab's queue controls as plain handlers (no browser).

Runs are queued the way the UI queues them (sweep.start, queue.enqueue) into a real queue; the
test holds the runner's lock, as a runner busy with other work would, so the queued runs wait
and nothing trains: what is checked is what the tabs show and do to the queue.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json

import gradio as gr
import pytest

from studio import cli, lora, runs
from studio.config import RunConfig
from studio.models.tree import model_tree
from studio.runs import queue, sweep
from studio.ui.registry import Registry
from studio.ui.tabs import runs as runs_tab
from studio.ui.tabs import sweeps as sweeps_tab
from studio.ui.tabs import train as train_tab


@pytest.fixture
def root(tmp_path):
    """A runs folder whose queue runner is 'busy' (its lock held here): queued runs stay queued."""
    d = tmp_path / "runs"
    (d / queue.QUEUE_DIR).mkdir(parents=True)
    with open(d / queue.QUEUE_DIR / queue.RUNNER_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield d
        for e in queue.entries(d):  # nothing this test queued may start once the lock is gone
            queue.cancel(d, e["run"])
        fcntl.flock(held, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def form():
    return train_tab.form_for("tiny-llama", max_steps=4)


def grid(*rows, name=""):
    """The grid form's values: rows of (field, values); the rest empty."""
    v = {f"sweeps.key_{i}": None for i in range(1, sweeps_tab.FIELDS + 1)}
    v.update({f"sweeps.values_{i}": "" for i in range(1, sweeps_tab.FIELDS + 1)})
    for i, (key, values) in enumerate(rows, 1):
        v[f"sweeps.key_{i}"], v[f"sweeps.values_{i}"] = key, values
    return {**v, "sweeps.name": name}


def test_the_plan_counts_runs_and_trainable_parameters_as_the_engine_does(form):
    base = train_tab.build_config(form)
    view = sweeps_tab.plan_view({**form, **grid(("lora.r", "2,8"), ("lora.target_modules", "q_proj|q_proj,v_proj"))})
    tree = model_tree("tiny-llama")
    expected = [lora.count(tree, dataclasses.replace(base.lora, r=r, target_modules=t)).trainable
                for r in (2, 8) for t in (["q_proj"], ["q_proj", "v_proj"])]
    assert len(set(expected)) == 4
    assert view["sweeps.message"] == ""
    assert f"data-runs='4' data-total='{sum(expected)}'" in view["sweeps.plan"]
    assert "r=2, target_modules=q_proj,v_proj" in view["sweeps.plan"] and f"{expected[1]:,}" in view["sweeps.plan"]
    # a field chosen without values is not part of the grid; the Train tab's form is the base
    three = sweeps_tab.plan_view({**form, **grid(("lora.r", "2,4,8"), ("lora.target_modules", ""))})
    assert "data-runs='3'" in three["sweeps.plan"]


@pytest.mark.parametrize("rows,needle", [
    ((("lora.rank", "4"),), "⚠ lora.rank: no such config field; did you mean lora.r?"),
    ((("lora.r", "0,4,x"),), "invalid grid values"),
    ((), "⚠ the grid is empty: choose a field and its values"),
    (((None, "1,2"),), "row 1: the values '1,2' need a field"),
    ((("lora.r", "1,2,3,4,5,6,7,8,9"), ("train.seed", "1,2,3,4,5,6,7,8,9")),
     "the grid has 81 points (9 x 9); a sweep may have at most 64"),
])
def test_a_grid_that_cannot_be_queued_says_why_in_one_line_and_queues_nothing(form, root, rows, needle):
    v = {**form, **grid(*rows)}
    view = sweeps_tab.plan_view(v)
    if rows:
        assert needle in view["sweeps.message"] and view["sweeps.plan"] == ""
    else:  # an untouched grid is not an error until it is queued
        assert view["sweeps.message"] == "" and "Give a field its values" in view["sweeps.plan"]
    out = sweeps_tab.start(root, v)
    assert needle in out["sweeps.message"] and "\n" not in out["sweeps.message"]
    assert [d.name for d in root.iterdir()] == [queue.QUEUE_DIR] and queue.entries(root) == []
    if needle == "invalid grid values":  # each bad value named at once
        assert "got 0" in out["sweeps.message"] and "got 'x'" in out["sweeps.message"]


def test_start_queues_the_sweep_as_studio_sweep_does_and_the_results_show_the_queue(form, root):
    out = sweeps_tab.start(root, {**form, **grid(("lora.r", "2,4,8")), "sweeps.name": "ui-r"})
    assert out["sweeps.message"].startswith("sweep **ui-r**: 3 runs queued")
    assert out["sweeps.pick"]["value"] == "ui-r" and out["sweeps.pick"]["choices"] == ["ui-r"]
    members = [r["run"] for r in sweep.rows("ui-r", root)]
    assert [e["run"] for e in queue.entries(root)] == members  # queued in grid order, nothing started
    base, tree = train_tab.build_config(form), model_tree("tiny-llama")
    for run, r in zip(members, (2, 4, 8)):  # each run records its sweep, its point and its exact count
        st = runs.read_status(root / run)
        assert st["sweep"] == "ui-r" and st["grid"] == {"lora.r": r}
        assert st["trainable_params"] == lora.count(tree, dataclasses.replace(base.lora, r=r)).trainable
    shown = sweeps_tab.results(root, "ui-r")
    table = shown["sweeps.table"]
    assert table["headers"][:2] == ["lora.r", "state"]
    assert [row[:2] for row in table["data"]] == [["2", "queued #1"], ["4", "queued #2"], ["8", "queued #3"]]
    assert [row[-1] for row in table["data"]] == members
    assert shown["sweeps.progress"] == "0 of 3 runs completed, 3 waiting or training"
    assert shown["sweeps.timer"].active is True  # it refreshes while the sweep runs
    fig = shown["sweeps.chart"]
    assert fig.layout.xaxis.type == "log" and "no run of this sweep" in fig.layout.annotations[0].text
    # the same name again: refused, nothing more queued
    again = sweeps_tab.start(root, {**form, **grid(("lora.r", "2")), "sweeps.name": "ui-r"})
    assert "already exists" in again["sweeps.message"] and len(queue.entries(root)) == 3
    # the Runs tab lists them with their places in the queue
    states = {row[0]: row[1] for row in runs_tab.table(root)}
    assert [states[r] for r in members] == ["queued #1", "queued #2", "queued #3"]
    assert runs_tab.busy(runs_tab.table(root))


def test_the_chart_plots_accuracy_for_a_classifier_sweep_against_trainable_parameters():
    rows = [{"run": f"run-{i}", "state": "completed", "grid": {"lora.r": r, "lora.target_modules": t},
             "trainable": n, "final_loss": 0.3, "best_eval_loss": 0.4, "best_eval_accuracy": acc, "seconds": 9}
            for i, (r, t, n, acc) in enumerate([(1, ["query"], 1_538, 0.81), (16, "all-linear", 99_074, 0.97)])]
    fig = sweeps_tab.chart("abl", rows)
    trace = fig.data[0]
    assert list(trace.x) == [1_538, 99_074] and list(trace.y) == [0.81, 0.97]
    assert list(trace.text) == ["r=1, target_modules=query", "r=16, target_modules=all-linear"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.title.text == "best eval accuracy"
    rows[0]["best_eval_accuracy"] = rows[1]["best_eval_accuracy"] = None  # a causal LM sweep: eval loss
    assert sweeps_tab.chart("abl", rows).layout.yaxis.title.text == "best eval loss"


def test_queue_controls_in_the_runs_tab_say_what_studio_queue_says(tmp_path, root, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Say it.", "input": w, "output": w}) + "\n"
                            for w in ["one", "two", "three", "four"] * 5))
    cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"}, "data": {"path": str(data)},
                               "train": {"max_steps": 2}})
    a, b, c = (queue.enqueue(cfg, root).name for _ in range(3))
    assert [runs_tab.state_label("queued", p) for p in (1, None)] == ["queued #1", "queued"]
    moved = runs_tab.move(root, c, -1)
    assert moved == f"{c}: position 2"
    assert cli.main(["queue", "down", c, "--runs-dir", str(root)]) == 0
    assert cli.main(["queue", "up", c, "--runs-dir", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == moved  # the CLI's words for the same move
    assert runs_tab.move(root, a, 1) == f"{a}: position 2"
    assert [e["run"] for e in queue.entries(root)] == [c, a, b]
    assert "waiting in the queue at position <b>1</b>" in runs_tab.detail(root, c)
    assert runs_tab.cancel(root, a) == f"{a}: removed from the queue"
    assert runs.read_status(root / a)["state"] == "stopped"
    assert cli.main(["queue", "cancel", a, "--runs-dir", str(root)]) == 2
    said = capsys.readouterr().err.strip().removeprefix("studio queue: ")
    assert runs_tab.cancel(root, a) == f"⚠ {said}" and "is not waiting in the queue" in said
    assert runs_tab.move(root, a, -1) == f"⚠ run {a} is not waiting in the queue of {root}"
    assert runs_tab.cancel(root, None) == runs_tab.move(root, None, 1) == "⚠ pick a queued run first"
    assert {row[0]: row[1] for row in runs_tab.table(root)} == {a: "stopped", b: "queued #2", c: "queued #1"}


def test_run_details_show_why_a_run_failed_and_how_to_open_its_tracker(tmp_path):
    root = tmp_path / "runs"
    cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"}, "train": {"report_to": ["tensorboard"]}})
    d = runs.create_run(cfg, root)
    waiting = runs_tab.detail(root, d.name)
    assert "tensorboard: the command to open it appears once the run starts" in waiting
    error = "the trainer process ended without writing a final state; last lines of train.log:\nKilled <oom>"
    board = d / "trackers" / "tensorboard"
    st = runs.read_json(d / runs.STATUS)
    runs.write_json_atomic(d / runs.STATUS, {**st, "state": "failed", "error": error, "step": 3,
                                             "trackers": {"tensorboard": {"path": str(board),
                                                                          "open": f"tensorboard --logdir {board}"}}})
    shown = runs_tab.detail(root, d.name)
    assert "<b>Why it failed:</b>" in shown and "Killed &lt;oom&gt;" in shown  # escaped, kept in full
    assert "class='rs-err'" in shown and "\nKilled" in shown  # its lines kept (shown pre-wrapped)
    assert f"<code>tensorboard --logdir {board}</code>" in shown
    assert "Pick a run" in runs_tab.detail(root, None)
    with pytest.raises(gr.Error):
        runs_tab.detail(root, "../etc")


def test_a_clicked_row_picks_its_run_and_the_registry_hands_the_click_to_the_handler():
    assert runs_tab.clicked_run(["20261202-101010-tiny-llama-r8", "queued #1", "0 / 4"]) == \
        "20261202-101010-tiny-llama-r8"
    assert runs_tab.clicked_run(None) is None and runs_tab.clicked_run(["../x"]) is None
    reg = Registry()
    with gr.Blocks():
        reg.add("runs", pick=gr.Dropdown(["a"]), table=gr.Dataframe([["a"]]))

    def clicked(v, event):
        return {"runs.pick": (v["runs.pick"], event.row_value[0])}

    call = reg.bind(clicked, ["runs.pick"], ["runs.pick"])
    from gradio.helpers import special_args

    # gradio finds where the event data goes from the bound function's annotations, as it does for a click
    event = gr.SelectData(None, {"index": [0, 0], "value": "a", "row_value": ["a"], "selected": True})
    inputs, _, event_index, _ = special_args(call, inputs=["x"], event_data=event)
    assert event_index == 1 and call(*inputs) == {reg["runs.pick"]: ("x", "a")}


def test_the_sweeps_tab_and_queue_controls_are_wired_with_their_ids(tmp_path):
    from studio.ui import app

    demo = app.build_app(tmp_path, "tiny-llama")
    named = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    ids = set(named)
    assert len(named) == len(ids), sorted(i for i in ids if named.count(i) > 1)  # one element per id
    assert {"sweep-key-1", "sweep-values-1", "sweep-key-3", "sweep-name", "sweep-start", "sweep-message",
            "sweep-plan", "sweep-pick", "sweep-table", "sweep-chart", "sweep-compare", "sweep-run-a", "sweep-run-b",
            "sweep-similarity", "sweep-curves", "runs-queue-up", "runs-queue-down", "runs-queue-cancel",
            "runs-detail"} <= ids
    assert {"start_sweep", "compare_sweep", "sweep_similarity", "queue_cancel", "queue_up",
            "queue_down"} <= {d.api_name for d in demo.fns.values()}


def test_compare_and_similarity_say_what_they_need_next_to_the_button(tmp_path, root, form):
    assert sweeps_tab.compare(root, {"sweeps.pick": None}) == {"sweeps.compare_message": "⚠ pick a sweep first"}
    assert sweeps_tab.similarity(root, {"sweeps.run_a": None, "sweeps.run_b": None, "analysis.which": "A"}) == {
        "sweeps.compare_message": "⚠ pick two members (press Compare to list them)"}
    sweeps_tab.start(root, {**form, **grid(("lora.r", "2,4")), "sweeps.name": "waiting"})
    out = sweeps_tab.compare(root, {"sweeps.pick": "waiting"})  # nothing trained yet: no adapter to compare
    assert out["sweeps.run_a"]["choices"] == [] and "needs two members" in out["sweeps.compare_message"]
    assert out["sweeps.curves"].data == ()  # the overlay of runs with no metrics yet: an empty chart
    missing = sweeps_tab.similarity(root, {"sweeps.run_a": "no-such-run", "sweeps.run_b": "no-such-run",
                                           "analysis.which": "A"})
    assert missing == {"sweeps.compare_message": f"⚠ no run 'no-such-run' in {root}"}
