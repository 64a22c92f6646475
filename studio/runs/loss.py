"""The causal-LM loss computed only where labels are: the output head runs on labelled positions only.

With response-only masking most positions carry no loss (the prompt, the system turn, padding),
yet a model's own forward projects every position onto the vocabulary and keeps those logits in
float32 for the loss: on SmolLM2 (vocabulary 49,152, a 28M-parameter head of 135M) that is a
large share of the step's compute and of its activation memory. Here the decoder runs as usual,
and the head and the cross entropy run on the hidden states of the labelled positions alone;
the loss is the one transformers computes (ForCausalLMLoss: sum over labelled tokens, divided by
num_items_in_batch when Trainer passes it, else their mean), to float rounding.

Transformers has no option for this (its `logits_to_keep` keeps the last positions, not chosen
ones), hence this module. It applies to the architectures whose logits are exactly
`lm_head(hidden)`; models that scale or cap their logits afterwards (Gemma 2's soft-capping,
Cohere's logit_scale, ...) keep their own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
# Architectures whose causal-LM forward is: decoder -> lm_head -> logits, nothing after.
PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gemma", "olmo", "olmo2")


def _core(model):
    """The transformers model under DDP / PEFT wrappers, with LoRA layers injected in place."""
    m = getattr(model, "module", model)  # DistributedDataParallel
    get_base = getattr(m, "get_base_model", None)
    return get_base() if callable(get_base) else m


def supported(model) -> bool:
    core = _core(model)
    cfg = getattr(core, "config", None)
    return (getattr(cfg, "model_type", None) in PLAIN_HEAD
            and callable(getattr(core, "get_output_embeddings", None)) and core.get_output_embeddings() is not None
            and getattr(core, getattr(core, "base_model_prefix", ""), None) is not None
            and not getattr(cfg, "final_logit_softcapping", None))


def labelled_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor | None:
    """The training loss of `inputs` computed at labelled positions only; None when it does not apply."""
    labels = inputs.get("labels")
    if labels is None or not supported(model):
        return None
    core = _core(model)
    body = getattr(core, core.base_model_prefix)
    head = core.get_output_embeddings()
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    out = body(**kwargs, use_cache=False, return_dict=True)
    hidden = out.last_hidden_state
    target = labels[..., 1:]
    keep = target != IGNORE
    logits = head(hidden[..., :-1, :][keep]).float()  # [labelled tokens, vocabulary]
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(denom):
        denom = denom.to(loss.device)
    return loss / denom
