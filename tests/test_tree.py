import pytest

from studio.models.tree import model_tree, render


def _find(node, name):
    if node["name"] == name:
        return node
    for kid in node.get("children", []):
        hit = _find(kid, name)
        if hit:
            return hit
    return None


@pytest.mark.slow
def test_405b_tree_folds_126_identical_layers():
    tree = model_tree("llama-3.1-405b")
    folded = _find(tree.nodes, "0-125")
    assert folded["repeat"] == 126 and folded["class"] == "LlamaDecoderLayer"
    assert len(folded["members"]) == 126 and folded["members"][-1] == "model.layers.125"
    assert folded["params"] == 126 * tree.by_path["model.layers.0"].params
    text = render(tree)
    assert "(0-125): 126 x LlamaDecoderLayer" in text and len(text.splitlines()) < 40
    q = _find(folded, "q_proj")
    assert q["in_features"] == 16384 and q["out_features"] == 16384 and q["lora_targetable"]


def test_parameter_totals_add_up_and_tied_weights_count_once():
    tree = model_tree("tiny-gpt2")
    root = tree.nodes
    assert root["params"] == tree.total_params == sum(k["params"] for k in root["children"]) - tree.by_path["lm_head"].params
    assert tree.by_path["transformer.h.0.attn.c_attn"].kind == "conv1d"
    assert tree.by_path["transformer.h.0.attn.c_attn"].out_features == 3 * 192


def test_blocks_that_differ_stay_separate():
    from torch import nn

    from studio.models.tree import build_tree

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    tree = build_tree(model, "seq")
    names = [(k["name"], k["repeat"]) for k in tree.nodes["children"]]
    assert names == [("0-1", 2), ("2", 1), ("3-4", 2)]


def test_non_lora_modules_are_marked_and_leaf_types_listed():
    tree = model_tree("tiny-llama")
    assert not tree.by_path["model.layers.0.input_layernorm"].lora_targetable
    assert tree.targetable_types() == ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj", "lm_head"]
    assert "lm_head" not in tree.all_linear and len(tree.all_linear) == 4 * 7


def test_seq_cls_tree_excludes_the_head_from_all_linear():
    tree = model_tree("minilm-l6")
    assert tree.task == "seq_cls" and "classifier" in tree.by_path
    assert "classifier" not in tree.all_linear
