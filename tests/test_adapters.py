"""The adapter library and weighted combinations, against PEFT's own add_weighted_adapter.

Adapters are made directly with PEFT on the tiny built-ins (random A and B, so every delta is
non-zero); each combination the studio saves must give the same delta weights as PEFT's own
add_weighted_adapter on the same adapters, load with PeftModel.from_pretrained, merge and
generate.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from studio import cli
from studio.adapters import combine, library
from studio.errors import AdapterError
from studio.models import load_model, model_dir


def make_adapter(folder: Path, ref: str = "tiny-llama", r: int = 4, seed: int = 0,
                 targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(seed)
    model = load_model(ref)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(d / "a", seed=1), "b": make_adapter(d / "b", seed=2),
            "c8": make_adapter(d / "c8", r=8, seed=3),
            "gpt2": make_adapter(d / "gpt2", ref="tiny-gpt2", targets=("c_attn",), seed=4)}


def deltas(pm, name: str) -> dict[str, torch.Tensor]:
    return {n: m.get_delta_weight(name).detach().clone() for n, m in pm.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def reference(paths: list[Path], weights, method, density) -> dict[str, torch.Tensor]:
    pm = PeftModel.from_pretrained(load_model("tiny-llama"), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    torch.manual_seed(combine.SEED)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(paths))], weights, "ref", combination_type=method,
                            density=density)
    return deltas(pm, "ref")


@pytest.mark.slow
@pytest.mark.parametrize("method,density,names", [
    ("linear", None, ("a", "b")), ("cat", None, ("a", "c8")), ("svd", None, ("a", "c8")),
    ("ties", 0.5, ("a", "b")), ("ties_svd", 0.5, ("a", "c8")), ("dare_linear", 0.7, ("a", "b")),
    ("dare_ties", 0.7, ("a", "b")), ("magnitude_prune", 0.6, ("a", "b")),
])
def test_each_method_equals_peft_and_the_result_loads_merges_and_generates(adapters, tmp_path, method, density,
                                                                           names):
    paths = [adapters[n] for n in names]
    out = combine.combine([str(p) for p in paths], [0.7, 0.4], method, density, out=tmp_path / "combined")
    assert out["method"] == method and out["parents"] == list(names) and out["weights"] == [0.7, 0.4]
    record = json.loads((tmp_path / "combined" / library.COMBINATION).read_text())
    assert record["method"] == method and record["density"] == density and len(record["parents"]) == 2
    ref = reference(paths, [0.7, 0.4], method, density)
    pm = PeftModel.from_pretrained(load_model("tiny-llama"), str(tmp_path / "combined"))
    ours = deltas(pm, "default")
    assert set(ours) == set(ref) and ref
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-6, worst
    assert any(v.abs().max() > 0 for v in ours.values())
    merged = pm.merge_and_unload()
    ids = torch.tensor([[256, 72, 105]])
    with torch.no_grad():
        gen = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=258)
    assert gen.shape[1] == 3 + 4


@pytest.mark.slow
def test_a_combination_merges_with_studio_merge_and_verifies(adapters, tmp_path):
    from studio.export.merge import merge

    combine.combine([str(adapters["a"]), str(adapters["b"])], [0.5, 0.5], "linear", out=tmp_path / "ab")
    rep = merge(model_dir("tiny-llama"), tmp_path / "ab", tmp_path / "merged", verify=True).to_dict()
    assert rep["differs_from_base"] and rep["max_abs_logit_diff"] < 1e-3


def test_methods_that_the_ranks_rule_out_are_named_with_the_ones_that_work(adapters):
    entries = [library.resolve(str(adapters[n])) for n in ("a", "c8")]
    why = combine.methods_for(entries)
    assert why["linear"] and "r = 4, 8" in why["linear"] and why["cat"] is None and why["svd"] is None
    with pytest.raises(AdapterError, match=r"linear: needs adapters of one rank; these have r = 4, 8; "
                                           r"methods that can: cat, svd, ties_svd"):
        combine.check(entries, [1, 1], "linear", None)


def test_adapters_of_different_bases_are_refused_naming_both(adapters, tmp_path):
    with pytest.raises(AdapterError, match=r"a was trained on .*tiny-llama.* but gpt2 on .*tiny-gpt2"):
        combine.combine([str(adapters["a"]), str(adapters["gpt2"])], [1, 1], "cat", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("weights,method,density,message", [
    ([1.0], "linear", None, "gives 1 weight"),
    ([1, 1], "ties", None, r"needs --density in \(0, 1\]"),
    ([1, 1], "dare_linear", 1.5, r"needs --density in \(0, 1\]"),
    ([1, 1], "linear", 0.5, "--density is used only by"),
    ([1, 1], "average", None, "--method 'average' is not one of: linear, cat, svd"),
])
def test_bad_combine_requests_are_refused_and_write_nothing(adapters, tmp_path, weights, method, density, message):
    with pytest.raises(AdapterError, match=message):
        combine.combine([str(adapters["a"]), str(adapters["b"])], weights, method, density, out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_cli_combine_exits_2_with_one_line(adapters, tmp_path, capsys):
    code = cli.main(["adapters", "combine", str(adapters["a"]), str(adapters["c8"]), "--weights", "1,1",
                     "--method", "dare_ties", "--density", "0.5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "methods that can: cat, svd, ties_svd" in err[0]


def test_import_checks_then_keeps_a_folder_and_lists_it(adapters, tmp_path):
    root = tmp_path / "runs"
    e = library.import_adapter(adapters["a"], "mine", root)
    assert e.origin == "imported" and e.r == 4 and Path(e.path).parent == root / library.LIBRARY
    listed = {x.name: x for x in library.entries(root)}
    assert listed["mine"].targets == ["q_proj", "v_proj"] and listed["mine"].size_bytes > 0
    assert library.resolve("mine", root).path == e.path
    with pytest.raises(AdapterError, match="already exists"):
        library.import_adapter(adapters["a"], "mine", root)


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("member,message", [
    ("../evil.json", "points outside the adapter folder"),
    ("adapter_model.bin", "is a pickle"),
    ("a/b/c.json", "nested"),
])
def test_import_refuses_pickles_and_path_traversal_in_zips(adapters, tmp_path, member, message):
    good = {p.name: p.read_bytes() for p in adapters["a"].iterdir() if p.is_file()}
    z = _zip(tmp_path / "bad.zip", {**good, member: b"{}"})
    with pytest.raises(AdapterError, match=message):
        library.import_adapter(z, "bad", tmp_path / "runs")
    lib = tmp_path / "runs" / library.LIBRARY
    assert not lib.exists() or list(lib.iterdir()) == []


def test_import_refuses_an_adapter_of_another_model(adapters, tmp_path):
    with pytest.raises(AdapterError, match="belongs to another model|does not have"):
        library.import_adapter(adapters["gpt2"], "wrong", tmp_path / "runs", base="tiny-llama")
