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
from studio.models import memory
from studio.models.shards import pickled_files
from studio.models.tree import model_tree
from studio.runs import memory_guard


def preflight(cfg: RunConfig, check_memory: bool = True) -> None:
    """Refuse what the trainer would fail on, before a run folder or a process exists.

    Costs well under a second (the model is built on the meta device); each refusal is a
    StudioError whose message names the model, file or target. `check_memory=False` is the
    user insisting on a run the memory estimate says will not fit (`studio train --ignore-memory`).
    """
    m = cfg.model
    src = models.resolve(m.name_or_path)
    if src.explore_only:
        raise ConfigError(no_weights_reason(m.name_or_path, src.path))
    check_task(load_config_data(cfg.data), m.task)  # bad data: file:line and what is wrong
    tree = model_tree(m.name_or_path, m.task, m.trust_remote_code)
    count = lora.check(tree, cfg.lora)  # targets that match nothing
    check_switches(cfg)
    if check_memory:
        check_fits(cfg, tree, count)


# The module Trainer's integration for each train.report_to tracker imports.
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}


def check_switches(cfg: RunConfig) -> None:
    """Quantization, precision, optimizer, checkpointing and trackers that this machine and model can run."""
    import importlib.util

    import torch

    m, t = cfg.model, cfg.train
    memory_guard.resolve_limit()  # a bad STUDIO_TRAINER_MEMORY_LIMIT_BYTES is named here, not when the trainer starts
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
    for tracker in t.report_to:
        module = TRACKER_MODULES[tracker]
        if importlib.util.find_spec(module) is None:
            extra = " (or pip install 'lora-studio[trackers]' for tensorboard and mlflow)" \
                if tracker in ("tensorboard", "mlflow") else ""
            raise ConfigError(f"train.report_to {tracker}: {module} is not installed: pip install {module}{extra}; "
                              "or drop it from train.report_to")
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


# --- will it fit --------------------------------------------------------------------------------

MEMORY_ENV = "STUDIO_MEMORY_LIMIT_BYTES"  # the memory to check against instead of the device's
INSIST = ("to start it anyway: studio train CONFIG --ignore-memory (in Python: preflight(cfg, "
          "check_memory=False))")
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# On the CPU the process peaks above what autograd keeps: the backward's own gradient tensors and
# glibc holding freed blocks. Measured: SmolLM2 (all-linear LoRA, fp32, micro-batch 2 x 512)
# peaked at 4.03 GB resident during a step against 3.19 GB estimated with the allowances above,
# 0.45 of the batch-dependent part (activations and logits gradients); taken as that share.
CPU_TRANSIENT_SHARE = 0.45


def available_memory() -> tuple[int, str, str]:
    """(bytes the run can use, where they are, "cpu" or "cuda") on the device the trainer will use:
    the free memory of the GPU, else the RAM available (within this cgroup's limit, and the
    trainer's $STUDIO_TRAINER_MEMORY_LIMIT_BYTES, when lower); $STUDIO_MEMORY_LIMIT_BYTES instead
    when set."""
    import os

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw:
        try:
            limit = int(raw)
            if limit < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{MEMORY_ENV}={raw!r}: give the memory as a whole number of bytes, "
                              "e.g. 8000000000; or unset it to use the device's own") from None
        return limit, f"{MEMORY_ENV}", device
    if device == "cuda":
        index = torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"free on GPU {index} ({torch.cuda.get_device_name(index)})", device
    import psutil

    avail, where = psutil.virtual_memory().available, "RAM available"
    cgroup = memory_guard.cgroup_room()
    if cgroup is not None and cgroup < avail:
        avail, where = cgroup, "left under this cgroup's memory limit"
    limit, _ = memory_guard.resolve_limit()  # the trainer holds itself under this (a margin under the RAM by default)
    if os.environ.get(memory_guard.LIMIT_ENV, "").strip() and limit is not None and limit < avail:
        avail, where = limit, f"the trainer's memory limit ({memory_guard.LIMIT_ENV})"
    return avail, where, device


def run_memory(cfg: RunConfig, device: str) -> dict:
    """The estimate's options for `cfg` as the trainer will run it on `device`: micro-batch,
    max_length, quantization, weights dtype and compute precision resolved as the trainer does."""
    from studio.models.registry import resolve_dtype

    m, t = cfg.model, cfg.train
    precision = resolve_precision(t.precision, m.dtype, device == "cuda")
    weights = "fp32" if m.dtype == "auto" and device == "cpu" else \
        _DTYPE_NAMES[str(resolve_dtype(m.dtype)).removeprefix("torch.")]
    return dict(batch=t.per_device_train_batch_size, seq=cfg.data.max_length, quant=m.quantization,
                # without autocast (fp32 asked) the activations take the weights' dtype
                precision=precision if precision != "fp32" else weights, weights=weights,
                gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optim)


def needed_memory(tree, count, settings, device: str, **o) -> tuple[int, dict[str, int]]:
    """(bytes, their parts) the run needs on `device`: the estimate at the run's options `o`
    (run_memory's), its weights in their own dtype, plus the allowances (process or CUDA context,
    the loss's transient gradients)."""
    o = dict(o)
    weights = o.pop("weights")
    est = memory.estimate(tree, count, settings, device=device, **o)
    w = est.weights_bytes
    if weights != o["precision"]:
        w = memory.estimate(tree, count, settings, device=device, **{**o, "precision": weights}).weights_bytes
    parts = {"weights": w, "adapter, gradients and optimizer": est.trainable_bytes + est.gradients_bytes
             + est.optimizer_bytes, "activations": est.activations_bytes,
             **{k.replace("_", " "): v for k, v in memory.allowances(tree, o["batch"], o["seq"], device).items()}}
    if device == "cpu":
        parts["backward and allocator"] = int(CPU_TRANSIENT_SHARE * (parts["activations"] + parts["logits gradients"]))
    return sum(parts.values()), parts


def _gb(n: int) -> str:
    if n < memory.GIB:
        return f"{n / 2**20:,.1f} MB"
    return f"{n / memory.GIB:,.2f} GB" if n < 10 * memory.GIB else f"{n / memory.GIB:,.1f} GB"


def check_fits(cfg: RunConfig, tree=None, count=None, available: int | None = None) -> None:
    """Refuse a run whose memory estimate exceeds what its device has free, saying by how much
    and which switches would make it fit, each with its own estimate (GB = 2^30 bytes).

    `available`: bytes to check against (default: available_memory()). The estimate is of the
    peak, for a batch filled to max_length: packing fills every block, and padded batches are
    shorter only when their longest example is.
    """
    m = cfg.model
    if tree is None:
        tree = model_tree(m.name_or_path, m.task, m.trust_remote_code)
    if count is None:
        count = lora.check(tree, cfg.lora)
    where, device = "given", None
    if available is None:
        available, where, device = available_memory()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    o = run_memory(cfg, device)
    need, parts = needed_memory(tree, count, cfg.lora, device, **o)
    if need <= available:
        return
    b = o["batch"]
    breakdown = ", ".join(f"{k} {_gb(v)}" for k, v in parts.items())
    raise ConfigError(
        f"will not fit: the memory estimate is {_gb(need)} ({breakdown}) for micro-batch {b} x max_length "
        f"{o['seq']} ({o['precision']}, quantization {o['quant']}, optimizer {o['optimizer']}"
        + (", gradient checkpointing" if o["gradient_checkpointing"] else "")
        + f") against {_gb(available)} ({where}) on the {'GPU' if device == 'cuda' else 'CPU'}: "
        f"{_gb(need - available)} too much. {_advice(cfg, tree, count, device, o, available)}. "
        + INSIST[0].upper() + INSIST[1:])


# When a run ran out of memory although its estimate was under the limit, the estimate was short
# of this run's real need; the advice then aims this far under the estimate.
SHORT_ESTIMATE_TARGET = 0.8


def advice_for_limit(cfg: RunConfig, limit: int, device: str, tree=None, count=None) -> tuple[int, str]:
    """(the run's memory estimate, preflight's suggestions) for a run that may hold `limit` bytes:
    what the trainer says when it runs out. Suggestions aim under the limit, or, when the estimate
    is under it already (and so short of the real need), SHORT_ESTIMATE_TARGET of the estimate."""
    m = cfg.model
    if tree is None:
        tree = model_tree(m.name_or_path, m.task, m.trust_remote_code)
    if count is None:
        count = lora.check(tree, cfg.lora)
    o = run_memory(cfg, device)
    need, _ = needed_memory(tree, count, cfg.lora, device, **o)
    target = limit if need > limit else int(SHORT_ESTIMATE_TARGET * need)
    return need, _advice(cfg, tree, count, device, o, target)


def _advice(cfg: RunConfig, tree, count, device: str, o: dict, available: int) -> str:
    """Which switches would bring the estimate under `available`, each with its estimate."""
    t = cfg.train

    def fits(**change) -> int | None:
        n, _ = needed_memory(tree, count, cfg.lora, device, **{**o, **change})
        return n if n <= available else None

    ideas = []
    b, ga = o["batch"], t.gradient_accumulation_steps
    if b > 1:
        # what depends on the micro-batch is proportional to it (memory.largest_batch's rule)
        one = needed_memory(tree, count, cfg.lora, device, **{**o, "batch": 1})[0]
        per_row = needed_memory(tree, count, cfg.lora, device, **{**o, "batch": 2})[0] - one
        n = 0 if one > available else min(b - 1, 1 + (available - one) // max(per_row, 1))
        while n > 1 and fits(batch=n) is None:
            n -= 1
        # a divisor of the effective batch keeps it exactly, unless that halves the micro-batch
        d = next((k for k in range(n, 0, -1) if b * ga % k == 0), n)
        n = d if 2 * d >= n else n
        got = fits(batch=n) if n else None
        if got is not None:
            steps = -(-b * ga // n)
            same = "as before" if n * steps == b * ga else f"was {b * ga}"
            ideas.append(f"train.per_device_train_batch_size {n} + train.gradient_accumulation_steps {steps} "
                         f"(effective batch {n * steps}, {same}): {_gb(got)}")
    if not o["gradient_checkpointing"] and _supports_checkpointing(cfg):
        got = fits(gradient_checkpointing=True)
        if got is not None:
            ideas.append(f"train.gradient_checkpointing true: {_gb(got)}")
    if o["quant"] != "4bit":
        got = fits(quant="4bit")
        if got is not None:
            ideas.append(f"model.quantization 4bit: {_gb(got)}" + ("" if _has_bnb() else " (pip install bitsandbytes)"))
    length = _longest_fitting(fits, o["seq"])
    if length:
        ideas.append(f"data.max_length {length}: {_gb(fits(seq=length))}")
    lead = "Any of these would fit: "
    if not ideas:
        combo = dict(batch=1, gradient_checkpointing=_supports_checkpointing(cfg) or o["gradient_checkpointing"],
                     quant="4bit")
        n, _ = needed_memory(tree, count, cfg.lora, device, **{**o, **combo})
        if n > available:  # and shorter, when that is what it takes
            length = _longest_fitting(lambda **c: fits(**combo, **c), o["seq"])
            if length:
                combo["seq"] = length
                n, _ = needed_memory(tree, count, cfg.lora, device, **{**o, **combo})
        what = (f"train.per_device_train_batch_size 1 + train.gradient_accumulation_steps {b * ga}"
                + (", train.gradient_checkpointing true" if combo["gradient_checkpointing"] else "")
                + ", model.quantization 4bit" + (f", data.max_length {combo['seq']}" if "seq" in combo else ""))
        if n <= available:
            lead, ideas = "These together would fit: ", [f"{what}: {_gb(n)}"]
        else:
            lead, ideas = "Not even ", [f"{what} would fit ({_gb(n)}): pick a smaller model or a device with "
                                        "more memory"]
    return lead + "; ".join(ideas)


def _longest_fitting(fits, seq: int) -> int | None:
    """The longest max_length under `seq` that fits (a multiple of 8; at least 8), or None."""
    lo, hi = 8, seq - 1
    if hi < lo or fits(seq=lo) is None:
        return None
    while lo < hi:  # memory grows with the length: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(seq=mid) is not None else (lo, mid - 1)
    return max(8, lo // 8 * 8)


def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _supports_checkpointing(cfg: RunConfig) -> bool:
    m = cfg.model
    klass = models.model_class(models.load_hf_config(m.name_or_path, m.trust_remote_code), m.task)
    return bool(getattr(klass, "supports_gradient_checkpointing", False))


def resolve_precision(precision: str, dtype: str, cuda: bool) -> str:
    """train.precision as run: fp32, bf16 or fp16 (auto: bf16 on a CUDA GPU that supports it)."""
    if precision != "auto":
        return precision
    import torch

    if cuda and dtype == "float16":
        return "fp16"  # float16 weights need fp16's loss scaling
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def memory_status(cfg: RunConfig, guard, cuda: bool) -> dict:
    """status.json `memory` for the run `cfg`: the limit, the estimate and preflight's suggestions
    for running out, and the cgroup's oom_kill count before training (a later kill then shows);
    `guard`: the trainer's memory_guard.Guard, or None."""
    out = dict(guard.describe()) if guard is not None else {}
    try:
        limit = guard.limit if guard is not None and guard.limit else available_memory()[0]
        out["estimate_bytes"], out["advice"] = advice_for_limit(cfg, limit, "cuda" if cuda else "cpu")
    except Exception as e:  # an architecture the estimate does not know is no reason to fail the run
        out["advice"] = None
        print(f"studio: no memory estimate for this run ({type(e).__name__}: {e})", flush=True)
    kills = memory_guard.cgroup_oom_kills()
    if kills is not None:
        out["cgroup_events"], out["cgroup_oom_kill"] = kills
    return out
