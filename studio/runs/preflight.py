"""Preflight: can this config start, and if not, why; asked before a run folder or a process exists.

One answer for every surface: `studio train` refuses with it (exit 2), the UI's Start button is
disabled with it, and a queued run is checked with it again before it starts. Each refusal is a
StudioError whose message names the model, file, field or target, so the trainer never starts
only to fail ten seconds later on something knowable now.
"""

from __future__ import annotations

from pathlib import Path

from studio import lora, models
from studio.config import RunConfig
from studio.data.load import check_task, load_config_data
from studio.errors import ConfigError
from studio.models.shards import pickled_files
from studio.models.tree import model_tree


def preflight(cfg: RunConfig) -> None:
    """Refuse what the trainer would fail on, before a run folder or a process exists.

    Costs well under a second (the model is built on the meta device); each refusal is a
    StudioError whose message names the model, file or target.
    """
    m = cfg.model
    src = models.resolve(m.name_or_path)
    if src.explore_only:
        raise ConfigError(no_weights_reason(m.name_or_path, src.path))
    check_task(load_config_data(cfg.data), m.task)  # bad data: file:line and what is wrong
    lora.check(model_tree(m.name_or_path, m.task, m.trust_remote_code), cfg.lora)  # targets that match nothing
    check_switches(cfg)


def check_switches(cfg: RunConfig) -> None:
    """Quantization, precision, optimizer and checkpointing that this machine and model can run."""
    import importlib.util

    import torch

    m, t = cfg.model, cfg.train
    cuda = torch.cuda.is_available()
    needs_bnb = [f"model.quantization {m.quantization}"] if m.quantization != "none" else []
    needs_bnb += ["train.optim adamw_8bit"] if t.optim == "adamw_8bit" else []
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{' and '.join(needs_bnb)} needs bitsandbytes, which is not installed: "
                          "pip install bitsandbytes (or pip install 'lora-studio[quant]')")
    if t.precision == "fp16" and not cuda:
        raise ConfigError("train.precision fp16 needs a CUDA GPU and this machine has none; use fp32, "
                          "or bf16 (slower than fp32 on most CPUs)")
    if t.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
                          "use fp16 or fp32")
    if t.gradient_checkpointing:
        klass = models.model_class(models.load_hf_config(m.name_or_path, m.trust_remote_code), m.task)
        if not getattr(klass, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {klass.__name__} ({m.name_or_path}) does not support "
                              "gradient checkpointing; turn it off")


def no_weights_reason(ref: str, path: Path | None) -> str:
    """Why a model reference cannot train: pickled weights are named as such."""
    folder = path if path is not None and path.is_dir() else None
    pickled = pickled_files(folder) if folder is not None else []
    if pickled:
        return (f"model {ref} has only pickled weights ({', '.join(pickled[:3])}), which are never loaded (a pickle "
                "can run code); convert them to safetensors (save_pretrained(..., safe_serialization=True))")
    return (f"model {ref} is explore-only (a config without *.safetensors weights): it can show its tree and "
            "counts but not train; pick a built-in or a folder with weights")


def check_runs_folder(root: Path) -> None:
    """The runs folder, or a folder above it, must not be a file (a mistyped --runs-dir); one line if so."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"runs folder {root} is a file, not a folder; pass --runs-dir DIR or set STUDIO_RUNS_DIR")
    for parent in root.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"runs folder {root}: {parent} is a file, not a folder; pass --runs-dir DIR")
