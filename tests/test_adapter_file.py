"""studio.adapters.file: AdapterFile reads what PEFT wrote, as PEFT itself holds it in memory.

Adapters are made by PEFT on the built-in tiny-llama and tiny-gpt2 (init_lora_weights=False, so
no factor is zero) and saved with save_pretrained; the reference for every factor, rank and
scaling is the PeftModel's own LoRA layer (`lora_A[...]`, `r[...]`, `scaling[...]`).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from studio.adapters.file import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, module_path, pickled_reason, present
from studio.errors import AdapterError, MergeError
from studio.models import load_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def save_adapter(tmp_path, model, **lora):
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    pm.save_pretrained(tmp_path / "adapter")
    return pm, AdapterFile(tmp_path / "adapter")


def peft_layers(pm) -> dict[str, LoraLayer]:
    return {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def assert_like_peft(pm, af: AdapterFile):
    layers = peft_layers(pm)
    assert set(af.modules) == set(layers)
    for path, layer in layers.items():
        m = af.module(path)
        A, B = af.factors(path)
        if m.embedding:
            want_a, want_b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            want_a, want_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(A, want_a.detach()) and torch.equal(B, want_b.detach()), path
        assert af.rank(path) == af.r(path) == layer.r["default"], path
        assert af.scaling(path) == pytest.approx(layer.scaling["default"], rel=1e-12), path
        assert af.delta_shape(path) == (B.shape[0], A.shape[1])
    return layers


def test_llama_rank_alpha_patterns_rslora_and_lora_bias(tmp_path):
    pm, af = save_adapter(tmp_path, load_model("tiny-llama"), r=4, lora_alpha=8, use_rslora=True, lora_bias=True,
                          target_modules=["q_proj", "v_proj", "o_proj"],
                          # PEFT's pattern rule: a dotted suffix or a regex of the module path
                          rank_pattern={"1.self_attn.q_proj": 2, r"layers\.0\.self_attn\.v_proj": 6},
                          alpha_pattern={"o_proj": 3})
    layers = assert_like_peft(pm, af)
    assert af.rank("model.layers.1.self_attn.q_proj") == 2 and af.rank("model.layers.0.self_attn.q_proj") == 4
    assert af.rank("model.layers.0.self_attn.v_proj") == 6 and af.alpha("model.layers.1.self_attn.o_proj") == 3
    assert af.scaling("model.layers.0.self_attn.q_proj") == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert not af.module("model.layers.0.self_attn.q_proj").embedding
    bias_key = af.module("model.layers.0.self_attn.q_proj").b_bias_key
    assert bias_key and torch.equal(af.tensor(bias_key),
                                    layers["model.layers.0.self_attn.q_proj"].lora_B["default"].bias.detach())
    layer_numbers = [int(p.split(".")[2]) for p in af.modules]
    assert layer_numbers == sorted(layer_numbers)  # model order, not the file's alphabetical one
    assert af.replacements == {} and af.head() is None and af.task_type is None
    af.check_mergeable()
    assert present(af.dir) and pickled_reason(af.dir) is None
    assert module_path("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"


def test_llama_seq_cls_dora_and_modules_to_save_head(tmp_path):
    model = load_model("tiny-llama", "seq_cls", num_labels=3)
    pm, af = save_adapter(tmp_path, model, r=4, lora_alpha=16, use_dora=True, task_type="SEQ_CLS",
                          target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    layers = assert_like_peft(pm, af)
    for path, layer in layers.items():
        key = af.module(path).magnitude_key
        assert key and torch.equal(af.tensor(key), layer.lora_magnitude_vector["default"].weight.detach())
    assert af.task_type == "SEQ_CLS" and set(af.replacements) == {"score.weight"}
    trained = pm.get_base_model().score.modules_to_save["default"].weight.detach()
    assert torch.equal(af.tensor(af.head()), trained) and af.head_size() == 3
    af.check_mergeable()


def test_gpt2_conv1d_and_embedding(tmp_path):
    pm, af = save_adapter(tmp_path, load_model("tiny-gpt2"), r=4, lora_alpha=32, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "wte"], alpha_pattern={"h.1.attn.c_attn": 4})
    assert_like_peft(pm, af)
    assert af.module("transformer.wte").embedding
    assert af.scaling("transformer.h.1.attn.c_attn") == 1.0 and af.scaling("transformer.h.0.attn.c_attn") == 8.0
    assert af.is_matrix("transformer.h.0.attn.c_attn")


def test_names_are_peft_own():
    from peft.utils.constants import CONFIG_NAME as PEFT_CONFIG
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

    assert (CONFIG_NAME, WEIGHTS_NAME) == (PEFT_CONFIG, SAFETENSORS_WEIGHTS_NAME)


# --- refusals ---------------------------------------------------------------------------------

def write(folder, config: dict | str | None, tensors: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / WEIGHTS_NAME))
    return folder


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
P = "base_model.model.m.q."
PAIR = {P + "lora_A.weight": torch.ones(2, 3), P + "lora_B.weight": torch.ones(5, 2)}


def test_pickle_only_is_refused_by_name_never_opened(tmp_path):
    d = write(tmp_path / "a", GOOD)
    (d / "adapter_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(AdapterError, match=r"holds only a pickled adapter_model\.bin; pickles are never loaded"):
        AdapterFile(d)
    assert "adapter_model.bin" in pickled_reason(d)
    with pytest.raises(MergeError, match="pickled"):  # the caller's own kind
        AdapterFile(d, error=MergeError)


@pytest.mark.parametrize("config, tensors, match", [
    (None, PAIR, rf"adapter config .*{CONFIG_NAME} does not exist"),
    ("{not json", PAIR, "not valid JSON"),
    ("[1, 2]", PAIR, "expected a JSON object"),
    (GOOD, None, f"has no {WEIGHTS_NAME}"),
    (GOOD, {"m.q.lora_A.weight": torch.ones(2, 3)}, r"tensor m\.q\.lora_A\.weight does not start with 'base_model\.model\.'"),
    (GOOD, {P + "lora_A.weight": torch.ones(2, 3)}, r"module m\.q has A but no lora_B; the adapter file is incomplete"),
    (GOOD, {P + "lora_A.weight": torch.ones(2, 3), P + "lora_B.weight": torch.ones(5, 3)}, "has rank 2 but"),
])
def test_broken_adapters_are_named(tmp_path, config, tensors, match):
    write(tmp_path / "a", config, tensors)
    with pytest.raises(AdapterError, match=match):
        AdapterFile(tmp_path / "a")


@pytest.mark.parametrize("extra, match", [
    ({"peft_type": "IA3"}, "peft_type = 'IA3'; only LORA adapters can be merged"),
    ({"use_qalora": True}, "use_qalora = True; QALoRA cannot be merged"),
    ({"trainable_token_indices": [1]}, "trainable tokens cannot be merged"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights = 'pissa_niter_4' changes the base weights"),
])
def test_unmergeable_settings_are_named(tmp_path, extra, match):
    af = AdapterFile(write(tmp_path / "a", {**GOOD, **extra}, PAIR), error=MergeError)
    with pytest.raises(MergeError, match=match):
        af.check_mergeable()


def test_unknown_factor_and_rank_disagreement(tmp_path):
    af = AdapterFile(write(tmp_path / "a", GOOD, {**PAIR, P + "lora_X.weight": torch.ones(1)}))
    assert set(af.modules) == {"m.q"}
    with pytest.raises(AdapterError, match=r"lora_X\.weight is not a LoRA factor this merge knows"):
        af.check_mergeable()
    af = AdapterFile(write(tmp_path / "b", {**GOOD, "rank_pattern": {"q": 3}}, PAIR))
    with pytest.raises(AdapterError, match=r"gives r = 3 for m\.q but .*lora_A\.weight has rank 2"):
        af.scaling("m.q")
    with pytest.raises(AdapterError, match="'m.k' is not in the adapter"):
        af.factors("m.k")
