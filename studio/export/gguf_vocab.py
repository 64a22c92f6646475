"""The tokenizer as GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys) and the chat template.

llama.cpp does not run a `tokenizer.json`: it rebuilds the tokenizer from a token list, the
token types, the merges, a named pre-tokenizer (the regex that splits text before merging) and
the special token ids. gguf-py writes those keys; what the studio adds is reading them off the
Hugging Face tokenizer the run trained with (training may have added a pad token, so the run's
own tokenizer files win over the base's) and naming its pre-tokenizer, which llama.cpp's
converter does by hashing the tokenizer's output on a test string against a table of known
models; the studio recognises the split rules themselves instead, so an unknown rule is refused
by name rather than written under a wrong one.

Byte-level BPE (GPT-2, Llama 3, Qwen2/3, SmolLM2, the studio's byte tokenizer) is written as
llama.cpp's "gpt2" tokenizer model. SentencePiece-style vocabularies (Llama 2, TinyLlama,
Mistral v0.1) are refused with the supported list: transformers' GGUF reader rebuilds those
from scores, which does not round-trip ids exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from studio.errors import ExportError

# tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The split rules llama.cpp knows by these pre-tokenizer names (llama-vocab.cpp), as the
# Hugging Face tokenizers of those families write them.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
PRE_TOKENIZERS = ("gpt-2 (ByteLevel)", "smollm (Digits + ByteLevel)", "qwen2", "llama-bpe (Llama 3)",
                  "default (ByteLevel without regex, no merges)")

# Tokens that end a turn in the chat formats the studio recognises.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Vocab:
    model: str                    # tokenizer.ggml.model
    pre: str                      # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]       # bos / eos / unk / pad / eot -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    stop_tokens: list[str] = field(default_factory=list)   # end-of-turn token texts, eos included


def read_vocab(tok, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer, padded to the model's `vocab_size`."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tok).__name__} has no tokenizers backend (tokenizer.json); "
                          "only fast tokenizers can be exported to GGUF")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type", "?") + (" with byte_fallback (SentencePiece-style)" if model.get("byte_fallback") else "")
        raise ExportError(f"tokenizer model {kind} cannot be exported to GGUF yet; supported: byte-level BPE "
                          f"with pre-tokenizer {', '.join(PRE_TOKENIZERS)}")
    pre = _pre_name(spec.get("pre_tokenizer"), bool(model.get("merges")))

    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:  # the embedding is larger than the tokenizer (Qwen pads to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{key}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n:
            special[key] = tid
    stops = []
    vocab = tok.get_vocab()
    for t in END_OF_TURN:
        if t in vocab and types[vocab[t]] == CONTROL:
            stops.append(t)
            special.setdefault("eot", vocab[t])
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    probe = tok("a")["input_ids"]
    add_bos = bool(probe) and "bos" in special and probe[0] == special["bos"]
    add_eos = bool(probe) and "eos" in special and probe[-1] == special["eos"] and len(probe) > 1
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return Vocab("gpt2", pre, tokens, types, merges, special, add_bos, add_eos, template, stops)


def write_vocab(writer, v: Vocab) -> None:
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    # llama.cpp refuses a BPE vocabulary without the key, even when there are no merges (a byte
    # tokenizer); add_token_merges skips an empty list, so the key is written with its element type.
    import gguf

    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, v.merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    for key, tid in v.special.items():
        getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)


def _pre_name(pre: dict | None, has_merges: bool) -> str:
    """llama.cpp's name for the pre-tokenizer, recognised from its split rules."""
    parts = _flatten(pre)
    kinds = [p.get("type") for p in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"]:
        if byte_level[0].get("use_regex", True):
            return "gpt-2"
        if not has_merges:  # one token per byte: how text is split cannot change the ids
            return "default"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in SPLITS:
            return SPLITS[pattern]
    shown = json.dumps(pre)[:160]
    raise ExportError(f"tokenizer pre-tokenizer {shown} is not one llama.cpp knows by name; supported: "
                      f"{', '.join(PRE_TOKENIZERS)}")


def _flatten(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers") or [] for p in _flatten(sub)]
    return [pre]


# --- Ollama -----------------------------------------------------------------------------------

# Ollama's own shape for these families: .Messages when the client sends a conversation (system
# turns included, so .System is not added again), else the one-shot .System / .Prompt form.
def _ollama_template(turn: str, end: str, assistant: str) -> str:
    one = lambda role, var: f"{{{{ if .{var} }}}}{turn.format(role=role)}{{{{ .{var} }}}}{end}{{{{ end }}}}"
    return ("{{- if .Messages }}\n{{- range .Messages }}" + turn.format(role="{{ .Role }}") + "{{ .Content }}" + end
            + "{{ end }}" + assistant + "{{ else }}" + one("system", "System") + one("user", "Prompt") + assistant
            + "{{ end }}{{ .Response }}{{ if .Response }}" + end.rstrip("\n") + "{{ end }}")


_CHATML = _ollama_template("<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n")
_LLAMA3 = _ollama_template("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
# The studio's own plain template (studio.models.registry.CHAT_TEMPLATE): no end-of-turn token.
_PLAIN = _ollama_template("<|{role}|>\n", "\n", "<|assistant|>\n")


def template_family(chat_template: str | None) -> str | None:
    """chatml | llama3 | plain for the chat templates the Modelfile can express; None otherwise."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if re.search(r"<\|\{\{\s*m\['role'\]\s*\}\}\|>", chat_template):
        return "plain"
    return None


def modelfile(gguf_name: str, v: Vocab) -> str:
    """An Ollama Modelfile for the GGUF next to it: FROM, TEMPLATE and one stop per end-of-turn token."""
    lines = [f"FROM ./{gguf_name}", ""]
    family = template_family(v.chat_template)
    tmpl = {"chatml": _CHATML, "llama3": _LLAMA3, "plain": _PLAIN}.get(family or "")
    if tmpl:
        lines += [f'TEMPLATE """{tmpl}"""', ""]
    elif v.chat_template:
        lines += ["# The model's chat template is not one this exporter can translate to Ollama's; it is in",
                  "# the GGUF as tokenizer.chat_template, which llama.cpp and LM Studio use.", ""]
    stops = list(v.stop_tokens)
    if family == "plain":
        stops.append("<|user|>")  # the plain template has no end-of-turn token: the next header ends a turn
    for s in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines).rstrip() + "\n"
