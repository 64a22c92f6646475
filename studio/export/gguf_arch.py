"""Per-architecture facts of the GGUF export: llama.cpp's names, hyperparameter keys and weight layouts.

llama.cpp's convert_hf_to_gguf.py is the reference for each entry: which Hugging Face classes map
to which llama.cpp architecture, the metadata keys each one reads, and the two layout changes a
weight needs (Llama's q/k row permutation for its interleaved rope, GPT-2's transposed Conv1D).
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.errors import ExportError

# name -> (llama.cpp architecture, Llama-style q/k permutation, Conv1D weights to transpose)
ARCHS = {
    "LlamaForCausalLM": ("llama", True, False),
    "MistralForCausalLM": ("llama", True, False),
    "Qwen2ForCausalLM": ("qwen2", False, False),
    "Qwen3ForCausalLM": ("qwen3", False, False),
    "GPT2LMHeadModel": ("gpt2", False, True),
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}  # a config without `architectures`
# Buffers transformers keeps in some checkpoints that llama.cpp recomputes.
_SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def _permuter(cfg: dict):
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)

    def permute(w: torch.Tensor, kind: str) -> torch.Tensor:
        # convert_hf_to_gguf.py LlamaModel.permute: rotate-half pairs (i, i + d/2) -> adjacent (2i, 2i + 1)
        n = heads if kind == "permute_q" else kv
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()
    return permute


def _add_hparams(w, arch: str, cfg: dict, n_vocab: int) -> None:
    if arch == "gpt2":
        n_embd = int(cfg["n_embd"])
        w.add_context_length(int(cfg.get("n_ctx") or cfg["n_positions"]))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(int(cfg.get("n_inner") or 4 * n_embd))
        w.add_block_count(int(cfg["n_layer"]))
        w.add_head_count(int(cfg["n_head"]))
        w.add_layer_norm_eps(float(cfg.get("layer_norm_epsilon", 1e-5)))
        return
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(float(_rope(cfg).get("rope_theta", 10000.0)))
    if arch == "llama":
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim") and head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _rope(cfg: dict) -> dict:
    """Transformers 5 writes rope settings as rope_parameters; older configs as rope_theta / rope_scaling."""
    rp = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in rp and cfg.get("rope_theta") is not None:
        rp["rope_theta"] = cfg["rope_theta"]
    if cfg.get("rope_scaling"):
        rp.update(cfg["rope_scaling"])
    return rp


def _check_rope(cfg: dict, base_dir: Path) -> None:
    kind = _rope(cfg).get("rope_type") or _rope(cfg).get("type") or "default"
    if kind != "default":
        raise ExportError(f"{base_dir}: rope scaling {kind!r} is not exported to GGUF yet; supported: default rope")


def _MODEL_ARCH(gguf) -> dict:
    A = gguf.MODEL_ARCH
    return {"llama": A.LLAMA, "qwen2": A.QWEN2, "qwen3": A.QWEN3, "gpt2": A.GPT2}
