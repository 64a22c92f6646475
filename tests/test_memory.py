"""The training-memory estimate against what real models hold.

Byte counts of weights, adapter, gradients and optimizer state equal those of a built model;
activations are compared with a measurement: every tensor autograd saves for backward, caught
with `saved_tensors_hooks` while forward and backward run, each storage counted once and
parameters left out, tracking the live total to find its peak.
"""

import importlib.util
import json
import statistics
import time
from collections import Counter

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from studio import lora
from studio.config import LoraSettings
from studio.errors import UsageError
from studio.models import memory, registry
from studio.models.tree import build_tree, model_tree

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install '.[quant]')")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Small random configs of the architectures the estimate reads (vocabulary and widths tiny, the
# structure real: GQA, tied or untied heads, fused qkv / gate_up, GPT-2's Conv1D and dropout).
ARCHS = {
    "llama": dict(model_type="llama", vocab_size=300, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", vocab_size=300, n_embd=128, n_layer=2, n_head=4),
    "qwen2": dict(model_type="qwen2", vocab_size=300, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma": dict(model_type="gemma", vocab_size=300, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=48),
    "phi3": dict(model_type="phi3", vocab_size=300, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
}
QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "qwen2": ["q_proj", "v_proj"],
      "mistral": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"]}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared machine: thread hand-offs cost more than the work (1.4 s vs 0.17 s a step).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(arch: str):
    spec = dict(ARCHS[arch])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _model(arch: str, precision: str = "fp32"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(arch), dtype=DTYPES[precision])


def _estimate(model, settings: LoraSettings, **kw):
    tree = build_tree(model, type(model).__name__)
    return memory.estimate(tree, lora.count(tree, settings), settings, config=model.config, device="cpu", **kw)


def _peft(model, settings: LoraSettings):
    from peft import get_peft_model

    pm = get_peft_model(model, lora.build_lora_config(settings, "causal_lm"))
    pm.train()  # dropout as the trainer has it
    return pm


class SavedTensors:
    """Live bytes of the tensors autograd holds for backward (each storage once, no parameters)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: Counter = Counter()
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        if self.refs[ptr] == 0:
            self.size[ptr] = t.untyped_storage().nbytes()
            self.live += self.size[ptr]
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        return _Held(self, ptr, t)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.size.pop(ptr)


class _Held:
    """What autograd keeps instead of the tensor; dropped when backward no longer needs it."""
    __slots__ = ("owner", "ptr", "t")

    def __init__(self, owner, ptr, t):
        self.owner, self.ptr, self.t = owner, ptr, t

    def __del__(self):
        self.owner.release(self.ptr)


def measure_saved(pm, batch: int, seq: int, vocab: int, checkpointing: bool = False, packed: bool = False) -> int:
    if checkpointing:
        # The reentrant form saves each block's inputs through autograd, so the hooks see them, and
        # recomputes the block inside backward under the same hooks: the peak includes that block.
        # It keeps the same tensors as the non-reentrant default the trainer uses.
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        pm.enable_input_require_grads()
    saved = SavedTensors(pm)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    kw = {}
    if packed:  # two examples per block, as the packed collator sends them: a block-diagonal mask
        kw = dict(position_ids=torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).repeat(batch, 1),
                  use_cache=False)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = pm(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
    assert saved.live == 0  # every saved tensor was released: the bookkeeping saw them all
    return saved.peak


# --- activations --------------------------------------------------------------------------

CASES = [
    dict(batch=2, seq=64, targets="all-linear"),
    dict(batch=4, seq=96, targets="qv", packed=True),
    dict(batch=1, seq=160, targets="all-linear", lora_dropout=0.1, packed=True),
    dict(batch=2, seq=64, targets="all-linear", precision="bf16", packed=True),
    dict(batch=3, seq=128, targets="qv", checkpointing=True),
    dict(batch=2, seq=96, targets="all-linear", checkpointing=True, packed=True),
]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_activations_match_what_autograd_saves(arch, case):
    c = CASES[case]
    precision = c.get("precision", "fp32")
    targets = QV[arch] if c["targets"] == "qv" else "all-linear"
    s = LoraSettings(r=8, lora_alpha=16, target_modules=targets, lora_dropout=c.get("lora_dropout", 0.0))
    model = _model(arch, precision)
    packed = c.get("packed", False)
    est = _estimate(model, s, batch=c["batch"], seq=c["seq"], precision=precision,
                    gradient_checkpointing=c.get("checkpointing", False), attention_mask=packed)
    measured = measure_saved(_peft(model, s), c["batch"], c["seq"], model.config.vocab_size,
                             c.get("checkpointing", False), packed)
    tolerance = 0.35 if c.get("checkpointing") else 0.20
    assert abs(est.activations_bytes - measured) <= tolerance * measured, (arch, c, est.activations_bytes, measured)


def test_activations_grow_as_the_shapes_say():
    tree = model_tree("llama-3.1-8b")
    s = LoraSettings(r=16, target_modules=["q_proj", "v_proj"])
    c = lora.count(tree, s)
    a = memory.estimate(tree, c, s, batch=1, seq=1024).activations_bytes
    two = memory.estimate(tree, c, s, batch=2, seq=1024).activations_bytes
    assert 1.99 * a < two <= 2 * a  # linear in batch, but for the rotary tables all rows share
    ck = memory.estimate(tree, c, s, batch=1, seq=1024, gradient_checkpointing=True).activations_bytes
    assert ck < a / 4  # checkpointing keeps one tensor per block instead of dozens
    later = LoraSettings(r=16, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(16, 32)))
    half = memory.estimate(tree, lora.count(tree, later), later, batch=1, seq=1024).activations_bytes
    assert half < 0.6 * a  # frozen blocks before the first adapter save nothing


# --- weights, adapter, gradients, optimizer: exact -------------------------------------------

SETTINGS = [
    dict(r=8, target_modules="all-linear"),
    dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, rank_pattern={"v_proj": 2}),
    dict(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all"),
]
GPT2_SETTINGS = [dict(r=8, target_modules=["c_attn", "c_fc"]), dict(r=4, target_modules=["c_attn"], bias="all")]


def _exact_cases():
    for ref in ("tiny-llama", "tiny-gpt2"):
        for kw in SETTINGS if ref == "tiny-llama" else GPT2_SETTINGS:
            for precision in ("fp32", "bf16"):
                yield ref, kw, precision
    yield "qwen2", dict(r=8, target_modules="all-linear"), "fp32"
    yield "phi3", dict(r=8, target_modules=["qkv_proj", "down_proj"]), "bf16"


@pytest.mark.parametrize("ref, kw, precision", list(_exact_cases()))
def test_state_bytes_equal_the_built_model(ref, kw, precision):
    if ref in ARCHS:
        model = _model(ref, precision)
    else:
        model = registry.load_model(ref, dtype={"fp32": "float32", "bf16": "bfloat16"}[precision])
    s = LoraSettings(lora_alpha=16, **kw)
    est = _estimate(model, s, batch=1, seq=16, precision=precision)
    assert est.weights_bytes == sum(p.numel() * p.element_size() for p in model.parameters())

    pm = _peft(model, s)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert est.trainable_bytes == sum(p.numel() * p.element_size() for p in trainable)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert est.gradients_bytes == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    moments = sum(st[k].numel() * st[k].element_size() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert est.optimizer_bytes == moments
    assert est.total_bytes == (est.weights_bytes + est.trainable_bytes + est.gradients_bytes + est.optimizer_bytes
                               + est.activations_bytes)


@needs_bnb
@pytest.mark.parametrize("kw", [dict(r=8, target_modules="all-linear"),
                                dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])])
def test_8bit_optimizer_state_equals_bitsandbytes(kw):
    import bitsandbytes as bnb

    model = registry.load_model("tiny-llama")
    s = LoraSettings(lora_alpha=16, **kw)
    est = _estimate(model, s, batch=1, seq=16, optimizer="adamw_8bit")
    pm = _peft(model, s)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    opt = bnb.optim.AdamW8bit(trainable, lr=1e-3)
    opt.step()
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                if torch.is_tensor(v) and k != "step")
    assert est.optimizer_bytes == state


@needs_bnb
@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_weights_match_what_bitsandbytes_loads(ref, quant):
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        bnb_cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(registry.model_dir(ref), quantization_config=bnb_cfg,
                                                 dtype=torch.float32, device_map="cpu")
    footprint = model.get_memory_footprint(return_buffers=False)
    tree = model_tree(ref)
    s = LoraSettings(r=8, target_modules="all-linear")
    est = memory.estimate(tree, lora.count(tree, s), s, batch=1, seq=16, quant=quant)
    assert abs(est.weights_bytes - footprint) <= 0.15 * footprint, (est.weights_bytes, footprint)
    full = memory.estimate(tree, lora.count(tree, s), s, batch=1, seq=16).weights_bytes
    assert est.weights_bytes < (0.75 if quant == "8bit" else 0.6) * full


# --- speed, bad input, CLI -----------------------------------------------------------------

def test_405b_estimate_is_fast_enough_for_every_slider_move():
    tree = model_tree("llama-3.1-405b")
    s = LoraSettings(r=16, target_modules="all-linear")
    c = lora.count(tree, s)
    memory.estimate(tree, c, s, batch=1, seq=2048)  # warm-up: the architecture facts are read once
    times = []
    for i in range(5):
        t = time.perf_counter()
        est = memory.estimate(tree, c, LoraSettings(r=8 + i, target_modules="all-linear"), batch=1 + i, seq=2048,
                              quant="4bit", precision="bf16", gradient_checkpointing=bool(i % 2))
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.020, times
    assert est.weights_bytes < 405e9 * 0.6  # 4-bit: well under a byte per parameter


@pytest.mark.parametrize("kw, needle", [
    (dict(batch=0, seq=8), "--batch 0: give a whole number of at least 1"),
    (dict(batch=1, seq=0), "--seq 0"),
    (dict(batch=1, seq=8, quant="3bit"), "--quant '3bit' is not one of: none, 8bit, 4bit"),
    (dict(batch=1, seq=8, precision="fp8"), "--precision 'fp8' is not one of: fp32, bf16, fp16"),
    (dict(batch=1, seq=8, optimizer="sgd"), "--optimizer 'sgd' is not one of: adamw, adamw_8bit"),
])
def test_bad_options_name_the_value_and_the_choices(kw, needle):
    tree = model_tree("tiny-llama")
    s = LoraSettings(target_modules=["q_proj"])
    with pytest.raises(UsageError, match=None) as err:
        memory.estimate(tree, lora.count(tree, s), s, **kw)
    assert needle in str(err.value)


@pytest.fixture
def studio(capsys):
    """`studio.cli.main` in this process (the subprocess path is tested in test_cli), as (rc, out, err)."""
    from studio.cli import main

    def call(*args):
        rc = main(list(args))
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    return call


def test_cli_count_adds_memory(studio):
    rc, out, err = studio("count", "--model", "llama-3.1-8b", "--targets", "all-linear", "--r", "16", "--batch", "2",
                          "--seq", "512", "--quant", "4bit", "--precision", "bf16", "--gradient-checkpointing",
                          "--json")
    assert rc == 0, err
    out = json.loads(out)
    mem = out["memory"]
    assert set(mem) == {"weights_bytes", "trainable_bytes", "gradients_bytes", "optimizer_bytes",
                        "activations_bytes", "total_bytes", "assumptions"}
    tree = model_tree("llama-3.1-8b")
    s = LoraSettings(r=16, lora_alpha=32, target_modules="all-linear")
    assert mem == memory.estimate(tree, lora.count(tree, s), s, batch=2, seq=512, quant="4bit", precision="bf16",
                                  gradient_checkpointing=True).to_dict()
    assert mem["trainable_bytes"] == out["trainable"] * 4
    rc, out, _ = studio("count", "--model", "tiny-llama", "--targets", "q_proj,v_proj", "--batch", "4", "--seq", "128")
    assert rc == 0 and "memory for micro-batch 4 x 128" in out and "activations" in out
    rc, out, _ = studio("count", "--model", "tiny-llama", "--targets", "q_proj", "--json")
    assert "memory" not in json.loads(out)


@pytest.mark.parametrize("args, needle", [
    (["--batch", "0", "--seq", "64"], "--batch 0: give a whole number of at least 1"),
    (["--batch", "2", "--seq", "64", "--quant", "2bit"], "--quant '2bit' is not one of: none, 8bit, 4bit"),
    (["--batch", "2", "--seq", "64", "--precision", "fp64"], "--precision 'fp64' is not one of"),
    (["--batch", "2"], "needs both --batch and --seq"),
    (["--quant", "4bit"], "need --batch N --seq N"),
])
def test_cli_bad_memory_options_exit_2_with_one_line(studio, args, needle):
    rc, _, err = studio("count", "--model", "tiny-llama", "--targets", "q_proj", *args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
