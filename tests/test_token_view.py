"""The Data tab's token view (studio.data.token_view): what it shows is what build_datasets trains on."""

import json

import pytest

from studio.config import RunConfig
from studio.data import IGNORE, build_datasets, list_builtin
from studio.data.token_view import PAD, end_of_turn_id, token_preview
from studio.models.registry import byte_tokenizer

# ChatML as SmolLM2 writes it, default system prompt included, on the byte tokenizer with
# ChatML's two special tokens added: a real template on a tokenizer built in code.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same, but with the number of messages up front: rendering is not prefix-stable, so the
# trainer falls back to training the answers' content only, and <|im_end|> never carries loss.
UNSTABLE = "{{ messages|length }} turns\n" + CHATML


def chatml(template=CHATML):
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def _chat_file(tmp_path, n=4):
    rows = [{"messages": [{"role": "user", "content": f"Say {w} twice."},
                          {"role": "assistant", "content": f"{w} {w}"}]} for w in ["hi", "café", "ok", "yes"][:n]]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def _tokens(seq):
    """(ids, trained flags) of the non-padding tokens of a previewed sequence."""
    ids, flags = [], []
    for p in seq["pieces"]:
        if p["kind"] != PAD:
            ids += p["ids"]
            flags += [p["trained"]] * len(p["ids"])
    return ids, flags


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("which", ["instructions", "chat"])
def test_preview_tokens_and_marks_are_the_training_data(tmp_path, packing, which):
    path = _chat_file(tmp_path) if which == "chat" else next(d["path"] for d in list_builtin()
                                                             if d["name"] == "instructions")
    tok = chatml()
    cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny-llama"},
                               "data": {"path": path, "eval_fraction": 0.0, "max_length": 128, "packing": packing},
                               "train": {"per_device_train_batch_size": 1}})
    prep = build_datasets(cfg, tok)
    p = token_preview(path, tok, n=3, max_length=128, packing=packing)
    # three examples, or the blocks they fill (the last one padded where training continues it)
    assert len(p["sequences"]) == 3 if not packing else 1 <= len(p["sequences"]) <= 3
    for k, seq in enumerate(p["sequences"]):
        ids, flags = _tokens(seq)
        want_ids = [t for t, m in zip(prep.train[k]["input_ids"], prep.train[k].get("attention_mask") or
                                      [1] * len(prep.train[k]["input_ids"])) if m]
        assert ids == want_ids[: len(ids)] and len(ids) == seq["tokens"]
        assert flags == [lab != IGNORE for lab in prep.train[k]["labels"][: len(ids)]]
        assert seq["trained"] == sum(flags) > 0
        # the pieces' text is exactly the decoded tokens (special tokens shown as they are)
        assert "".join(p["text"] for p in seq["pieces"] if p["kind"] != PAD) == tok.decode(ids)


def test_chat_template_roles_special_tokens_and_padding(tmp_path):
    tok = chatml()
    p = token_preview(_chat_file(tmp_path), tok, n=3, max_length=256)
    assert p["chat_template"] and p["end_of_turn"] == "<|im_end|>" and p["warnings"] == []
    pieces = p["sequences"][0]["pieces"]
    trained = "".join(x["text"] for x in pieces if x["trained"])
    assert trained == "hi hi<|im_end|>\n</s>"  # the answer, its end-of-turn marker and EOS, nothing else
    kinds = {x["kind"] for x in pieces}
    assert {"system", "user", "assistant", "special", PAD} <= kinds  # "hi" is the shortest: padded
    assert "".join(x["text"] for x in pieces if x["kind"] == "system") == "system\nBe brief.\n"
    assert all(not x["trained"] for x in pieces if x["kind"] in ("system", "user", PAD))
    # a multi-byte character split over byte tokens comes out whole, in one piece
    assert any(x["text"] == "é" and len(x["ids"]) == 2 for x in p["sequences"][1]["pieces"])


def test_end_of_turn_never_trained_is_warned(tmp_path):
    tok = chatml(UNSTABLE)
    assert end_of_turn_id(tok, "messages") == tok.convert_tokens_to_ids("<|im_end|>")
    p = token_preview(_chat_file(tmp_path), tok, n=3)
    assert any("end-of-turn token <|im_end|> is never trained" in w for w in p["warnings"])
    assert p["warnings"] and not any("cuts" in w for w in p["warnings"])


def test_chat_dataset_on_a_model_without_a_chat_template_is_warned(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = None
    p = token_preview(_chat_file(tmp_path), tok, n=2)
    assert not p["chat_template"] and any("no chat template" in w for w in p["warnings"])
    # an alpaca dataset needs no chat template: no such warning
    alpaca = next(d["path"] for d in list_builtin() if d["name"] == "instructions")
    assert not any("chat template" in w for w in token_preview(alpaca, tok, n=2)["warnings"])
