"""What the trainer sees: the first examples as token pieces, each trained or masked.

The tokens come from the very code the trainer uses (prepare.py's `_CausalEncoder`, which
renders a conversation with the model's own chat template and masks it by `_segments`), then
go through the same truncation, PadCollator padding or packing as `build_datasets` applies, so
the preview and the training data cannot disagree. What the studio adds here is the view:
which message each token belongs to (system, user, assistant), which tokens are special, and
the two mistakes that make a tuned chat model ramble: a chat dataset on a model without a chat
template, and an end-of-turn token that never carries loss. Plain data only; the UI renders it.
"""

from __future__ import annotations

from studio.data.load import load_records
from studio.data.prepare import IGNORE, PadCollator, _CausalEncoder, chat_prompt, pack

DEFAULT_EXAMPLES = 3
PAD, SPECIAL = "pad", "special"


def token_preview(path: str, tokenizer, fmt: str = "auto", *, n: int = DEFAULT_EXAMPLES, max_length: int = 256,
                  packing: bool = False, train_on_prompt: bool = False, columns: dict | None = None) -> dict:
    """The first `n` causal-LM examples of `path` as the trainer's sequences.

    Returns {"format", "chat_template": bool, "packed": bool, "end_of_turn": token text or None,
    "sequences": [{"pieces": [{"text", "ids", "trained", "kind"}], "tokens", "trained",
    "truncated"}], "warnings": [str]}. `kind` is the role of the message a token renders
    (system, user, assistant), "prompt" outside conversations, "special" for a special token
    the template adds, "pad" for padding. Without packing the sequences are the examples
    truncated to max_length and padded as one batch (right side, as PadCollator pads); with
    packing they are the first blocks `pack` cuts, where the first token of every piece is
    masked. Classification datasets have no token masks: DataError from the caller's check.
    """
    d = load_records(path, fmt, columns)
    if d.format == "classification":
        return {"format": d.format, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "packed": False, "end_of_turn": None, "sequences": [], "warnings": []}
    m = min(n, d.num_rows)
    rows = [dict(r) for r in d.dataset.select(range(m))]
    wheres = [d.locate(i) for i in range(m)]
    enc = _CausalEncoder(tokenizer, d.format, d.text_column, train_on_prompt)
    encoded = enc.encode(rows, wheres)
    kinds = [_kinds(tokenizer, enc, r, d.format, ids) for r, (ids, _) in zip(rows, encoded)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs = []
    if packing:
        blocks = pack([i for i, _ in encoded], [lab for _, lab in encoded], max_length, pad_id)
        flat = [k for ks in kinds for k in ks]
        for b in range(min(len(blocks["input_ids"]), max(1, m))):
            ids, labels, mask = (blocks[k][b].tolist() for k in ("input_ids", "labels", "attention_mask"))
            ks = [flat[b * max_length + j] if mask[j] else PAD for j in range(max_length)]
            seqs.append((ids, labels, mask, ks, False))
    else:
        cut = [(ids[:max_length], lab[:max_length], ks[:max_length], len(ids) > max_length)
               for (ids, lab), ks in zip(encoded, kinds)]
        batch = PadCollator(pad_id)([{"input_ids": i, "labels": lab} for i, lab, _, _ in cut]) if cut else None
        for j, (_, _, ks, truncated) in enumerate(cut):
            ids, labels, mask = (batch[k][j].tolist() for k in ("input_ids", "labels", "attention_mask"))
            seqs.append((ids, labels, mask, ks + [PAD] * (len(ids) - len(ks)), truncated))
    eot = end_of_turn_id(tokenizer, d.format)
    out_seqs = [{"pieces": pieces(tokenizer, ids, labels, mask, ks), "tokens": sum(mask),
                 "trained": sum(lab != IGNORE for lab in labels), "truncated": truncated}
                for ids, labels, mask, ks, truncated in seqs]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    warnings = []
    if d.format == "messages" and not has_template:
        warnings.append("this is a chat dataset, but the model's tokenizer has no chat template: conversations are "
                        "rendered with the plain \"<|role|>\" fallback the model has never seen, and a tuned model "
                        "learns that format instead of its own; pick a chat model (one with a chat template)")
    trained_ids = {lab for ids, labels, *_ in seqs for lab in labels if lab != IGNORE}
    if eot is not None and trained_ids and eot not in trained_ids:
        name = tokenizer.convert_ids_to_tokens(eot)
        cut = any(t for *_, t in seqs)
        warnings.append(f"the end-of-turn token {name} is never trained in these examples: the tuned model will "
                        "not learn where an answer ends and keeps generating (rambles)"
                        + (f"; here max_length={max_length} cuts the examples before it" if cut else ""))
    if any(s["trained"] == 0 for s in out_seqs if s["tokens"]):
        warnings.append("some sequences here carry no trained token at all (every answer cut off by max_length?)")
    return {"format": d.format, "chat_template": has_template, "packed": packing,
            "end_of_turn": tokenizer.convert_ids_to_tokens(eot) if eot is not None else None,
            "sequences": out_seqs, "warnings": warnings}


def end_of_turn_id(tokenizer, fmt: str) -> int | None:
    """The token that ends an answer: for a conversation under a chat template, the first special
    token the template writes after an assistant's content (ChatML's <|im_end|>); else EOS."""
    if fmt == "messages" and getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "PROBE-ANSWER"}]
        try:
            text = chat_prompt(tokenizer, probe, add_generation_prompt=False)
        except Exception:  # a template that refuses the probe: fall back to EOS
            text = ""
        tail = text.split("PROBE-ANSWER", 1)[1] if "PROBE-ANSWER" in text else ""
        special = set(tokenizer.all_special_ids)
        for t in tokenizer(tail, add_special_tokens=False).input_ids if tail else []:
            if t in special or t == tokenizer.eos_token_id:
                return t
    return tokenizer.eos_token_id


def pieces(tokenizer, ids: list[int], labels: list[int], mask: list[int], kinds: list[str]) -> list[dict]:
    """Token pieces with their exact text: each is the text the token adds to the decoded prefix,
    so leading spaces and byte-level characters come out as the model reads them; tokens that
    end inside a character are joined with the next one."""
    special = set(tokenizer.all_special_ids)
    out, pending, prev, start = [], [], "", 0
    real = [i for i, on in zip(ids, mask) if on]
    n_real = len(real)
    for j, (t, lab, on, kind) in enumerate(zip(ids, labels, mask, kinds)):
        if not on:
            out.append({"text": tokenizer.convert_ids_to_tokens(t) or "", "ids": [t], "trained": False, "kind": PAD})
            continue
        pending.append((t, lab))
        upto = ids[start: j + 1]
        cur = tokenizer.decode(upto, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if (cur.endswith("\ufffd") and j + 1 < n_real) or not cur.startswith(prev):
            if not cur.startswith(prev):  # a decoder that rewrites its prefix: restart from here
                start, prev = j + 1, ""
                out.append(_piece(tokenizer, pending, cur, kind, special))
                pending = []
            continue
        out.append(_piece(tokenizer, pending, cur[len(prev):], kind, special))
        prev, pending = cur, []
    return out


def _piece(tokenizer, pending, text, kind, special) -> dict:
    ids = [t for t, _ in pending]
    is_special = any(t in special for t in ids)
    if is_special and not text:
        text = "".join(tokenizer.convert_ids_to_tokens(ids))
    return {"text": text, "ids": ids, "trained": all(lab != IGNORE for _, lab in pending),
            "kind": SPECIAL if is_special else kind}


def _kinds(tokenizer, enc: _CausalEncoder, row: dict, fmt: str, ids: list[int]) -> list[str]:
    """The role behind each token of one encoded example: the message its first character
    belongs to (conversations, with a fast tokenizer's offsets), else "prompt"/"assistant"."""
    if fmt != "messages" or not getattr(tokenizer, "is_fast", False):
        return ["prompt"] * len(ids)
    msgs = row["messages"]
    whole = chat_prompt(tokenizer, msgs, add_generation_prompt=False)
    bounds = []
    for i in range(len(msgs)):
        try:
            upto = chat_prompt(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        except Exception:  # a template that demands a full conversation: roles unknown
            return ["prompt"] * len(ids)
        bounds.append(len(upto) if whole.startswith(upto) else len(whole))
    # Some templates (SmolLM2's) write a default system prompt when a conversation has none: it
    # renders before the first message's own header, inside that message's span.
    first = whole.find(msgs[0]["content"]) if msgs[0]["content"] else -1
    header = whole.rfind(msgs[0]["role"], 0, first) if first > 0 else -1
    injected = header if msgs[0]["role"] != "system" and "system" in whole[:max(header, 0)].lower() else 0
    offs = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    roles = []
    for a, _ in offs:
        k = next((i for i, b in enumerate(bounds) if a < b), len(msgs) - 1)
        roles.append("system" if a < injected else msgs[k]["role"])
    if len(ids) > len(roles) and enc.bos is not None and ids[:1] == [enc.bos]:
        roles.insert(0, SPECIAL)
    roles += [roles[-1] if roles else "prompt"] * (len(ids) - len(roles))  # the EOS the encoder appends
    return roles[: len(ids)]
