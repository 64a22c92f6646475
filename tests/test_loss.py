"""Loss at labelled positions only equals transformers' own causal-LM loss, to float rounding."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from studio.models import load_model
from studio.runs.loss import IGNORE, labelled_loss, supported


def _batch(vocab: int = 256, b: int = 3, t: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = IGNORE  # a prompt that carries no loss
    labels[1, -5:] = IGNORE       # and some padding
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("ref,targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"])])
@pytest.mark.parametrize("items", [None, 40])
def test_equals_the_models_own_loss_and_gradients(ref, targets, items):
    torch.manual_seed(0)
    pm = get_peft_model(load_model(ref), LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                    task_type="CAUSAL_LM"))
    pm.eval()  # dropout off (GPT-2 has some), so both forwards see the same network; gradients still flow
    batch = _batch()
    assert supported(pm)
    kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    ours = labelled_loss(pm, batch, kw.get("num_items_in_batch"))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    theirs = pm(**batch, **kw, use_cache=False).loss
    theirs.backward()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours, theirs)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert torch.allclose(g_ours[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_packed_blocks_with_position_ids_give_the_same_loss():
    torch.manual_seed(0)
    model = load_model("tiny-llama")
    batch = _batch()
    batch.pop("attention_mask")
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(3, 1)  # two examples per block
    batch["position_ids"] = pos
    # use_cache=False as in training: with a cache, transformers does not turn position_ids into a
    # block-diagonal mask (the trainer turns the cache off for that reason).
    assert torch.allclose(labelled_loss(model, batch), model(**batch, use_cache=False).loss, rtol=1e-5, atol=1e-6)


def test_heads_that_change_their_logits_keep_the_models_own_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    assert not supported(model) and labelled_loss(model, _batch(vocab=64)) is None
