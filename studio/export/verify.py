"""Prove a merge: the merged model must give the logits of base + adapter run by PEFT.

This loads whole models (the merged one, then the base with the adapter), so it costs about
one model of memory in float32, unlike the merge itself; the merged model is dropped before
the base is loaded. Both run in float32 whatever the saved dtype.

A merge saved in bfloat16 or float16 cannot equal base + adapter in float32: rounding every
weight to 8 (or 11) bits of mantissa moves the logits by itself (0.1-0.3 on a small model).
So the merged model is judged against a reference at its own precision: PEFT's
merge_and_unload of the same base and adapter in float32, with every weight then rounded to
the saved dtype. A correct merge differs from that reference only where one rounding flipped,
orders of magnitude less than the rounding's own effect, which is reported beside it
(`rounding_effect`) so the number has a meaning. `ok` is the verdict.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

import torch

SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adds a low-rank update B @ A to a frozen weight matrix.",
    "Merging folds scaling * B @ A into W, so inference costs nothing extra.",
)
MAX_TOKENS = 32


def verify_merge(merged_dir: Path, base_dir: Path, adapter_dir: Path, task_type: str | None, *,
                 num_labels: int | None = None, trust_remote_code: bool = False,
                 saved_dtype: torch.dtype | None = None) -> dict:
    """{max_abs_logit_diff, rounding_effect, tolerance, ok, base_vs_merged_max_diff, differs_from_base}
    on a few sample inputs; `saved_dtype` is the floating dtype the merged weights were written in."""
    with quiet():
        return _verify(merged_dir, base_dir, adapter_dir, task_type, num_labels, trust_remote_code,
                       saved_dtype or torch.float32)


def _verify(merged_dir, base_dir, adapter_dir, task_type, num_labels, trust_remote_code, saved_dtype) -> dict:
    from peft import PeftModel

    auto = _auto_class(task_type)
    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    torch.manual_seed(0)  # tensors missing from both checkpoints get the same random init in both loads
    merged = auto.from_pretrained(merged_dir, **kw).eval()
    inputs = _sample_inputs(merged_dir, merged.get_input_embeddings().num_embeddings, trust_remote_code)
    with torch.no_grad():
        want = [_logits(merged, ids) for ids in inputs]
    del merged
    gc.collect()

    if task_type == "SEQ_CLS" and num_labels:
        kw["num_labels"] = num_labels
    torch.manual_seed(0)
    base = auto.from_pretrained(base_dir, **kw)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    exact, base_logits = [], []
    with torch.no_grad():
        for ids in inputs:
            exact.append(_logits(model, ids))
            with model.disable_adapter():
                base_logits.append(_logits(model, ids))
        ref = model.merge_and_unload()
        if saved_dtype != torch.float32:
            for p in ref.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(saved_dtype).float()
        same_precision = [_logits(ref, ids) for ids in inputs]
    diff = max((m - r).abs().max().item() for m, r in zip(want, same_precision))
    rounding = max((r - e).abs().max().item() for r, e in zip(same_precision, exact))
    moved = max((m - b).abs().max().item() for m, b in zip(want, base_logits))
    scale = max(e.abs().max().item() for e in exact)
    # float32 merges W + s*B@A in another order than PEFT: float32 noise. Lower precision: a few
    # weights round the other way; allowed a tenth of what rounding everything does, at least
    # the float32 allowance.
    tolerance = max(1e-4 * max(scale, 1.0), 0.1 * rounding)
    return {"max_abs_logit_diff": diff, "rounding_effect": rounding, "tolerance": tolerance, "ok": diff <= tolerance,
            "base_vs_merged_max_diff": moved,
            # an adapter that does nothing (lora_B still zero) merges "correctly" too: say so
            "differs_from_base": moved > max(diff, 1e-6)}


@contextmanager
def quiet():
    """The engine never prints: silence transformers' load bars and reports and PEFT's warnings
    (tied embeddings), then restore them."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _auto_class(task_type: str | None):
    import transformers

    name = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
            "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}.get(task_type or "", "AutoModelForCausalLM")
    return getattr(transformers, name)


def _sample_inputs(folder: Path, vocab: int, trust_remote_code: bool) -> list[torch.Tensor]:
    """Token ids of a few sentences when the folder has a tokenizer, else fixed random ids."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        out = []
        for text in SAMPLES:
            ids = tok(text)["input_ids"][:MAX_TOKENS]
            if ids:
                # a tokenizer larger than a tiny test model's vocabulary: stay inside the embedding
                out.append(torch.tensor([[i % vocab for i in ids]]))
        if out:
            return out
    except Exception:  # no or unusable tokenizer files: random ids test the weights just as well
        pass
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 16), generator=g) for _ in SAMPLES]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    # batch of one: sequence classifiers without a pad token refuse larger batches
    out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()
