"""Preflight's memory check: a run that cannot fit is refused with the numbers and the switches
that would make it fit, each of which really does; the user can insist."""

from __future__ import annotations

import copy
import re

import pytest

from studio import lora
from studio.config import RunConfig
from studio.errors import ConfigError
from studio.models import memory
from studio.models.tree import model_tree
from studio.runs import preflight as pf


def tiny(batch: int = 8, max_length: int = 256) -> RunConfig:
    c = RunConfig()  # tiny-llama on the built-in instructions dataset
    c.train.per_device_train_batch_size, c.data.max_length = batch, max_length
    return c


def need(cfg: RunConfig, device: str = "cpu") -> int:
    tree = model_tree(cfg.model.name_or_path, cfg.model.task)
    return pf.needed_memory(tree, lora.check(tree, cfg.lora), cfg.lora, device, **pf.run_memory(cfg, device))[0]


def apply(cfg: RunConfig, idea: str) -> RunConfig:
    """The config a suggestion of the refusal names."""
    c = copy.deepcopy(cfg)
    for section, name, value in re.findall(r"(model|data|train)\.(\w+) (\w+)", idea):
        part = getattr(c, section)
        old = getattr(part, name)
        setattr(part, name, value == "true" if isinstance(old, bool) else type(old)(value))
    return c


@pytest.fixture
def cpu_limit(monkeypatch):
    """Check against a memory size of the test's choosing, on the CPU, whatever this machine has."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)

    def set_limit(n: int) -> int:
        monkeypatch.setenv(pf.MEMORY_ENV, str(n))
        return n
    return set_limit


def test_a_run_that_cannot_fit_is_refused_with_the_numbers_and_each_switch_fits(cpu_limit):
    cfg = tiny()
    total = need(cfg)
    # the estimate plus the stated allowances, as the message adds them up
    tree = model_tree("tiny-llama")
    est = memory.estimate(tree, lora.check(tree, cfg.lora), cfg.lora, batch=8, seq=256, device="cpu")
    logits = memory.logits_grad_bytes(tree, 8, 256)
    assert total == est.total_bytes + memory.PROCESS_BYTES + logits + int(
        pf.CPU_TRANSIENT_SHARE * (est.activations_bytes + logits))
    limit = cpu_limit(total - 40 * 2**20)
    with pytest.raises(ConfigError) as e:
        pf.preflight(cfg)
    msg = str(e.value)
    assert f"the memory estimate is {pf._gb(total)}" in msg
    assert f"against {pf._gb(limit)} ({pf.MEMORY_ENV}) on the CPU: {pf._gb(total - limit)} too much" in msg
    assert "micro-batch 8 x max_length 256 (fp32" in msg and "--ignore-memory" in msg
    ideas = msg.split("would fit: ", 1)[1].rsplit(". To start it anyway", 1)[0].split("; ")
    assert any("per_device_train_batch_size" in i for i in ideas) and any("data.max_length" in i for i in ideas)
    for idea in ideas:
        fixed = apply(cfg, idea)
        assert pf._gb(need(fixed)) in idea  # the estimate the suggestion states is the one it gets
        pf.check_fits(fixed)  # and it fits
        eff = fixed.train.per_device_train_batch_size * fixed.train.gradient_accumulation_steps
        assert eff >= 8  # fewer rows per step, not fewer per update
    batch_idea = apply(cfg, next(i for i in ideas if "per_device_train_batch_size" in i))
    n = batch_idea.train.per_device_train_batch_size
    with pytest.raises(ConfigError):  # the largest micro-batch that fits (or keeps the effective batch)
        pf.check_fits(tiny(batch=n + 1 if 8 % n else 2 * n))
    length = apply(cfg, next(i for i in ideas if "data.max_length" in i)).data.max_length
    with pytest.raises(ConfigError):
        pf.check_fits(tiny(max_length=length + 8))
    pf.preflight(cfg, check_memory=False)  # the user insists
    cpu_limit(total)
    pf.preflight(cfg)  # exactly enough


def test_weights_in_their_own_dtype_and_precision_as_the_trainer_resolves_it(cpu_limit):
    cfg = tiny()
    cfg.train.precision, cfg.model.dtype = "bf16", "auto"  # bf16 autocast over fp32 weights on the CPU
    o = pf.run_memory(cfg, "cpu")
    assert (o["precision"], o["weights"]) == ("bf16", "fp32")
    tree = model_tree("tiny-llama")
    c = lora.check(tree, cfg.lora)
    _, parts = pf.needed_memory(tree, c, cfg.lora, "cpu", **o)
    assert parts["weights"] == tree.total_params * 4
    assert parts["activations"] == memory.estimate(tree, c, cfg.lora, batch=8, seq=256, precision="bf16",
                                                   device="cpu").activations_bytes
    assert pf.run_memory(tiny(), "cpu")["precision"] == "fp32"  # auto on the CPU


def test_nothing_fits_says_what_would_together_or_that_nothing_does(cpu_limit):
    cfg = tiny(batch=64, max_length=2048)
    cpu_limit(memory.PROCESS_BYTES + 16 * 2**20)
    with pytest.raises(ConfigError, match="These together would fit: train.per_device_train_batch_size 1 "
                                          r"\+ train.gradient_accumulation_steps 64") as e:
        pf.check_fits(cfg)
    pf.check_fits(apply(cfg, str(e.value).split("would fit: ", 1)[1]))
    cpu_limit(memory.PROCESS_BYTES - 1)
    with pytest.raises(ConfigError, match="Not even .* pick a smaller model or a device with more memory"):
        pf.check_fits(cfg)


def test_a_huge_run_is_refused_against_this_machines_own_memory(monkeypatch):
    monkeypatch.delenv(pf.MEMORY_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"will not fit: .* \((RAM available|left under this cgroup|free on GPU)"):
        pf.preflight(tiny(batch=1 << 16, max_length=1 << 20))


def test_a_bad_memory_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv(pf.MEMORY_ENV, "8G")
    with pytest.raises(ConfigError, match=r"STUDIO_MEMORY_LIMIT_BYTES='8G': give the memory as a whole number of bytes"):
        pf.preflight(tiny())


def test_cli_train_refuses_with_exit_2_and_ignore_memory_insists(cpu_limit, tmp_path, capsys):
    from studio.cli import main

    cfg_file = tmp_path / "run.yaml"
    tiny().save(cfg_file)
    cpu_limit(1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert main(["train", str(cfg_file), "--runs-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "will not fit" in err and "--ignore-memory" in err and len(err.strip().splitlines()) == 1
    # insisting passes preflight: the next check (the runs folder is a file) is what refuses now
    assert main(["train", str(cfg_file), "--runs-dir", str(blocker), "--ignore-memory"]) == 2
    err = capsys.readouterr().err
    assert "will not fit" not in err and "is a file, not a folder" in err
