"""Will it fit? Training memory from the config alone: weights, adapter, optimizer, activations.

Nothing here builds a model: the figures come from a `ModelTree` (built once on the meta device,
cached) and the trainable-parameter `Count`, so the Model tab can recompute them on every slider
move, even for a 405B config. The libraries have no such estimate (accelerate's
`estimate-memory` counts weights only and needs the Hub), which is why the studio writes its own.

What each figure means:
- weights: the base parameters in the training dtype; with 8-bit or 4-bit, what bitsandbytes
  keeps: int8 weights plus one fp32 scale per row, or NF4 nibbles plus one absmax per 64 values
  (8-bit with double quantization, plus one fp32 per 256 of those). transformers leaves the output
  head, tied weights and everything that is not a Linear/Conv1D (embeddings, norms) unquantized.
- trainable, gradients: LoRA matrices (and DoRA magnitudes) in fp32, as PEFT upcasts adapters;
  modules_to_save copies and trained biases in the base dtype they are copied from.
- optimizer: AdamW's two moments in the parameter's dtype (fp32 for LoRA); bitsandbytes' 8-bit
  AdamW keeps one byte per value plus an fp32 absmax per 256, but 32-bit moments for tensors
  under 4,096 values.
- activations: what autograd saves for backward, at its peak, traced from the ops of a
  transformers decoder layer: the norm inputs (upcast to fp32 by RMSNorm), the attention's
  q, k, v, output and log-sum-exp (SDPA's fused kernel; with attention dropout on CPU, SDPA falls
  back to the math path and keeps three (batch, heads, seq, seq) tensors), the MLP's
  activation inputs and outputs, dropout masks, each adapted module's input (a fp32 copy per
  module when the base is bf16/fp16, since PEFT casts the input to the adapter's dtype) and its
  rank-r intermediate, and the fp32 log-softmax of the vocabulary the loss keeps. With an
  attention mask (the trainer's packed or padded batches) k and v are repeated for every query
  head and SDPA keeps a copy of the mask per layer. Frozen layers
  before the first adapted one save nothing. With gradient checkpointing only each layer's input
  is kept, plus one layer recomputed during backward.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import asdict, dataclass, field

from studio.config import LoraSettings
from studio.errors import UsageError

QUANTS = ("none", "8bit", "4bit")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw_8bit")
DEVICES = ("cpu", "cuda")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

NF4_BLOCK = 64  # bitsandbytes' default 4-bit block size
NESTED_BLOCK = 256  # double quantization: absmax values quantized in blocks of 256
OPT8_BLOCK = 256  # 8-bit optimizer state block size
OPT8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (min_8bit_size)

# Leaf names of the module that takes a block's output (its input is a fresh tensor, never
# shared with a sibling's); every other adapted module shares its input with its siblings.
_OUT_NAMES = {"o_proj", "out_proj", "c_proj", "down_proj", "fc2", "w2", "dense", "dense_4h_to_h", "wo"}
_GATE_NAMES = {"gate_proj", "gate_up_proj", "w1", "w3", "gate"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass
class MemoryEstimate:
    weights_bytes: int
    trainable_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Shapes:
    """Everything the estimate reads from a model, gathered once per tree."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    norms_per_layer: int
    rms_norm: bool
    gated: bool
    act_saves: int  # (tokens, intermediate) tensors the activation itself saves
    attn_dropout: float
    resid_dropout: float
    resid_sites: int  # dropout layers on the residual stream per block
    rotary: bool
    causal_lm: bool
    quantizable: list[tuple[int, int]]  # (weight numel, out_features) of each Linear bnb converts
    quantizable_bias: int
    layouts: dict = field(default_factory=dict)  # target set -> _Layout (a few, newest last)


_CACHE: dict[int, tuple[weakref.ref, _Shapes]] = {}


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shapes(tree, config=None) -> _Shapes:
    """The architecture facts of `tree` (cached per tree; `config` defaults to the tree's model's)."""
    hit = _CACHE.get(id(tree))
    if hit is not None and hit[0]() is tree:
        return hit[1]
    if config is None:
        from studio.models.registry import load_hf_config

        config = load_hf_config(tree.model)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    layers = _first(cfg, "num_hidden_layers", "n_layer")
    kv = _first(cfg, "num_key_value_heads", "num_kv_heads", default=heads) or heads
    head_dim = _first(cfg, "head_dim") or hidden // heads
    block = _block_modules(tree)
    leaves = {p.rsplit(".", 1)[-1]: m for p, m in block.items()}
    out_mlp = next((m for p, m in block.items() if p.rsplit(".", 1)[-1] in {"down_proj", "fc2", "w2", "dense_4h_to_h"}
                    or (p.endswith("c_proj") and "mlp" in p) or p.endswith("output.dense") and "attention" not in p),
                   None)
    inter = out_mlp.in_features if out_mlp else _first(cfg, "intermediate_size", "n_inner", default=4 * hidden)
    gated = any(n in leaves for n in _GATE_NAMES)
    act = str(_first(cfg, "hidden_act", "activation_function", default="silu"))
    act_saves = 3 if gated else (4 if act in ("gelu_new", "gelu_fast") else 1)
    norms = [m for m in block.values() if "Norm" in m.cls and m.own_params in (hidden, 2 * hidden)]
    rms = not norms or "RMS" in norms[0].cls or "LayerNorm" not in norms[0].cls
    resid_p = float(_first(cfg, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0.0) or 0.0)
    keep = set(_unquantized(tree))
    quantizable = [(m.in_features * m.out_features, m.out_features) for m in tree.modules
                   if m.cls in ("Linear", "Conv1D") and m.path not in keep]
    qbias = sum(m.bias for m in tree.modules if m.cls in ("Linear", "Conv1D") and m.path not in keep)
    s = _Shapes(hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv, head_dim=head_dim, layers=layers,
                vocab=_first(cfg, "vocab_size", default=0), norms_per_layer=len(norms) or 2, rms_norm=rms,
                gated=gated, act_saves=act_saves,
                attn_dropout=float(_first(cfg, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob",
                                          default=0.0) or 0.0),
                resid_dropout=resid_p, resid_sites=2,
                rotary=_first(cfg, "rope_theta", "rope_parameters", "rotary_dim", "partial_rotary_factor") is not None,
                causal_lm=tree.task == "causal_lm" and tree.output_embedding is not None, quantizable=quantizable, quantizable_bias=qbias)
    _CACHE[id(tree)] = (weakref.ref(tree), s)
    return s


def _block_modules(tree) -> dict:
    """Modules of the first repeated block (layer 0), keyed by their path below it."""
    for m in tree.modules:
        hit = _LAYER_RE.search(m.path + ".")
        if hit and hit.group(1) == "0":
            prefix = m.path[: hit.end(1)]
            return {p.path[len(prefix) + 1:]: p for p in tree.modules if p.path.startswith(prefix + ".")}
    return {}


def _unquantized(tree) -> list[str]:
    """What transformers' bitsandbytes integration keeps in full precision (get_keys_to_not_convert)."""
    from studio.models.tree import SEQ_CLS_HEAD_NAMES

    keep = [tree.output_embedding] if tree.output_embedding else []
    if tree.task == "seq_cls":
        keep += [m.path for m in tree.modules if m.path.rsplit(".", 1)[-1] in SEQ_CLS_HEAD_NAMES]
    return keep


def check_options(batch: int, seq: int, quant: str, precision: str, optimizer: str, device: str = "cpu") -> None:
    for name, value, allowed in (("--quant", quant, QUANTS), ("--precision", precision, PRECISIONS),
                                 ("--optimizer", optimizer, OPTIMIZERS), ("device", device, DEVICES)):
        if value not in allowed:
            raise UsageError(f"{name} {value!r} is not one of: {', '.join(allowed)}")
    for name, value in (("--batch", batch), ("--seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} {value!r}: give a whole number of at least 1")


def estimate(tree, count, settings: LoraSettings, *, batch: int, seq: int, quant: str = "none",
             precision: str = "fp32", gradient_checkpointing: bool = False, optimizer: str = "adamw",
             device: str | None = None, attention_mask: bool = True, config=None) -> MemoryEstimate:
    """Training memory for `settings` on the model of `tree` (`count` is `lora.count` of the same).

    `attention_mask`: the batches carry a mask, as the trainer's do (packed blocks get a
    block-diagonal one from their position_ids, unpacked ones a padding mask); without one SDPA
    runs causal without a mask, shares k and v across query heads (GQA) and saves no mask.
    `device`: cpu or cuda, where the trainer will run (default: cuda when this machine has one).
    """
    if device is None:
        device = _default_device()
    check_options(batch, seq, quant, precision, optimizer, device)
    s = shapes(tree, config)
    e = _BYTES[precision]
    notes = [f"base weights {precision}" + ("" if quant == "none" else f", Linear layers {quant} (bitsandbytes"
                                                                       + (" NF4, double quant)" if quant == "4bit" else " LLM.int8)")
                                                                       + f"; embeddings, norms and the output head {precision}"),
             f"micro-batch {batch} x {seq} tokens, {precision} compute"
             + (", gradient checkpointing" if gradient_checkpointing else ""),
             f"attention: SDPA on {device}" + (" (math path: attention dropout > 0)" if _math_attention(s, device) else "")
             + (", with an attention mask (packing or padding)" if attention_mask else ", causal without a mask")]

    weights = _weights(tree, s, quant, e)
    lora_n, full_n = _trainable_split(count)
    trainable = lora_n * 4 + full_n * e
    layout = _layout(tree, s, count, settings)
    optim = _optimizer(_trainable_tensors(layout, settings), lora_n, _full_tensors(tree, count),
                       count.by_type.get("bias", 0), e, optimizer)
    notes.append(f"trainable: {lora_n:,} LoRA values fp32" + (f", {full_n:,} full values {precision}" if full_n else ""))
    notes.append("optimizer: AdamW, two moments per trainable value" if optimizer == "adamw"
                 else "optimizer: bitsandbytes 8-bit AdamW (32-bit state for tensors under 4,096 values)")
    acts = _activations(tree, count, settings, s, batch, seq, e, gradient_checkpointing, device, attention_mask)
    notes.append("activations: tensors autograd saves for backward at its peak, fp32 log-softmax over the vocabulary"
                 if s.causal_lm else "activations: tensors autograd saves for backward at its peak")
    notes.append("not included: the CUDA context and allocator slack, gradients of activations during backward")
    total = weights + 2 * trainable + optim + acts
    return MemoryEstimate(weights_bytes=weights, trainable_bytes=trainable, gradients_bytes=trainable,
                          optimizer_bytes=optim, activations_bytes=acts, total_bytes=total, assumptions=notes)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- weights and trainable state --------------------------------------------------------------

def _weights(tree, s: _Shapes, quant: str, e: int) -> int:
    if quant == "none":
        return tree.total_params * e
    q_numel = sum(n for n, _ in s.quantizable)
    rest = (tree.total_params - q_numel - s.quantizable_bias) * e + s.quantizable_bias * e
    if quant == "8bit":
        return rest + q_numel + sum(out for _, out in s.quantizable) * 4  # int8 + one fp32 scale per row
    packed = 0
    for n, _ in s.quantizable:
        blocks = math.ceil(n / NF4_BLOCK)
        # NF4 nibbles, absmax as uint8 (double quant), fp32 absmax of those per 256 plus the offset
        packed += math.ceil(n / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 4
    return rest + packed


def _trainable_split(count) -> tuple[int, int]:
    """(LoRA values kept in fp32, values trained in full in the base dtype)."""
    full = count.by_type.get("modules_to_save", 0) + count.by_type.get("bias", 0)
    return count.trainable - full, full


@dataclass
class _Layout:
    """Where the adapted modules sit, computed once per target set (not per rank or batch)."""
    by_layer: dict[int, tuple]  # layer -> ((path below the block, rank override or None), ...)
    example: dict[str, str]  # path below the block -> one full path with it
    outside: list[tuple[str, object]]  # adapted modules outside the blocks (embeddings, head)
    shapes: dict[tuple, int]  # (lora_A fan-in, out_features, rank override) -> how many modules


def _layout(tree, s: _Shapes, count, settings: LoraSettings) -> _Layout:
    # Moving the r or alpha slider keeps the matched modules: the UI then pays a dict lookup here.
    key = (tuple(count.matched_modules), tuple(sorted(settings.rank_pattern.items())))
    hit = s.layouts.get(key)
    if hit is not None:
        return hit
    rank_keys = list(settings.rank_pattern)
    if rank_keys:
        from peft.utils.other import get_pattern_key
    by_layer: dict[int, list] = {}
    example: dict[str, str] = {}
    outside = []
    shapes_: dict[tuple, int] = {}
    for path in count.matched_modules:
        m = tree.by_path.get(path)
        if m is None:
            continue
        r = settings.rank_pattern.get(get_pattern_key(rank_keys, path)) if rank_keys else None
        fan_in = m.in_features if m.kind == "embedding" else m.a_fan_in
        shapes_[(fan_in, m.out_features, r)] = shapes_.get((fan_in, m.out_features, r), 0) + 1
        hit = _LAYER_RE.search(path)
        if hit is None:
            outside.append((path, r))
            continue
        suffix = path[hit.end(1):]
        example.setdefault(suffix, path)
        by_layer.setdefault(int(hit.group(1)), []).append((suffix, r))
    layout = _Layout({k: tuple(v) for k, v in by_layer.items()}, example, outside, shapes_)
    if len(s.layouts) >= 8:
        s.layouts.pop(next(iter(s.layouts)))
    s.layouts[key] = layout
    return layout


def _trainable_tensors(layout: _Layout, settings: LoraSettings) -> list[tuple[int, int]]:
    """(values, how many tensors of that size): lora_A, lora_B and DoRA magnitudes, as the optimizer sees them."""
    out = []
    for (fan_in, fout, r), n in layout.shapes.items():
        r = settings.r if r is None else r
        out += [(r * fan_in, n), (r * fout, n)]
        if settings.use_dora:
            out.append((fout, n))
    return out


def _full_tensors(tree, count) -> list[int]:
    """Sizes of the parameters of the modules_to_save copies."""
    out = []
    for root in _outermost(count.modules_to_save or []):
        for m in tree.modules:
            if m.own_params and (m.path == root or m.path.startswith(root + ".")):
                out += [n for n in (m.own_params - m.bias, m.bias) if n]
    return out


def _outermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths)]


def _optimizer(lora_tensors: list[tuple[int, int]], lora_n: int, full: list[int], bias: int, e: int,
               optimizer: str) -> int:
    if optimizer == "adamw":  # torch keeps the moments in each parameter's dtype
        return 2 * (lora_n * 4 + (sum(full) + bias) * e)
    total = 2 * bias * 4  # biases are small tensors: 32-bit state
    for size, n in lora_tensors + [(f, 1) for f in full]:
        if size < OPT8_MIN_SIZE:
            total += n * 2 * size * 4
        else:  # two uint8 states, each with an fp32 absmax per block and its 256-entry fp32 code
            total += n * 2 * (size + math.ceil(size / OPT8_BLOCK) * 4 + 256 * 4)
    return total


# --- activations ------------------------------------------------------------------------------

def _math_attention(s: _Shapes, device: str) -> bool:
    # CPU's fused SDPA kernel has no dropout: with attention dropout torch runs the math path.
    return device == "cpu" and s.attn_dropout > 0


def _activations(tree, count, settings: LoraSettings, s: _Shapes, batch: int, seq: int, e: int,
                 checkpointing: bool, device: str, masked: bool) -> int:
    t = batch * seq
    h, d = s.hidden, s.head_dim
    layout = _layout(tree, s, count, settings)
    by_layer, example, outside = layout.by_layer, layout.example, layout.outside
    mts = count.modules_to_save or []
    trains_embedding = any(tree.by_path.get(p) is not None and tree.by_path[p].kind == "embedding"
                           for p in [p for p, _ in outside] + list(mts))
    if not by_layer and not trains_embedding:
        first = s.layers  # only the head (or nothing) trains: the blocks save nothing
    else:
        first = 0 if trains_embedding else min(by_layer)
    active = s.layers - first

    norm_in = t * h * (4 if s.rms_norm else e) + t * 4 * (1 if s.rms_norm else 2)
    if _math_attention(s, device):
        # the math path upcasts bf16/fp16 to fp32: q, k, v and the softmax, its mask and its output
        attn = 3 * t * s.heads * d * 4 + 3 * batch * s.heads * seq * seq * 4
    elif masked:
        # With a mask transformers repeats k and v for every query head (no GQA in SDPA), and
        # SDPA keeps its own copy of the (batch, 1, seq, seq) mask in the compute dtype per layer.
        attn = 4 * t * s.heads * d * e + batch * s.heads * seq * 4 + batch * seq * seq * e
    else:
        attn = t * (2 * s.heads + 2 * s.kv_heads) * d * e + batch * s.heads * seq * 4
    mlp = s.act_saves * t * s.intermediate * e
    drop = s.resid_sites * t * h * e if s.resid_dropout > 0 else 0
    block = s.norms_per_layer * norm_in + attn + mlp + drop

    def adapters(mods: list[tuple[str, int]]) -> int:
        total, shared = 0, set()
        for path, r in mods:
            m = tree.by_path[path]
            r = settings.r if r is None else r
            total += t * r * 4  # lora_A's output, saved by lora_B
            if m.kind == "embedding":
                continue
            fin = m.in_features
            parent, _, leaf = path.rpartition(".")
            if settings.lora_dropout > 0:
                # the dropout mask, and what lora_A saves: the dropped input (its fp32 copy under bf16/fp16)
                total += t * fin * e + t * fin * (4 if e < 4 else e)
            elif e < 4:
                total += t * fin * 4  # PEFT casts the input to fp32 for each adapter
            else:
                key = (parent, leaf if leaf in _OUT_NAMES else "", fin)
                if key not in shared and not _saved_elsewhere(leaf, s):
                    total += t * fin * e
                shared.add(key)
        return total

    memo: dict[tuple, int] = {}

    # Blocks adapted alike cost alike: a 126-layer model prices its block once, not 882 modules.
    def layer_cost(i: int) -> int:
        key = by_layer.get(i, ())
        if key not in memo:
            memo[key] = block + adapters([(example[suffix], r) for suffix, r in key])
        return memo[key]

    layer_total = [layer_cost(i) for i in range(first, s.layers)]
    head = 0
    if s.causal_lm:
        head = t * s.vocab * 4 + t * 8  # fp32 log-softmax and the int64 targets
    head += adapters(outside) + (t * h * e if tree.output_embedding in [p for p, _ in outside] + list(mts) else 0)
    if active:
        head += norm_in  # the final norm's input
        if s.rotary:
            head += 2 * (t if masked else seq) * d * e  # cos and sin (per row with position_ids), shared by all layers
    if not checkpointing or not layer_total:
        return sum(layer_total) + head
    kept = active * t * h * e  # each block's input, kept to recompute it during backward
    return kept + max(head, max(layer_total))


def _saved_elsewhere(leaf: str, s: _Shapes) -> bool:
    """Whether an adapted module's input is a tensor its block saves anyway (counted once)."""
    # SDPA's output, laid out (batch, seq, heads, dim), is what o_proj reads without a copy.
    return leaf in ("o_proj", "out_proj")


# --- what a run needs beyond the estimate, and the largest micro-batch that fits ------------------

GIB = 2**30
# The trainer process before its model and batches: Python with torch, transformers, peft and
# datasets imported measured 546 MB resident on this CPU; the tokenizer and the tokenized data
# come on top, hence 0.75 GiB.
PROCESS_BYTES = 3 * GIB // 4
# A CUDA process's own device memory outside torch's allocator: the context with its kernels,
# cuBLAS/cuDNN workspaces and allocator rounding. 0.5-1 GiB on current drivers; the larger end.
CUDA_CONTEXT_BYTES = GIB
GPU_SIZES_GB = (8, 12, 16, 24, 40, 48, 80)  # as sold: GiB of device memory


def logits_grad_bytes(tree, batch: int, seq: int) -> int:
    """The transient peak of the loss's backward: the fp32 gradients of the log-softmax and of the
    logits, alive together beside the log-softmax the estimate already counts (causal LMs only)."""
    if tree.task != "causal_lm" or tree.output_embedding is None:
        return 0
    return 2 * batch * seq * shapes(tree).vocab * 4


def allowances(tree, batch: int, seq: int, device: str) -> dict[str, int]:
    """Bytes a run needs beyond `estimate`'s total, by name, on `device` (cpu: the process itself;
    cuda: the CUDA context, since a GPU holds no Python)."""
    out = {"logits_gradients": logits_grad_bytes(tree, batch, seq)}
    out["cuda_context" if device == "cuda" else "process"] = CUDA_CONTEXT_BYTES if device == "cuda" else PROCESS_BYTES
    return out


def needed_bytes(tree, count, settings: LoraSettings, *, batch: int, seq: int, device: str, **kw) -> int:
    """The estimate's total plus the allowances: what must be free on `device` for the run."""
    est = estimate(tree, count, settings, batch=batch, seq=seq, device=device, **kw)
    return est.total_bytes + sum(allowances(tree, batch, seq, device).values())


def largest_batch(tree, count, settings: LoraSettings, budget: int, *, seq: int, device: str, limit: int = 1 << 16,
                  **kw) -> int:
    """The largest micro-batch whose `needed_bytes` fits `budget` at `seq` tokens (0: not even one).

    Every batch-dependent figure is proportional to the micro-batch (activations, logits), so two
    estimates give the line, and one more confirms the answer against rounding.
    """
    one = needed_bytes(tree, count, settings, batch=1, seq=seq, device=device, **kw)
    if one > budget:
        return 0
    per_row = needed_bytes(tree, count, settings, batch=2, seq=seq, device=device, **kw) - one
    n = limit if per_row <= 0 else min(limit, 1 + (budget - one) // per_row)
    while n > 1 and needed_bytes(tree, count, settings, batch=n, seq=seq, device=device, **kw) > budget:
        n -= 1
    return n
