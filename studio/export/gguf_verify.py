"""Prove a GGUF export with readers that share no code with the writer.

A merged export is loaded back by transformers' own GGUF reader (`from_pretrained(folder,
gguf_file=...)`, tokenizer and model) and compared with the base + adapter merged by PEFT
(`merge_and_unload`, the reference implementation, not the studio's merge): the tokenizer must
give the same ids on a fixed text, and the next-token choice must agree on at least
`AGREEMENT[quant]` of its positions. A LoRA GGUF is read back with gguf-py's `GGUFReader`, and
the update llama.cpp will apply from it, adapter.lora.alpha / r * B @ A, is compared with the
adapter's own, scaling * B @ A, in llama.cpp's row order.

Both load whole models, so verification costs about two models of float32 memory for a moment
(the reference logits are taken and its model dropped before the GGUF is loaded); the export
before it streams.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from studio.errors import ExportError
from studio.export.verify import quiet

TEXT = ("The quick brown fox jumps over the lazy dog. Fine-tuning with LoRA adds scaling * B @ A to W, "
        "and an export must keep every token: 42 + 8 = 50, café, naïve.")
MAX_TOKENS = 64
# Minimum next-token agreement with the merged model. f16 keeps the merged weights to 3 digits and
# must agree on 99%. The block quants round each weight to 8, 5 or 4 bits, which flips the close
# calls of a model whose logits are nearly flat (the tiny random test models); for them these are
# floors that a wrong layout (a transposed or unpermuted matrix: about 1/vocab) cannot pass, not
# quality claims: a trained model agrees far more (see the benchmark figures).
AGREEMENT = {"f32": 0.99, "f16": 0.99, "bf16": 0.95, "q8_0": 0.9, "q5_1": 0.6, "q5_0": 0.6, "q4_1": 0.35, "q4_0": 0.35}
# Largest |llama.cpp's update - the adapter's|, relative to the update's largest entry.
DELTA_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}


class VerificationFailed(ExportError):
    """The written file does not reproduce the model: a real failure (exit status 1), not bad input."""


def verify_model(path: Path, plan, tok, quant: str) -> dict:
    """{tokenizer_ok, agreement, max_abs_logit_diff, positions, reader}; raises VerificationFailed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet(), _no_tqdm():
        ids = tok(TEXT)["input_ids"][:MAX_TOKENS]
        try:
            gtok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gids = gtok(TEXT)["input_ids"][:MAX_TOKENS]
            tok_ok = gids == ids and gtok.decode(ids) == tok.decode(ids)
            tok_error = None
        except Exception as e:  # the reader cannot build this tokenizer: a failure to report, not a crash
            tok_ok, tok_error, gids = False, f"{type(e).__name__}: {e}", []
        want = _reference_logits(plan, ids)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(input_ids=torch.tensor([ids])).logits[0].float()
        del model
        gc.collect()
    if got.shape != want.shape:
        raise VerificationFailed(f"{path.name}: transformers reads logits of shape {tuple(got.shape)} back, "
                                 f"the merged model gives {tuple(want.shape)}")
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    result = {"tokenizer_ok": tok_ok, "agreement": round(agreement, 4),
              "max_abs_logit_diff": float((got - want).abs().max()), "positions": len(ids),
              "reader": "transformers.from_pretrained(gguf_file=...)"}
    if not tok_ok:
        first = next((i for i, (a, b) in enumerate(zip(ids, gids)) if a != b), min(len(ids), len(gids)))
        why = tok_error or f"ids differ from position {first} (model {ids[first:first + 4]}, GGUF {gids[first:first + 4]})"
        raise VerificationFailed(f"{path.name}: the tokenizer read back from the GGUF does not match the model's: {why}")
    if agreement < AGREEMENT[quant]:
        raise VerificationFailed(f"{path.name}: next-token agreement with the merged model is {agreement:.1%} over "
                                 f"{len(ids)} positions, below the {AGREEMENT[quant]:.0%} required for {quant} "
                                 f"(max |logit diff| {result['max_abs_logit_diff']:.3g})")
    return result


@contextmanager
def _no_tqdm():
    """transformers' GGUF loader draws its own tqdm bar on stderr, which its logging switches do not
    reach (and tqdm reads TQDM_DISABLE only at import): the engine never prints, so stderr goes nowhere."""
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def _reference_logits(plan, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, plan.adapter_dir).merge_and_unload().eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0].float()
    del model, base
    gc.collect()
    return out


def verify_adapter(path: Path, plan, tensors: list, permute) -> dict:
    """Read a LoRA GGUF back with gguf-py and compare the update it implies with the adapter's."""
    import gguf

    from studio.models import shards

    reader = gguf.GGUFReader(path)
    field = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.contents()) if field is not None else None
    kind = reader.get_field(gguf.Keys.Adapter.TYPE)
    if alpha is None or kind is None or kind.contents() != "lora":
        raise VerificationFailed(f"{path.name}: adapter.type / adapter.lora.alpha missing when read back")
    by_name = {t.name: t for t in reader.tensors}
    quant = {gguf.GGMLQuantizationType.F32: "f32", gguf.GGMLQuantizationType.F16: "f16",
             gguf.GGMLQuantizationType.BF16: "bf16", gguf.GGMLQuantizationType.Q8_0: "q8_0"}
    worst, checked = 0.0, 0
    for name, entry in tensors:
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".lora_a")]
        ta, tb = by_name.get(stem + ".lora_a"), by_name.get(stem + ".lora_b")
        if ta is None or tb is None:
            raise VerificationFailed(f"{path.name}: {stem}.lora_a / .lora_b missing when read back")
        a = torch.from_numpy(gguf.quants.dequantize(ta.data, ta.tensor_type).copy()).float()
        b = torch.from_numpy(gguf.quants.dequantize(tb.data, tb.tensor_type).copy()).float()
        u = entry.lora
        got = (alpha / a.shape[0]) * (b @ a)
        ra = shards.read_tensor(plan.adapter_file, u.a_key).float()
        rb = shards.read_tensor(plan.adapter_file, u.b_key).float()
        want = u.scaling * (rb @ ra)   # (out, in) for nn.Linear and GPT-2's Conv1D alike: the GGUF's orientation
        if entry.name.endswith(".self_attn.q_proj.weight") and _permutes(plan):
            want = permute(want, "permute_q")
        elif entry.name.endswith(".self_attn.k_proj.weight") and _permutes(plan):
            want = permute(want, "permute_k")
        if got.shape != want.shape:
            raise VerificationFailed(f"{path.name}: {stem} gives an update of shape {tuple(got.shape)}, "
                                     f"the adapter {tuple(want.shape)}")
        scale = float(want.abs().max()) or 1.0
        rel = float((got - want).abs().max()) / scale
        tol = max(DELTA_TOLERANCE[quant.get(ta.tensor_type, "f32")], DELTA_TOLERANCE[quant.get(tb.tensor_type, "f32")])
        if rel > tol:
            raise VerificationFailed(f"{path.name}: {stem}: llama.cpp's update differs from the adapter's by "
                                     f"{rel:.3g} of its largest entry (tolerance {tol:g})")
        worst = max(worst, rel)
        checked += 1
    return {"tokenizer_ok": None, "agreement": None, "max_abs_logit_diff": None, "reader": "gguf.GGUFReader",
            "lora_alpha": alpha, "updates": checked, "max_rel_update_diff": worst}


def _permutes(plan) -> bool:
    from studio.export.gguf_arch import ARCHS

    return ARCHS.get((plan.base_config.get("architectures") or ["?"])[0], ("", False, False))[1]
