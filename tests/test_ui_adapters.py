"""The Adapters tab's handlers: the library, import, combine (checked before the button), compare."""

from __future__ import annotations

import html
import json
import zipfile

import pytest

from studio import analysis
from studio.adapters import library
from studio.ui.tabs import adapters as tab
from studio.ui.tabs import playground as pg_tab
from test_ui_playground import _run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adui") / "runs"
    _run(root, "one", 1, "completed", 100.0)
    _run(root, "two", 2, "completed", 200.0)
    _run(root, "wide", 3, "completed", 300.0, r=8)
    _run(root, "gpt", 4, "completed", 50.0, ref="tiny-gpt2", targets=("c_attn",))
    return root


def _v(**kw):
    v = {"adapters.pick": [], "adapters.method": "linear", "adapters.density": 0.5, "adapters.name": "",
         "adapters.base": None, "adapters.upload": None, "adapters.import_path": "", "adapters.import_name": "",
         "adapters.import_base": "", **{f"adapters.weight_{i + 1}": 0.5 for i in range(tab.MAX_COMBINE)}}
    return {**v, **{f"adapters.{k}": x for k, x in kw.items()}}


def _text(out, key):
    return html.unescape(out[key])


def test_the_library_lists_every_adapter_with_its_facts_and_an_empty_one_says_what_to_do(root, tmp_path):
    out = tab.library_view(root)
    rows = {r[0]: r for r in out["adapters.table"]}
    assert set(rows) == {"one", "two", "wide", "gpt"}
    assert rows["wide"][2:6] == ["run", 8, 16, "q_proj, v_proj"] and rows["wide"][6] > rows["one"][6] > 0
    assert out["adapters.notice"] == "" and len(out["adapters.base"]["choices"]) == 2
    assert tab.library_view(tmp_path)["adapters.notice"] == tab.NO_ADAPTERS


def test_combine_says_up_front_which_methods_can_take_the_adapters(root):
    out = tab.combine_check(root, _v(pick=["one"]))
    assert tab.PICK_TWO in out["adapters.methods"] and out["adapters.combine"]["interactive"] is False
    out = tab.combine_check(root, _v(pick=["one", "wide"], method="linear"))
    text = _text(out, "adapters.methods")
    assert "linear: needs adapters of one rank; these have r = 4, 8" in text
    assert "methods that can combine these: cat, svd, ties_svd" in text
    assert out["adapters.combine"]["interactive"] is False
    assert out["adapters.weight_1"]["label"] == "weight of one" and out["adapters.weight_2"]["visible"]
    assert not out["adapters.weight_3"]["visible"] and not out["adapters.density"]["visible"]
    out = tab.combine_check(root, _v(pick=["one", "wide"], method="ties_svd"))
    assert out["adapters.combine"]["interactive"] is True and out["adapters.density"]["visible"]
    out = tab.combine_check(root, _v(pick=["one", "gpt"], method="cat"))
    assert "adapters of different bases cannot be combined" in _text(out, "adapters.methods")
    assert out["adapters.combine"]["interactive"] is False


def test_a_combination_joins_the_library_and_the_playground_offers_it(root):
    out = tab.do_combine(root, _v(pick=["one", "two"], method="linear", name="mix", weight_1=0.7, weight_2=0.3))
    assert "combined one, two by linear (weights 0.7, 0.3) into mix" in _text(out, "adapters.combine_message")
    rows = {r[0]: r for r in out["adapters.table"]}
    assert rows["mix"][2] == "combined"
    rec = json.loads((library.library_dir(root) / "mix" / library.COMBINATION).read_text())
    assert rec["weights"] == [0.7, 0.3] and rec["method"] == "linear" and [p["name"] for p in rec["parents"]] == [
        "one", "two"]
    assert "mix" in pg_tab.adapter_choices(root, "one")
    again = tab.do_combine(root, _v(pick=["one", "two"], name="mix"))
    assert "already exists" in _text(again, "adapters.combine_message") and "adapters.table" not in again
    bad = tab.do_combine(root, _v(pick=["one", "wide"], method="linear", name="nope"))
    assert "methods that can: cat, svd, ties_svd" in _text(bad, "adapters.combine_message")
    assert not (library.library_dir(root) / "nope").exists()


def test_import_keeps_a_good_zip_and_refuses_a_bad_one_with_nothing_written(root, tmp_path):
    folder = root / "one" / "adapter"
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(folder / name, name)
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.write(folder / "adapter_config.json", "adapter_config.json")
        z.writestr("../escape.json", "{}")
    out = tab.do_import(root, _v(upload=str(bad)))
    assert "points outside the adapter folder" in _text(out, "adapters.import_message")
    assert not (library.library_dir(root) / "evil").exists()
    assert "not both" in _text(tab.do_import(root, _v(upload=str(good), import_path=str(folder))),
                               "adapters.import_message")
    out = tab.do_import(root, _v(upload=str(good), import_base="tiny-llama"))
    assert "imported good (tiny-llama, r = 4)" in _text(out, "adapters.import_message")
    assert {r[0]: r[2] for r in out["adapters.table"]}["good"] == "imported"


def test_compare_shows_saved_metrics_per_adapter_and_pairwise_similarity(root):
    from studio import evaluate as ev

    single = ev.evaluate(root / "one", limit=2, max_new_tokens=2)
    multi = ev.evaluate(root / "one", limit=2, max_new_tokens=2, adapters=[str(root / "two")])
    base = next(b for b in tab.library_view(root)["adapters.base"]["choices"] if "gpt2" not in str(b))
    out = tab.do_compare(root, _v(base=base))
    rows = {(r[0], r[1]): r for r in out["adapters.metrics"]}
    assert rows[("one", "one: heldout")][2:6] == [2, round(single["metrics"]["tuned"]["exact_match"], 4),
                                                 round(single["metrics"]["tuned"]["rouge_l"], 4),
                                                 round(single["metrics"]["tuned"]["loss"], 4)]
    assert rows[("two", "one: heldout-adapters")][5] == round(multi["metrics"]["two"]["loss"], 4)
    assert ("base model (no adapter)", "one: heldout") in rows
    pairs = {frozenset(r[:2]): r for r in out["adapters.similarity"]}
    direct = analysis.subspace_similarity(str(root / "one" / "adapter"), str(root / "two" / "adapter"), which="B")
    assert pairs[frozenset(("one", "two"))][3] == round(direct["summary"]["phi_1_1_mean"], 4)
    assert pairs[frozenset(("one", "two"))][2] == direct["summary"]["modules"] == len(direct["modules"]) > 0
    assert frozenset(("one", "mix")) in pairs and not any("gpt" in key for key in pairs)
    assert "pick a base" in _text(tab.do_compare(root, _v(base="nothing")), "adapters.compare_message")
