"""studio.analysis: the LoRA paper's section 7 measurements against direct dense computations.

Adapters are written by hand as safetensors files (keys in PEFT's layout) so every factor is
known; the references form delta W densely and take np.linalg.svd of it, which the module
itself avoids. Base models are hand-made folders, plus the built-in tiny-gpt2 for Conv1D.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from studio.analysis import AnalysisError, amplification, spectrum, subspace_similarity
from studio.config import RunConfig

PREFIX = "base_model.model."


def write_adapter(folder: Path, factors: dict, r: int, lora_alpha: float = 16, **config) -> Path:
    """factors: {module path: (A, B)} as numpy arrays; returns the adapter folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(A, dtype=np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(B, dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": False, "rank_pattern": {},
           "alpha_pattern": {}, "fan_in_fan_out": False, "target_modules": sorted({m.split(".")[-1] for m in factors}),
           "base_model_name_or_path": None, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def write_base(folder: Path, weights: dict, shards: int = 1) -> Path:
    """A model folder with config.json and the given weights, in one file or several with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-real-model", "tie_word_embeddings": False}))
    names = sorted(weights)
    if shards == 1:
        save_file({n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def dense_amplification(W: np.ndarray, delta: np.ndarray, r: int, seed: int = 0) -> dict:
    """The paper's Table 7 numbers straight from the definitions (W, delta in out x in)."""
    W, delta = W.astype(np.float64), delta.astype(np.float64)
    U, s, Vh = np.linalg.svd(delta)
    U, V = U[:, :r], Vh[:r].T
    proj = np.linalg.norm(U.T @ W @ V)
    gen = torch.Generator().manual_seed(seed)  # the module's random projection, same seed and draw order
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=gen, dtype=torch.float64)).Q.numpy()
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=gen, dtype=torch.float64)).Q.numpy()
    rproj = np.linalg.norm(Ur.T @ W @ Vr)
    dn = np.linalg.norm(delta)
    return {"delta_w_norm": dn, "w_norm": np.linalg.norm(W), "projected_w_norm": proj, "amplification": dn / proj,
            "random_projected_w_norm": rproj, "random_amplification": dn / rproj}


def assert_close_rel(got: dict, want: dict, tol: float = 1e-5):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=tol, abs=1e-9), k


# --- subspace similarity ------------------------------------------------------------------

def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal(tmp_path):
    rng = np.random.default_rng(0)
    mods = {"model.layers.0.self_attn.q_proj": (rand(rng, 8, 64), rand(rng, 48, 8)),
            "model.layers.0.self_attn.v_proj": (rand(rng, 8, 64), rand(rng, 32, 8))}
    a = write_adapter(tmp_path / "a", mods, r=8)
    for which in ("A", "B", "dW"):
        res = subspace_similarity(a, a, which=which)
        phi = np.array(res["phi"])
        assert phi.shape == (8, 8) and res["module"] == "model.layers.0.self_attn.q_proj"
        assert np.abs(np.diag(phi) - 1).max() < 1e-6
        assert phi.min() >= 0 and phi.max() <= 1
        # Identical subspaces: for i < j the first i directions lie inside the first j.
        assert np.abs(phi - 1).max() < 1e-6
        assert res["summary"]["modules"] == 2 and abs(res["summary"]["phi_1_1_mean"] - 1) < 1e-6
    assert subspace_similarity(a, a, module="v_proj")["module"] == "model.layers.0.self_attn.v_proj"


@pytest.mark.slow
def test_phi_of_independent_random_subspaces_is_near_max_i_j_over_d(tmp_path):
    # E ||P_i P_j||_F^2 = i j / d for independent random subspaces, so E phi = max(i, j) / d.
    # One draw scatters (200 seeds: worst cell off by 0.065, grid mean off by up to 25%), so a
    # single pair is held to 0.08 per cell and the mean over 16 pairs to 10% of the grid mean.
    d, r1, r2 = 512, 8, 64
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    expect = np.maximum(i, j) / d
    grids = []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        m = "model.layers.0.mlp.up_proj"
        a = write_adapter(tmp_path / f"a{seed}", {m: (rand(rng, r1, d), rand(rng, 16, r1))}, r=r1)
        b = write_adapter(tmp_path / f"b{seed}", {m: (rand(rng, r2, d), rand(rng, 16, r2))}, r=r2)
        res = subspace_similarity(a, b, which="A")
        assert (res["r1"], res["r2"], res["dim"]) == (r1, r2, d)
        assert res["baseline"] == expect.tolist()
        grids.append(np.array(res["phi"]))
    assert np.abs(grids[0] - expect).max() < 0.08
    mean = np.mean(grids, axis=0)
    assert abs(mean.mean() / expect.mean() - 1) < 0.10
    assert np.abs(mean - expect).max() < 0.03


def test_phi_matches_the_definition(tmp_path):
    rng = np.random.default_rng(3)
    m = "h.0.attn"
    A1, A2 = rand(rng, 4, 40), rand(rng, 6, 40)
    A2[:2] += 3 * A1[:2]  # some shared directions so phi is not just noise
    a = write_adapter(tmp_path / "a", {m: (A1, rand(rng, 8, 4))}, r=4)
    b = write_adapter(tmp_path / "b", {m: (A2, rand(rng, 8, 6))}, r=6)
    U1 = np.linalg.svd(A1.astype(np.float64))[2].T
    U2 = np.linalg.svd(A2.astype(np.float64))[2].T
    want = np.array([[np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j) for j in range(1, 7)] for i in range(1, 5)])
    assert np.abs(np.array(subspace_similarity(a, b, which="A")["phi"]) - want).max() < 1e-6


def test_subspace_errors_name_the_module(tmp_path):
    rng = np.random.default_rng(1)
    a = write_adapter(tmp_path / "a", {"m.q_proj": (rand(rng, 4, 16), rand(rng, 8, 4)),
                                       "m.k_proj": (rand(rng, 4, 16), rand(rng, 8, 4))}, r=4)
    b = write_adapter(tmp_path / "b", {"m.q_proj": (rand(rng, 4, 20), rand(rng, 8, 4))}, r=4)
    c = write_adapter(tmp_path / "c", {"m.v_proj": (rand(rng, 4, 16), rand(rng, 8, 4))}, r=4)
    with pytest.raises(AnalysisError, match=r"m\.q_proj.*in = 16 .* but 20"):
        subspace_similarity(a, b, which="A")
    subspace_similarity(a, b, which="B")  # the output side does match
    with pytest.raises(AnalysisError, match=r"'k_proj' is not in both adapters: missing from .*b"):
        subspace_similarity(a, b, module="k_proj", which="B")
    with pytest.raises(AnalysisError, match="share no module"):
        subspace_similarity(a, c, which="A")
    with pytest.raises(AnalysisError, match="which"):
        subspace_similarity(a, a, which="C")
    with pytest.raises(AnalysisError, match="neither adapter_config.json"):
        subspace_similarity(tmp_path, a)


# --- spectrum -----------------------------------------------------------------------------

def test_spectrum_equals_svd_of_dense_delta(tmp_path):
    rng = np.random.default_rng(2)
    mods = {"model.layers.0.self_attn.q_proj": (rand(rng, 8, 96), rand(rng, 80, 8)),
            "model.layers.0.self_attn.v_proj": (rand(rng, 4, 96), rand(rng, 32, 4)),
            "model.layers.0.mlp.down_proj": (rand(rng, 8, 6), rand(rng, 5, 8))}  # r > out and in
    a = write_adapter(tmp_path / "a", mods, r=8, lora_alpha=16, use_rslora=True,
                      rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 3.0})
    res = {row["module"]: row for row in spectrum(a)}
    assert sorted(res) == sorted(mods)
    for m, (A, B) in mods.items():
        r = A.shape[0]
        alpha = 3.0 if m.endswith("v_proj") else 16
        scaling = alpha / math.sqrt(r)
        delta = scaling * B.astype(np.float64) @ A.astype(np.float64)
        s = np.linalg.svd(delta, compute_uv=False)
        row = res[m]
        assert row["scaling"] == pytest.approx(scaling) and row["r"] == r and row["shape"] == list(delta.shape)
        k = min(r, *delta.shape)
        assert len(row["singular_values"]) == k
        assert np.abs(np.array(row["singular_values"]) - s[:k]).max() < 1e-6 * s[0]
        assert row["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        assert 1 <= row["entropy_rank"] <= k + 1e-9 and 1 <= row["energy_rank_90"] <= k


def test_spectrum_rank_measures(tmp_path):
    rng = np.random.default_rng(4)
    A = rand(rng, 8, 64)
    B = np.zeros((64, 8), np.float32)
    B[:, :2] = rand(rng, 64, 2)  # a rank-2 update from an r = 8 adapter
    a = write_adapter(tmp_path / "a", {"x.10.q": (A, B), "x.2.k": (A, np.zeros((64, 8), np.float32))}, r=8)
    untrained, used = spectrum(a)  # model order: layer 2 before layer 10
    assert (untrained["module"], used["module"]) == ("x.2.k", "x.10.q")
    assert used["numerical_rank"] == 2 and used["energy_rank_90"] <= 2 and used["entropy_rank"] <= 2 + 1e-9
    assert max(used["singular_values"][2:]) < 1e-9 * used["singular_values"][0]
    assert untrained["fro_norm"] == 0 and untrained["numerical_rank"] == 0 and untrained["energy_rank_90"] == 0
    assert [row["module"] for row in spectrum(a, modules=["k"])] == ["x.2.k"]
    with pytest.raises(AnalysisError, match="'v_proj' is not in the adapter"):
        spectrum(a, modules="v_proj")


# --- amplification ------------------------------------------------------------------------

def test_amplification_equals_dense_numpy(tmp_path):
    rng = np.random.default_rng(5)
    weights = {"model.layers.0.self_attn.q_proj.weight": rand(rng, 40, 24),
               "model.layers.0.self_attn.o_proj.weight": rand(rng, 24, 40),
               "model.layers.0.input_layernorm.weight": rand(rng, 24)}
    base = write_base(tmp_path / "base", weights, shards=2)
    mods = {"model.layers.0.self_attn.q_proj": (rand(rng, 4, 24), rand(rng, 40, 4)),
            "model.layers.0.self_attn.o_proj": (rand(rng, 4, 40), rand(rng, 24, 4))}
    # A run folder: the base comes from config.yaml.
    run = tmp_path / "run"
    write_adapter(run / "adapter", mods, r=4, lora_alpha=8)
    RunConfig.from_dict({"model": {"name_or_path": str(base)}}).save(run / "config.yaml")
    rows = {row["module"]: row for row in amplification(run)}
    assert sorted(rows) == sorted(mods)
    for m, (A, B) in mods.items():
        row = rows[m]
        W = weights[m + ".weight"]
        want = dense_amplification(W, 2.0 * B.astype(np.float64) @ A.astype(np.float64), 4)
        assert_close_rel(row, want)
        assert row["kind"] == "linear" and row["base_tensor"] == m + ".weight" and row["r"] == 4
    # The adapter folder alone, with the base passed in, gives the same numbers.
    assert amplification(run / "adapter", base=str(base)) == list(rows.values())


def test_amplification_of_a_strong_update_in_a_direction_of_w(tmp_path):
    # delta W along W's top direction amplifies little; along W's weakest it amplifies a lot.
    rng = np.random.default_rng(6)
    U, _, Vh = np.linalg.svd(rng.standard_normal((32, 32)))
    W = (U * np.linspace(10, 0.01, 32)) @ Vh
    base = write_base(tmp_path / "base", {"m.fc.weight": W})
    top = write_adapter(tmp_path / "top", {"m.fc": (Vh[:1], U[:, :1])}, r=1, lora_alpha=1)
    low = write_adapter(tmp_path / "low", {"m.fc": (Vh[-1:], U[:, -1:])}, r=1, lora_alpha=1)
    a_top = amplification(top, base=str(base))[0]["amplification"]
    a_low = amplification(low, base=str(base))[0]["amplification"]
    assert a_top == pytest.approx(0.1, rel=1e-5) and a_low == pytest.approx(100, rel=1e-3)


def test_amplification_errors(tmp_path):
    rng = np.random.default_rng(7)
    base = write_base(tmp_path / "base", {"m.fc.weight": rand(rng, 16, 12)})
    wrong_shape = write_adapter(tmp_path / "a", {"m.fc": (rand(rng, 2, 10), rand(rng, 16, 2))}, r=2)
    with pytest.raises(AnalysisError, match=r"m\.fc: the update B @ A is 16 x 10 but base tensor m\.fc\.weight .* is 16 x 12"):
        amplification(wrong_shape, base=str(base))
    missing = write_adapter(tmp_path / "b", {"m.other": (rand(rng, 2, 12), rand(rng, 16, 2))}, r=2)
    with pytest.raises(AnalysisError, match=r"module m\.other: the base model .* has no tensor m\.other\.weight"):
        amplification(missing, base=str(base))
    with pytest.raises(AnalysisError, match="names no base model"):
        amplification(missing)


@pytest.mark.slow
def test_gpt2_conv1d_orientation(tmp_path):
    """GPT-2 stores Conv1D weights as in x out; PEFT's factors are still A: r x in, B: out x r.

    c_attn (192 -> 576) shows its orientation by shape; c_proj is square, so the module's class
    decides, even when the saved fan_in_fan_out flag is stale (False here).
    """
    from safetensors import safe_open

    from studio.models import model_dir

    base = model_dir("tiny-gpt2")
    with safe_open(str(base / "model.safetensors"), "np") as f:
        stored = {n: f.get_tensor(f"transformer.h.0.attn.{n}.weight") for n in ("c_attn", "c_proj")}
    assert stored["c_attn"].shape == (192, 576)
    rng = np.random.default_rng(8)
    mods = {"transformer.h.0.attn.c_attn": (rand(rng, 4, 192), rand(rng, 576, 4)),
            "transformer.h.0.attn.c_proj": (rand(rng, 4, 192), rand(rng, 192, 4))}
    a = write_adapter(tmp_path / "a", mods, r=4, lora_alpha=8, fan_in_fan_out=False)
    rows = {row["module"]: row for row in amplification(a, base="tiny-gpt2")}
    for m, (A, B) in mods.items():
        row = rows[m]
        W = stored[m.rsplit(".", 1)[1]].T  # Linear orientation: out x in
        want = dense_amplification(W, 2.0 * B.astype(np.float64) @ A.astype(np.float64), 4)
        assert row["kind"] == "conv1d" and row["shape"] == list(W.shape)
        assert_close_rel(row, want)


# --- the random baseline, delta W, and how far A moved ----------------------------------------

def test_random_baseline_is_the_expected_phi_of_random_subspaces():
    """random_baseline is an expectation, computed: Haar-random subspaces (QR of Gaussian matrices)
    average to it, cell by cell."""
    from studio.analysis import random_baseline

    d, r1, r2, n = 24, 3, 6, 3000
    rng = np.random.default_rng(0)
    acc = np.zeros((r1, r2))
    for _ in range(n):
        u1 = np.linalg.qr(rng.standard_normal((d, r1)))[0]
        u2 = np.linalg.qr(rng.standard_normal((d, r2)))[0]
        energy = np.cumsum(np.cumsum((u1.T @ u2) ** 2, 0), 1)
        acc += energy / np.minimum(np.arange(1, r1 + 1)[:, None], np.arange(1, r2 + 1)[None, :])
    base = np.array(random_baseline(d, r1, r2))
    assert base[0, 0] == 1 / d and base[-1, -1] == max(r1, r2) / d
    assert np.abs(acc / n - base).max() < 0.01  # the Monte Carlo error at n = 3000 is about 0.003


def test_delta_w_similarity_uses_its_left_singular_vectors(tmp_path):
    rng = np.random.default_rng(4)
    m = "h.0.attn"
    A1, B1, A2, B2 = rand(rng, 4, 30), rand(rng, 20, 4), rand(rng, 6, 30), rand(rng, 20, 6)
    a = write_adapter(tmp_path / "a", {m: (A1, B1)}, r=4, lora_alpha=8)
    b = write_adapter(tmp_path / "b", {m: (A2, B2)}, r=6, lora_alpha=3)
    U1 = np.linalg.svd(2.0 * B1.astype(np.float64) @ A1.astype(np.float64))[0][:, :4]
    U2 = np.linalg.svd(0.5 * B2.astype(np.float64) @ A2.astype(np.float64))[0][:, :6]
    want = np.array([[np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j) for j in range(1, 7)] for i in range(1, 5)])
    res = subspace_similarity(a, b)  # the default: what the update learned
    assert res["which"] == "dW" and res["dim"] == 20
    assert np.abs(np.array(res["phi"]) - want).max() < 1e-6
    assert res["baseline"][0][0] == pytest.approx(1 / 20) and res["summary"]["baseline_1_1_mean"] == pytest.approx(1 / 20)


def _train(root: Path, name: str, r: int, lr: float, steps: int) -> Path:
    import contextlib
    import io

    from studio.runs import trainer

    words = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
    data = root / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]})
                                + "\n" for w in words * 8))
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(data), "eval_fraction": 0.0, "max_length": 64, "packing": True},
        "lora": {"target_modules": ["q_proj", "v_proj"], "r": r, "lora_alpha": 2 * r},
        "train": {"max_steps": steps, "per_device_train_batch_size": 4, "learning_rate": lr, "warmup_ratio": 0.0,
                  "eval_steps": 1000, "save_steps": 1000, "seed": 5 + r}})
    run = root / name
    run.mkdir()
    cfg.save(run / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert trainer.train(run, False, trainer.Reporter(run, True)) == "completed"
    return run


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """tiny-llama runs on q/v: two short ones at the default learning rate (r=4, r=16), one longer and hotter."""
    root = tmp_path_factory.mktemp("analysis-runs")
    return {"short4": _train(root, "short4", 4, 2e-4, 6), "short16": _train(root, "short16", 16, 2e-4, 6),
            "long": _train(root, "long", 4, 3e-2, 40)}


@pytest.mark.slow
def test_initial_lora_a_is_re_created_exactly_as_the_trainer_drew_it(tiny_runs, tmp_path):
    """The trainer's own build (seed, base model, get_peft_model) gives the very A that init_distance
    re-creates: distance 0 from an adapter saved before any step."""
    import contextlib
    import io
    import shutil

    from studio.analysis import _initial_lora_a, init_distance
    from studio.runs import trainer
    from studio.runs.rundir import RunDir

    run = tmp_path / "fresh"
    shutil.copytree(tiny_runs["short4"], run)
    cfg = __import__("studio.config", fromlist=["load_config"]).load_config(run / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        built, _ = trainer.build(cfg, run, trainer.Reporter(run, False))
    built.model.save_pretrained(run / "adapter")  # the adapter at step 0
    res = init_distance(run)
    assert res["mean"] == 0.0 and res["max"] == 0.0 and res["close"] and len(res["modules"]) == 8
    again = _initial_lora_a(RunDir(run), cfg)
    assert len(again) == 8 and all(t.shape == (4, 192) for t in again.values())


@pytest.mark.slow
def test_short_runs_leave_a_near_its_initialisation_and_the_tab_says_so(tiny_runs):
    from studio.analysis import INIT_CLOSE, init_distance
    from studio.ui.tabs import analysis as tab

    short, long_ = init_distance(tiny_runs["short4"]), init_distance(tiny_runs["long"])
    print(f"lora_A moved: 6 steps at 2e-4 {short['mean']:.4f}, 40 steps at 3e-2 {long_['mean']:.4f}")
    assert 0 < short["mean"] < INIT_CLOSE and short["close"]
    assert long_["mean"] > INIT_CLOSE and not long_["close"]
    root = tiny_runs["short4"].parent
    fig, text = tab.subspace(root, "short4", "short16", None, "A")
    assert [t.name for t in fig.data] == ["φ", "random baseline"]
    assert list(map(list, fig.data[1].z)) == __import__("studio.analysis", fromlist=["x"]).random_baseline(192, 4, 16)
    assert "lora_A of <b>short4</b> moved" in text and "still close to its initialisation" in text
    assert "compare ΔW or B instead" in text and "against <b>0.0052</b> for random subspaces" in text
    fig, text = tab.subspace(root, "short4", "long", None, "dW")  # the default: no init note (nothing loads)
    assert "moved" not in text and fig.data[1].z[0][0] == pytest.approx(1 / 192)
