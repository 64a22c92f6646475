"""The analytic count must equal PEFT's own count, exactly, on every architecture."""

import pytest
import torch
from peft import get_peft_model

from studio import lora, models
from studio.config import LoraSettings
from studio.models.tree import build_tree, model_tree

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
# Architectures beyond the presets, from small configs: fused qkv, Conv1D, encoder-decoder, MoE, biases.
EXTRA_ARCHS = {
    "phi3": dict(SMALL, num_key_value_heads=4, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300),
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=300),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                word_embed_proj_dim=64),
    "gpt_neox": dict(SMALL),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "gemma2": dict(SMALL, num_key_value_heads=2, head_dim=16),
    "mixtral": dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=300),
    "bert": dict(SMALL),
}

VARIANTS = [
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", bias="all", use_dora=True),
    # PEFT refuses layers_to_transform with a string target, so name the layer types instead
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "query", "value", "dense", "c_attn", "c_fc",
                         "fc1", "q", "wo", "query_key_value", "qkv_proj", "gate_up_proj", "down_proj", "q_lin"],
         bias="lora_only", layers_to_transform=[1]),
    dict(target_modules=r".*\.(0|1)\..*(proj|dense|fc\w*|query|key|value|c_attn|wo)", r=3, use_rslora=True),
]


def peft_counts(model, settings: LoraSettings, task: str) -> tuple[int, int]:
    cfg = lora.build_lora_config(settings, task)
    if task == "causal_lm" and not hasattr(model, "prepare_inputs_for_generation"):
        cfg.task_type = None  # encoders: PEFT's generic wrapper; matching and counting are the same
    return get_peft_model(model, cfg).get_nb_trainable_parameters()


def assert_same_as_peft(model_factory, settings: LoraSettings, task: str, name: str = "m"):
    tree = build_tree(model_factory(), name, task, model_factory)
    try:
        trainable, total = peft_counts(model_factory(), settings, task)
    except (ValueError, TypeError):  # PEFT refuses: the studio must refuse too, not show a number
        with pytest.raises(lora.TargetError):
            lora.check(tree, settings)
        return None
    ours = lora.count(tree, settings)  # (check() would refuse the names that match nothing here)
    assert ours.matched_modules
    assert (ours.trainable, ours.total) == (trainable, total)
    return ours


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(models.presets()))
def test_count_equals_peft_on_every_preset(preset):
    task = models.resolve(preset).default_task
    for kw in (dict(target_modules="all-linear", r=16), dict(target_modules="all-linear", r=4, use_dora=True)):
        assert_same_as_peft(lambda: models.build_meta_model(preset, task), LoraSettings(**kw), task, preset)


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2", "minilm-l6"])
@pytest.mark.parametrize("kw", VARIANTS + [dict(target_modules=["q_proj", "v_proj", "c_attn", "query", "value"],
                                                rank_pattern={"v_proj": 2, "value": 2, "c_attn": 5},
                                                alpha_pattern={"q_proj": 3})])
def test_count_equals_peft_on_builtins(ref, kw):
    task = models.resolve(ref).default_task
    assert_same_as_peft(lambda: models.build_meta_model(ref, task), LoraSettings(**kw), task, ref)


@pytest.mark.parametrize("arch", sorted(EXTRA_ARCHS))
@pytest.mark.parametrize("kw", VARIANTS)
def test_count_equals_peft_on_other_architectures(arch, kw):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, **EXTRA_ARCHS[arch])
    cls = models.model_class(config, "causal_lm")

    def factory():
        with torch.device("meta"):
            return cls._from_config(config)

    assert_same_as_peft(factory, LoraSettings(**kw), "causal_lm", arch)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "qwen2"])
def test_seq_cls_head_is_counted_like_peft(arch):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch, **EXTRA_ARCHS[arch], num_labels=3)
    if arch in ("gpt2", "qwen2"):
        config.pad_token_id = 0
    cls = models.model_class(config, "seq_cls")

    def factory():
        with torch.device("meta"):
            return cls._from_config(config)

    for kw in (dict(target_modules="all-linear", exclude_modules=["pre_classifier"]),
               dict(target_modules="all-linear", bias="all", exclude_modules=["pre_classifier"]),
               dict(target_modules="all-linear", modules_to_save=["embeddings.word_embeddings", "wte"],
                    exclude_modules=["pre_classifier"])):
        ours = assert_same_as_peft(factory, LoraSettings(**kw), "seq_cls", arch)
        assert ours.modules_to_save  # the fresh head trains in full


def test_modules_to_save_conflict_is_refused_like_peft():
    from transformers import AutoConfig

    config = AutoConfig.for_model("distilbert", **EXTRA_ARCHS["distilbert"], num_labels=2)
    cls = models.model_class(config, "seq_cls")

    def factory():
        with torch.device("meta"):
            return cls._from_config(config)

    with pytest.raises(TypeError):  # PEFT's own failure on DistilBERT + all-linear + seq_cls
        peft_counts(factory(), LoraSettings(target_modules="all-linear"), "seq_cls")
    with pytest.raises(lora.TargetError, match="pre_classifier would get LoRA.*exclude_modules"):
        lora.check(build_tree(factory(), "distilbert", "seq_cls", factory), LoraSettings(target_modules="all-linear"))


def test_matching_follows_peft_suffix_rule_not_substring():
    tree = model_tree("tiny-llama")
    res = lora.resolve_targets(tree, LoraSettings(target_modules=["proj"]))
    assert res.matched == [] and res.unmatched_targets == ["proj"]  # 'proj' is no dotted suffix of q_proj
    res = lora.resolve_targets(tree, LoraSettings(target_modules=["self_attn.q_proj"]))
    assert len(res.matched) == 4 and all(p.endswith("self_attn.q_proj") for p in res.matched)
    res = lora.resolve_targets(tree, LoraSettings(target_modules=r"re:.*layers\.[01]\.mlp\.down_proj"))
    assert res.matched == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_unmatched_targets_are_named_with_nearest_real_names():
    tree = model_tree("tiny-llama")
    with pytest.raises(lora.TargetError) as e:
        lora.check(tree, LoraSettings(target_modules=["q_proj", "vproj", "query"]))
    msg = str(e.value)
    assert "'vproj' (closest: v_proj" in msg and "'query'" in msg and "'q_proj'" not in msg


def test_targets_lora_cannot_wrap_are_refused():
    tree = model_tree("tiny-llama")
    with pytest.raises(lora.TargetError, match="LoRA cannot wrap.*LlamaMLP"):
        lora.check(tree, LoraSettings(target_modules=["mlp"]))


def test_layers_filter_that_excludes_everything_reports_the_target():
    tree = model_tree("tiny-llama")
    res = lora.resolve_targets(tree, LoraSettings(target_modules=["q_proj"], layers_to_transform=[99]))
    assert res.matched == [] and res.unmatched_targets == ["q_proj"]


def test_breakdowns_add_up_and_sizes_follow_dtype():
    tree = model_tree("llama-3.1-8b")
    c = lora.count(tree, LoraSettings(r=16, target_modules=["q_proj", "v_proj"]))
    # q: 16*(4096+4096), v: 16*(4096+1024), 32 layers
    assert c.trainable == 32 * (16 * 8192 + 16 * 5120)
    assert sum(c.by_type.values()) == c.trainable == sum(c.by_layer.values())
    assert list(c.by_layer) == [str(i) for i in range(32)]
    assert c.adapter_mb["float32"] == pytest.approx(c.trainable * 4 / 2**20, abs=1e-3)
    assert c.adapter_mb["bfloat16"] == pytest.approx(c.adapter_mb["float32"] / 2, abs=1e-3)


@pytest.mark.slow
def test_sweep_covers_ranks_and_target_sets_and_grows_linearly_in_r():
    tree = model_tree("llama-3.1-70b")
    rows = lora.sweep(tree, LoraSettings())
    sets = {r["targets"] for r in rows}
    assert sets == {"q+v", "attention", "mlp", "all-linear"}
    qv = {r["r"]: r["trainable"] for r in rows if r["targets"] == "q+v"}
    assert sorted(qv) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert qv[128] == 128 * qv[1]
    assert lora.target_sets(model_tree("tiny-gpt2"))["q+v"] == ["attn.c_attn"]


def test_lora_config_handed_to_peft_keeps_user_modules_to_save():
    cfg = lora.build_lora_config(LoraSettings(modules_to_save=["lm_head"]), "causal_lm")
    assert cfg.modules_to_save == ["lm_head"]
    cfg = lora.build_lora_config(LoraSettings(), "seq_cls")
    assert cfg.modules_to_save is None and cfg.task_type == "SEQ_CLS"  # PEFT adds its head itself


def test_layers_beyond_the_model_are_refused_with_the_layers_it_has():
    tree = model_tree("tiny-llama")
    s = LoraSettings(layers_to_transform="0-9")
    s.validate()
    with pytest.raises(lora.TargetError, match=r"tiny-llama has layers 0-3; 4-9 do not exist"):
        lora.check(tree, s)
    ok = LoraSettings(layers_to_transform="2-3")
    ok.validate()
    assert lora.check(tree, ok).matched_modules == [f"model.layers.{i}.self_attn.{p}" for i in (2, 3)
                                                    for p in ("q_proj", "v_proj")]
