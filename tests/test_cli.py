"""The CLI as a user runs it: a subprocess, exit codes, one-line errors, JSON on stdout."""

import json
import subprocess
import sys

import pytest


def studio(*args, check_rc=None):
    """The real entry point in a subprocess (imports, exit status, streams)."""
    p = subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


class Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


@pytest.fixture
def run(capsys):
    """`studio.cli.main` in this process: the same code path without paying torch's import each time."""
    from studio.cli import main

    def call(*args, check_rc=None):
        rc = main(list(args))
        cap = capsys.readouterr()
        if check_rc is not None:
            assert rc == check_rc, (rc, cap.out, cap.err)
        return Result(rc, cap.out, cap.err)

    return call


@pytest.mark.slow
def test_count_json_has_the_contract_keys_and_equals_the_engine():
    from studio import lora
    from studio.config import LoraSettings
    from studio.models.tree import model_tree

    p = studio("count", "--model", "llama-3.1-8b", "--targets", "q_proj,v_proj", "--r", "16", "--layers", "0-3,8",
               "--json", check_rc=0)
    out = json.loads(p.stdout)
    for key in ("trainable", "total", "trainable_percent", "matched_modules", "unmatched_targets", "by_type",
                "by_layer", "adapter_mb"):
        assert key in out
    assert len(out["matched_modules"]) == 10 and set(out["by_layer"]) == {"0", "1", "2", "3", "8"}
    expected = lora.count(model_tree("llama-3.1-8b"),
                          LoraSettings(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                       layers_to_transform=[0, 1, 2, 3, 8]))
    assert out["trainable"] == expected.trainable == 5 * 16 * (8192 + 5120)
    assert set(out["adapter_mb"]) == {"float32", "bfloat16"}


def test_tree_json_is_nested_and_folded(run):
    p = run("tree", "--model", "tiny-llama", "--json", check_rc=0)
    out = json.loads(p.stdout)
    assert out["class"] == "LlamaForCausalLM" and out["total_params"] > 1_000_000
    layers = out["nodes"]["children"][0]["children"][1]
    assert layers["name"] == "layers" and layers["children"][0]["repeat"] == 4
    for key in ("name", "path", "class", "params", "lora_targetable", "repeat", "children"):
        assert key in layers


def test_tree_text_output(run):
    p = run("tree", "--model", "gpt2", check_rc=0)
    assert "(0-11): 12 x GPT2Block" in p.stdout


def test_count_text_and_sweep(run):
    p = run("count", "--model", "tiny-llama", "--targets", "all-linear", "--r", "4", check_rc=0)
    assert "trainable of" in p.stdout and "scaling alpha/r = 2" in p.stdout
    p = run("count", "--model", "qwen2.5-0.5b", "--targets", "all-linear", "--sweep", "--json", check_rc=0)
    rows = json.loads(p.stdout)["sweep"]
    assert len(rows) == 4 * 8


@pytest.mark.parametrize("args, needle", [
    (["count", "--model", "tiny-lama", "--targets", "q_proj"], "unknown model 'tiny-lama'; built-ins: tiny-llama"),
    (["count", "--model", "tiny-llama", "--targets", "q_proj,vproj"], "'vproj' (closest: v_proj"),
    (["count", "--model", "tiny-llama", "--targets", "q_proj", "--r", "0"], "lora.r must be an integer >= 1, got 0"),
    (["count", "--model", "tiny-llama", "--targets", "q_proj", "--alpha", "0"], "lora_alpha must be a number > 0"),
    (["count", "--model", "tiny-llama", "--targets", "q_proj", "--layers", "1-x"], "--layers: '1-x'"),
    (["count", "--model", "tiny-llama", "--targets", "re:(unclosed"], "not a valid regular expression"),
    (["count", "--model", "tiny-llama", "--targets", "mlp"], "LoRA cannot wrap"),
    (["tree", "--model", "org/not-here"], "cannot fetch Hub model 'org/not-here'"),
    (["tree", "--model", "/nonexistent/folder"], "model folder /nonexistent/folder does not exist"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(run, args, needle):
    p = run(*args, check_rc=2)
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stdout == ""


@pytest.mark.slow
def test_folder_without_config_exits_2_from_the_console_script(tmp_path):
    p = studio("tree", "--model", str(tmp_path), check_rc=2)
    assert "has no config.json" in p.stderr and "Traceback" not in p.stderr
