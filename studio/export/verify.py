"""Prove a merge: the merged model must give the logits of base + adapter run by PEFT.

This loads whole models (the merged one, then the base with the adapter), so it costs about
one model of memory in float32, unlike the merge itself; the merged model is dropped before
the base is loaded. Both run in float32 whatever the saved dtype, so the difference measures
the merge (and its output rounding), not low-precision arithmetic.
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
                 num_labels: int | None = None, trust_remote_code: bool = False) -> dict:
    """{max_abs_logit_diff, base_vs_merged_max_diff, differs_from_base} on a few sample inputs."""
    with quiet():
        return _verify(merged_dir, base_dir, adapter_dir, task_type, num_labels, trust_remote_code)


def _verify(merged_dir, base_dir, adapter_dir, task_type, num_labels, trust_remote_code) -> dict:
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
    diff = moved = 0.0
    with torch.no_grad():
        for ids, m in zip(inputs, want):
            p = _logits(model, ids)
            with model.disable_adapter():
                b = _logits(model, ids)
            diff = max(diff, (m - p).abs().max().item())
            moved = max(moved, (m - b).abs().max().item())
    return {"max_abs_logit_diff": diff, "base_vs_merged_max_diff": moved,
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
