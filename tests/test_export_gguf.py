"""studio.export.gguf: GGUF files that an independent reader loads back as the merged model.

Every merged export is read back by transformers' GGUF loader (tokenizer and model) and compared
with PEFT's merge_and_unload of the same base + adapter; a LoRA GGUF is read back with gguf-py's
GGUFReader and the update llama.cpp will apply from it is compared with PEFT's. Bases are the
tiny built-ins (Llama and GPT-2 with the studio's byte tokenizer) and tiny Qwen2 / Qwen3 models
built from a config here, with a byte-level BPE tokenizer trained here with Qwen2's own split
rule, so the merges, the pre-tokenizer name and the ChatML end-of-turn token are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from studio.cli import main  # noqa: E402
from studio.errors import ExportError  # noqa: E402
from studio.export import gguf_verify  # noqa: E402
from studio.export.gguf import QUANTS, export_gguf, export_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Q = gguf.GGMLQuantizationType
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads cost more than they save
    yield
    torch.set_num_threads(n)


# --- bases and adapters ---------------------------------------------------------------------

def _adapter(base: Path, out: Path, targets, **kw) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)  # the same adapter on every run: the quant floors are met with room, not by luck
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets,
                                          init_lora_weights=False, **kw))
    with torch.no_grad():  # B is zero after init: give every update a size that moves the logits
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    return out


def _bpe_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [gguf_verify.TEXT, "The lazy dog sleeps while the quick fox runs over the hill again and again.",
              "LoRA adds a low-rank update to a frozen weight; merging folds it into the weight."] * 20
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def _qwen(folder: Path, kind: str) -> Path:
    tok = _bpe_tokenizer(folder)
    common = dict(vocab_size=len(tok) + 14, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        # head_dim 128 (as every Qwen3 has) is also what transformers' GGUF reader assumes: it does not
        # read attention.key_length back for qwen3; 128 != 64 / 4 also tests that key_length is written
        cfg = transformers.Qwen3Config(head_dim=128, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    torch.manual_seed(0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """arch -> (base dir, adapter dir), each made once."""
    from studio.models.registry import model_dir

    root = tmp_path_factory.mktemp("gguf-cases")
    made = {}

    def get(arch: str):
        if arch not in made:
            if arch in ("llama", "gpt2"):
                base = model_dir(f"tiny-{arch}")
            else:
                base = _qwen(root / f"{arch}-base", arch)
            targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else \
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            made[arch] = (base, _adapter(base, root / f"{arch}-adapter", targets))
        return made[arch]
    return get


def _peft_logits(base: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    m = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                  adapter).merge_and_unload().eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0]


def _gguf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0]


# --- merged exports read back by transformers -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "qwen3"])
def test_f32_round_trip_is_the_peft_merge(tmp_path, cases, arch):
    """f32 leaves only the layout: any wrong permutation, transpose or name shows as a logit error."""
    base, adapter = cases(arch)
    out = tmp_path / f"{arch}.gguf"
    rep = export_gguf(base, adapter, out, quant="f32")
    assert out.is_file() and rep.bytes == out.stat().st_size
    assert rep.verify["tokenizer_ok"] and rep.verify["agreement"] == 1.0
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = tok(gguf_verify.TEXT)["input_ids"][:48]
    want, got = _peft_logits(base, adapter, ids), _gguf_logits(out, ids)
    assert (got - want).abs().max().item() <= 1e-4
    base_only = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():  # the adapter matters: the export is not the base under another name
        assert (base_only(input_ids=torch.tensor([ids])).logits[0] - want).abs().max().item() > 1e-3
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no partial left beside it


# f16 and q8_0 on every architecture in make test-fast; the rest of the matrix is marked slow (make test)
MATRIX = [pytest.param(a, q, marks=() if q in ("f16", "q8_0") else pytest.mark.slow)
          for a in ("llama", "gpt2", "qwen2", "qwen3") for q in QUANTS if q != "f32"]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "quant"), MATRIX)
def test_every_quant_type_loads_back_and_agrees(tmp_path, cases, arch, quant):
    base, adapter = cases(arch)
    out = tmp_path / "m.gguf"
    rep = export_gguf(base, adapter, out, quant=quant)
    v = rep.verify
    assert v["tokenizer_ok"] and v["agreement"] >= gguf_verify.AGREEMENT[quant], v
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0,
            "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[quant]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == want
    assert types["output_norm.weight"] == Q.F32  # norms stay f32 as llama.cpp expects
    if quant == "f16":
        assert v["agreement"] >= 0.99 and v["max_abs_logit_diff"] < 0.05


@pytest.mark.slow
def test_chatml_metadata_and_ollama_modelfile(tmp_path, cases):
    base, adapter = cases("qwen2")
    out = tmp_path / "chat.gguf"
    rep = export_gguf(base, adapter, out, quant="q8_0", ollama=True, name="my-run")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    r = gguf.GGUFReader(out)
    assert r.get_field("tokenizer.chat_template").contents() == CHATML
    assert r.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    assert r.get_field("tokenizer.ggml.eot_token_id").contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(r.get_field("tokenizer.ggml.merges").contents()) > 0
    text = Path(rep.modelfile).read_text()
    assert Path(rep.modelfile) == tmp_path / "Modelfile"
    assert text.startswith("FROM ./chat.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert rep.commands == [f"ollama create my-run -f {tmp_path / 'Modelfile'}", "ollama run my-run"]


# --- the adapter as a llama.cpp LoRA file -----------------------------------------------------

def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # the inverse transformers applies when it reads a Llama GGUF (interleaved -> rotate-half)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_only_reads_back_as_the_peft_update(tmp_path, arch):
    from studio.models.registry import model_dir

    base = model_dir(f"tiny-{arch}")
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "down_proj"]
    # alpha_pattern and rank_pattern give modules scalings other than alpha / r: they must be folded in
    adapter = _adapter(base, tmp_path / "adapter", targets,
                       **({} if arch == "gpt2" else {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 32}}))
    out = tmp_path / "lora.gguf"
    rep = export_gguf(base, adapter, out, quant="f32", adapter_only=True)
    r = gguf.GGUFReader(out)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    alpha = r.get_field("adapter.lora.alpha").contents()
    assert alpha == 8.0 and rep.verify["lora_alpha"] == 8.0
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in r.tensors}
    n_layers = 4
    n_targets = len(targets)
    assert len(tensors) == 2 * n_layers * n_targets and rep.verify["updates"] == n_layers * n_targets

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    cfg = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA, n_layers)
    worst = 0.0
    for hf_name in merged:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None or f"{gname}.lora_a" not in tensors:
            continue
        a, b = tensors[f"{gname}.lora_a"], tensors[f"{gname}.lora_b"]
        assert a.shape[1] == (merged[hf_name].shape[0] if arch == "gpt2" else merged[hf_name].shape[1])
        delta = (alpha / a.shape[0]) * (b @ a)   # what llama.cpp adds, in its (out, in) layout
        if hf_name.endswith("q_proj.weight"):
            delta = _unpermute(delta, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            delta = _unpermute(delta, cfg["num_key_value_heads"])
        want = merged[hf_name] - before[hf_name]
        if arch == "gpt2":
            want = want.T  # Conv1D stores (in, out)
        worst = max(worst, (delta - want).abs().max().item())
    assert worst <= 1e-5
    if arch == "llama":
        assert tensors["blk.0.attn_k.weight.lora_a"].shape[0] == 2  # rank_pattern kept per tensor


def test_adapter_only_refuses_what_a_lora_file_cannot_carry(tmp_path):
    from studio.models.registry import model_dir

    base = model_dir("tiny-llama")
    adapter = _adapter(base, tmp_path / "dora", ["q_proj"], use_dora=True)
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf(base, adapter, tmp_path / "x.gguf", adapter_only=True)
    with pytest.raises(ExportError, match="q4_0.*f16, bf16, q8_0, f32"):
        export_gguf(base, adapter, tmp_path / "x.gguf", adapter_only=True, quant="q4_0")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []


# --- nothing half-written -----------------------------------------------------------------

def test_interrupted_export_leaves_nothing(tmp_path, cases):
    base, adapter = cases("llama")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a partial left by a killed export (a pid that cannot be alive) is swept by the next one
    stale = out_dir / ".m.partial-999999999-deadbeef.gguf"
    stale.write_bytes(b"GGUF")

    def interrupt(done, total, what):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(base, adapter, out_dir / "m.gguf", progress=interrupt)
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_failed_verification_removes_the_file_and_exits_1(tmp_path, cases, monkeypatch, capsys):
    base, adapter = cases("llama")
    monkeypatch.setitem(gguf_verify.AGREEMENT, "f16", 1.01)  # no file can pass: the failure path is real
    out = tmp_path / "m.gguf"
    capsys.readouterr()  # what building the case printed
    assert main(["export", "gguf", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verification failed" in err and "agreement" in err
    assert list(tmp_path.iterdir()) == []


# --- the command line -----------------------------------------------------------------------

def _run(tmp: Path, base_name="tiny-llama", adapter=True) -> Path:
    from studio.config import RunConfig
    from studio.models.registry import model_dir

    run = tmp / "run-1"
    run.mkdir()
    cfg = RunConfig()
    cfg.model.name_or_path = base_name
    cfg.save(run / "config.yaml")
    if adapter:
        _adapter(model_dir(base_name), run / "adapter", ["q_proj", "v_proj"])
    return run


@pytest.mark.slow
def test_cli_run_json_keys_and_default_out(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["export", "gguf", str(run), "--json", "--ollama"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"out", "quant", "bytes", "seconds", "peak_rss_mb", "verify", "modelfile"} <= set(d)
    assert {"tokenizer_ok", "agreement", "max_abs_logit_diff"} <= set(d["verify"])
    assert Path(d["out"]) == run / "exports" / "run-1-f16.gguf"
    assert Path(d["out"]).stat().st_size == d["bytes"] and d["quant"] == "f16"
    modelfile = Path(d["modelfile"]).read_text()
    assert "FROM ./run-1-f16.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    rep = export_run(run, adapter_only=True, quant="q8_0")
    assert rep.out.endswith("run-1-lora-q8_0.gguf") and rep.verify["updates"] == 8


def _one_line_exit_2(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_one_line_exit_2(tmp_path, capsys, cases):
    base, adapter = cases("llama")
    ba = ["--base", str(base), "--adapter", str(adapter)]
    _one_line_exit_2(capsys, ["export", "gguf", *ba, "--out", str(tmp_path / "m.gguf"), "--quant", "q3_k"],
                     "'q3_k'", "f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, f32")
    _one_line_exit_2(capsys, ["export", "gguf", *ba, "--out", str(tmp_path / "nope" / "m.gguf")],
                     str(tmp_path / "nope"), "does not exist")
    _one_line_exit_2(capsys, ["export", "gguf", *ba, "--out", str(tmp_path / "m.bin")], ".gguf")
    odd = tmp_path / "odd-base"
    odd.mkdir()
    for f in base.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    _one_line_exit_2(capsys, ["export", "gguf", "--base", str(odd), "--adapter", str(adapter),
                              "--out", str(tmp_path / "m.gguf")],
                     "FalconForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel")
    run = _run(tmp_path, adapter=False)
    _one_line_exit_2(capsys, ["export", "gguf", str(run)], "no final adapter")
    _one_line_exit_2(capsys, ["export", "gguf", "--base", str(base)], "RUN_DIR", "--adapter")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf"))


def test_unsupported_tokenizer_is_refused_by_name(tmp_path, cases):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base, adapter = cases("llama")
    vocab = {f"w{i}": i for i in range(259)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(adapter.parent / "wl-adapter")
    for f in adapter.iterdir():
        (adapter.parent / "wl-adapter" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ExportError, match="tokenizer model WordLevel.*byte-level BPE"):
        export_gguf(base, adapter.parent / "wl-adapter", tmp_path / "m.gguf")
