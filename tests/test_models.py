import pytest
import torch

from studio import models
from studio.models import ModelRefError


def test_tiny_llama_is_small_deterministic_and_offline():
    a = models.load_model("tiny-llama")
    b = models.load_model("tiny-llama")
    n = sum(p.numel() for p in a.parameters())
    assert 1_000_000 <= n <= 5_000_000
    assert type(a).__name__ == "LlamaForCausalLM"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    folder = models.model_dir("tiny-llama")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.glob("*.bin"))


def test_builtin_is_rebuilt_identically_from_its_recipe(tmp_path, monkeypatch):
    first = models.load_model("tiny-llama").state_dict()
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path))
    again = models.load_model("tiny-llama").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_byte_tokenizer_round_trips_any_text():
    tok = models.load_tokenizer("tiny-llama")
    text = "Grüße, 世界! tabs\tand\nnewlines 🙂"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(tok) == 259 and tok.pad_token_id == 258 and tok.eos_token_id == 257
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")


def test_tiny_gpt2_uses_conv1d_and_tied_embeddings():
    from transformers.pytorch_utils import Conv1D

    m = models.load_model("tiny-gpt2")
    assert isinstance(m.transformer.h[0].attn.c_attn, Conv1D)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


def test_minilm_is_the_real_pretrained_encoder():
    m = models.load_model("minilm-l6", "seq_cls", num_labels=2)
    assert type(m).__name__ == "BertForSequenceClassification"
    tok = models.load_tokenizer("minilm-l6")
    out = m.bert(**tok(["a cat sits", "a dog runs"], return_tensors="pt", padding=True)).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()
    # pretrained, not random: two related sentences have strongly correlated embeddings
    sim = torch.nn.functional.cosine_similarity(out[0, 0], out[1, 0], dim=0)
    assert sim > 0.5


@pytest.mark.parametrize("preset", sorted(models.presets()))
def test_every_preset_builds_on_meta_without_weights(preset):
    m = models.build_meta_model(preset)
    p = next(m.parameters())
    assert p.device.type == "meta"
    assert models.resolve(preset).explore_only


def test_preset_parameter_counts_match_the_published_figures():
    expected = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-405b": 405_853_388_800, "qwen2.5-0.5b": 494_032_768,
                "gemma-2-9b": 9_241_705_984, "gpt2": 124_439_808}
    for name, n in expected.items():
        m = models.build_meta_model(name)
        assert sum(p.numel() for p in m.parameters()) == n, name


def test_config_only_folder_is_explore_only(tmp_path):
    (tmp_path / "config.json").write_text(models.presets()["qwen2.5-0.5b"].read_text())
    src = models.resolve(str(tmp_path))
    assert src.kind == "config-only" and src.explore_only
    assert models.build_meta_model(str(tmp_path)).config.model_type == "qwen2"
    with pytest.raises(ModelRefError, match="explore-only"):
        models.model_dir(str(tmp_path))


@pytest.mark.parametrize("ref, needle", [
    ("tiny-lama", "unknown model 'tiny-lama'; built-ins: tiny-llama, tiny-gpt2, minilm-l6, smollm2-135m-instruct; presets: "
                  "bert-base-uncased"),
    ("", "model reference is empty"),
    ("someorg/some-model", "cannot fetch Hub model 'someorg/some-model' (HF_HUB_OFFLINE=1 is set)"),
])
def test_bad_references_get_one_clear_line(ref, needle):
    with pytest.raises(ModelRefError) as e:
        models.model_dir(ref)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(ModelRefError, match=f"model folder {tmp_path} has no config.json"):
        models.resolve(str(tmp_path))


def test_pickled_weights_are_refused_not_loaded(tmp_path):
    (tmp_path / "config.json").write_text(models.presets()["gpt2"].read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert models.resolve(str(tmp_path)).explore_only  # no safetensors: only its config is used


def test_unknown_model_type_in_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "nonexistent-arch"}')
    with pytest.raises(ModelRefError, match="nonexistent-arch"):
        models.build_meta_model(str(tmp_path))
