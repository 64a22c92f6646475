"""Typed run configuration: model, data, LoRA and training settings.

Field names are PEFT's and TrainingArguments' own, so a config reads the same as the
libraries' documentation. Each field's docstring (the string after it) is the help text the
UI shows. Only the standard library and PyYAML are imported here.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio.errors import ConfigError

TASKS = ("causal_lm", "seq_cls")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "alpaca", "messages", "completion", "text", "classification")
BIAS_MODES = ("none", "all", "lora_only")
QUANTIZATIONS = ("none", "8bit", "4bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw_8bit")
BEST_METRICS = ("eval_loss", "eval_accuracy")
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")



@dataclass
class ModelConfig:
    name_or_path: str = "tiny-llama"
    """Built-in name (tiny-llama, tiny-gpt2, minilm-l6), preset name, local folder or Hub id."""
    task: str = "causal_lm"
    """causal_lm (text generation) or seq_cls (sequence classification)."""
    dtype: str = "auto"
    """Weights dtype while training: auto (float32 on CPU, bfloat16 on GPUs that support it), float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model repository. Only turn on for repositories you trust."""
    quantization: str = "none"
    """Keep the frozen base in 8bit or 4bit (QLoRA: NF4 with double quantization, via bitsandbytes); the adapter trains in full precision and merges into the full-precision base."""

    def validate(self) -> None:
        _check_choice("model.task", self.task, TASKS)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.quantization", self.quantization, QUANTIZATIONS)
        if not str(self.name_or_path).strip():
            raise ConfigError("model.name_or_path is empty; give a built-in name, preset, folder or Hub id")


@dataclass
class DataConfig:
    path: str = "assets/datasets/instructions.jsonl"
    """Dataset file (jsonl, json, csv, parquet, txt), a folder saved with datasets, or a Hub dataset id."""
    format: str = "auto"
    """alpaca, messages (also ShareGPT), completion (prompt/completion), text or classification; auto detects it from the columns."""
    columns: dict = field(default_factory=dict)
    """Which of the file's columns holds each field, when the names differ: {instruction: question, output: answer}, {text: review, label: stars}."""
    eval_fraction: float = 0.1
    """Share of the examples held out for evaluation (0 turns evaluation off)."""
    max_length: int = 256
    """Longest sequence in tokens; longer examples are truncated, packed blocks have this length."""
    packing: bool = True
    """Concatenate causal-LM examples into full max_length blocks so no compute goes to padding."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (alpaca/messages); off trains on responses only."""

    def validate(self) -> None:
        _check_choice("data.format", self.format, DATA_FORMATS)
        if not isinstance(self.columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.columns.items()):
            raise ConfigError(f"data.columns must map field names to column names, got {self.columns!r}")
        if not str(self.path).strip():
            raise ConfigError("data.path is empty; give a dataset file, folder or Hub id")
        _check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.9, hi_open=False)
        _check_int("data.max_length", self.max_length, 8, 1 << 20)


@dataclass
class LoraSettings:
    r: int = 8
    """Rank of the update B @ A: trainable parameters grow linearly with it."""
    lora_alpha: float = 16
    """Scale of the update: W' = W + (lora_alpha / r) * B @ A."""
    lora_dropout: float = 0.0
    """Dropout on the input of the LoRA branch while training, in [0, 1)."""
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules that get adapters: a list of names (full path or suffix), 'all-linear', or a regex string (re.fullmatch on the path)."""
    layers_to_transform: Any = None
    """Only these layer indices get adapters (null = all layers)."""
    layers_pattern: Any = None
    """Name of the layer list that layers_to_transform indexes (e.g. layers, h); null guesses it."""
    exclude_modules: Any = None
    """Modules never adapted, same syntax as target_modules."""
    rank_pattern: dict = field(default_factory=dict)
    """Per-module rank overrides, {name or regex: r}."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module alpha overrides, {name or regex: alpha}."""
    bias: str = "none"
    """Which biases train: none, all (every bias in the model) or lora_only (biases of adapted modules)."""
    modules_to_save: Any = None
    """Modules trained in full and saved with the adapter (e.g. a new classification head)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r."""
    use_dora: bool = False
    """DoRA: learn a magnitude vector per output feature on top of the low-rank direction."""

    def validate(self) -> None:
        _check_int("lora.r", self.r, 1, 1 << 16)
        _check_positive("lora.lora_alpha", self.lora_alpha)
        _check_range("lora.lora_dropout", self.lora_dropout, 0.0, 1.0)
        _check_choice("lora.bias", self.bias, BIAS_MODES)
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm.strip():
                raise ConfigError("lora.target_modules is empty; give module names, 'all-linear' or a regex")
        elif isinstance(tm, (list, tuple)):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ConfigError(f"lora.target_modules must be a non-empty list of names, got {tm!r}")
        else:
            raise ConfigError(f"lora.target_modules must be a list of names or a string, got {tm!r}")
        if self.layers_to_transform is not None:
            self.layers_to_transform = parse_layers(self.layers_to_transform, "lora.layers_to_transform")
        for name, pat, check in (("rank_pattern", self.rank_pattern, _check_int),
                                 ("alpha_pattern", self.alpha_pattern, _check_positive)):
            if not isinstance(pat, dict):
                raise ConfigError(f"lora.{name} must be a mapping of module name to value, got {pat!r}")
            for k, v in pat.items():
                if check is _check_int:
                    _check_int(f"lora.{name}[{k!r}]", v, 1, 1 << 16)
                else:
                    _check_positive(f"lora.{name}[{k!r}]", v)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def target_list(self) -> str | list[str]:
        """target_modules in PEFT's form: a string stays a string (regex or 'all-linear')."""
        tm = self.target_modules
        if isinstance(tm, str):
            return tm.removeprefix("re:") if tm.startswith("re:") else tm
        return list(tm)


@dataclass
class TrainConfig:
    learning_rate: float = 2.0e-4
    """Peak learning rate of the optimizer (AdamW)."""
    max_steps: int = 200
    """Optimizer steps to run (-1 = use num_train_epochs)."""
    num_train_epochs: float = 1.0
    """Passes over the data; used only when max_steps is -1."""
    per_device_train_batch_size: int = 8
    """Sequences per step on each device."""
    gradient_accumulation_steps: int = 1
    """Steps whose gradients add up before one optimizer update (a larger effective batch at the same memory)."""
    lr_scheduler_type: str = "cosine"
    """How the learning rate moves after warmup: linear, cosine, constant, ..."""
    warmup_ratio: float = 0.05
    """Share of the steps spent raising the learning rate from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 turns clipping off)."""
    logging_steps: int = 1
    """Write a metrics line every this many steps."""
    eval_steps: int = 20
    """Evaluate on the held-out split every this many steps."""
    save_steps: int = 50
    """Save a resumable checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    seed: int = 42
    """Random seed for the adapter's init, dropout and data order; the same seed repeats a run."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: much less memory for about a third more compute."""
    precision: str = "auto"
    """Mixed precision: auto (bf16 on a CUDA GPU that supports it, else fp32), fp32, bf16 or fp16 (CUDA only)."""
    optim: str = "adamw"
    """adamw (torch's AdamW) or adamw_8bit (bitsandbytes' AdamW with 8-bit moments: a quarter of the optimizer memory)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of metric_for_best_model (0 = never stop early)."""
    metric_for_best_model: str = "eval_loss"
    """What 'best' means for the final adapter and early stopping: eval_loss (lower) or eval_accuracy (higher)."""
    report_to: list = field(default_factory=list)
    """Experiment trackers that also get the metrics: tensorboard, mlflow, trackio, wandb (offline). The run folder stays the record."""

    def validate(self) -> None:
        _check_positive("train.learning_rate", self.learning_rate)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.optim", self.optim, OPTIMIZERS)
        _check_choice("train.metric_for_best_model", self.metric_for_best_model, BEST_METRICS)
        if not isinstance(self.early_stopping_patience, int) or isinstance(self.early_stopping_patience, bool) \
                or self.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience must be an integer >= 0, got {self.early_stopping_patience!r}")
        if isinstance(self.report_to, str):
            self.report_to = [t for t in self.report_to.replace(" ", "").split(",") if t]
        if not isinstance(self.report_to, list):
            raise ConfigError(f"train.report_to must be a list of trackers ({', '.join(TRACKERS)}), got {self.report_to!r}")
        for t in self.report_to:
            _check_choice("train.report_to", t, TRACKERS)
        if self.max_steps != -1:
            _check_int("train.max_steps", self.max_steps, 1, 10**9)
        else:
            _check_positive("train.num_train_epochs", self.num_train_epochs)
        _check_int("train.per_device_train_batch_size", self.per_device_train_batch_size, 1, 1 << 16)
        _check_int("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 1 << 16)
        _check_choice("train.lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _check_range("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_range("train.weight_decay", self.weight_decay, 0.0, 1.0, hi_open=False)
        if not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        for name in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            _check_int(f"train.{name}", getattr(self, name), 1, 10**9)
        _check_int("train.seed", self.seed, 0, 2**32 - 1)
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            # Trainer's load_best_model_at_end rule: a checkpoint at every evaluation that can be the best.
            lo = self.save_steps // self.eval_steps * self.eval_steps or self.eval_steps
            raise ConfigError(f"train.save_steps {self.save_steps} must be a multiple of train.eval_steps "
                              f"{self.eval_steps} when train.early_stopping_patience is on (the best checkpoint "
                              f"is kept, so a checkpoint must exist at each evaluation); e.g. save_steps {lo} "
                              f"or {lo + self.eval_steps}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.lora, self.train):
            part.validate()
        t = self.train
        if t.early_stopping_patience and self.data.eval_fraction <= 0:
            raise ConfigError(f"train.early_stopping_patience {t.early_stopping_patience} needs evaluations, and "
                              "data.eval_fraction is 0; set data.eval_fraction above 0 or the patience to 0")
        if t.metric_for_best_model == "eval_accuracy" and self.model.task != "seq_cls":
            raise ConfigError(f"train.metric_for_best_model eval_accuracy is measured for model.task seq_cls only, "
                              f"not {self.model.task}; use eval_loss")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader never sees half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> RunConfig:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
        _reject_unknown(source, "", raw, SECTIONS)
        parts = {}
        for name, klass in SECTIONS.items():
            sec = raw.get(name) or {}
            if not isinstance(sec, dict):
                raise ConfigError(f"{source}: {name} must be a mapping, got {sec!r}")
            _reject_unknown(source, f"{name}.", sec, {f.name: f for f in dataclasses.fields(klass)})
            kwargs = {k: _coerce(f"{source}: {name}.{k}", klass, k, v) for k, v in sec.items()}
            parts[name] = klass(**kwargs)
        try:
            return cls(**parts).validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "train": TrainConfig}


# --- starter settings per built-in model -------------------------------------------------
# What a model starts with in the UI: the dataclass defaults above with these overrides, in the
# YAML config's own shape (section -> field -> value). A model not listed starts with the plain
# defaults. To add a model, add an entry; `starter_config` checks it like any config file.
STARTERS: dict[str, dict[str, dict[str, Any]]] = {
    # Random-init: with the output head frozen at its random init the loss cannot fall far, so
    # every linear layer and the head get adapters, and a 10x larger rate halves the loss in 100 steps.
    "tiny-llama": {
        "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "lm_head"]},
        "train": {"learning_rate": 2.0e-3, "max_steps": 100},
    },
    "tiny-gpt2": {
        "lora": {"target_modules": ["c_attn", "c_proj", "c_fc", "lm_head"]},
        "train": {"learning_rate": 2.0e-3, "max_steps": 100},
    },
    # examples/minilm-sentiment.yaml: 100% eval accuracy on sentiment.jsonl in 90 steps (docs/benchmarks.md).
    "minilm-l6": {
        "model": {"task": "seq_cls"},
        "data": {"eval_fraction": 0.2, "max_length": 128},
        "lora": {"target_modules": ["query", "value"]},
        "train": {"learning_rate": 1.0e-3, "max_steps": 90, "per_device_train_batch_size": 16, "eval_steps": 30,
                  "save_steps": 90},
    },
    # The newcomer's first run (bench/first_hour.py): profile-json's one-line JSON answers become
    # the model's habit in 24 steps of 4 x 256 tokens (about 25k tokens, half an epoch; a few minutes
    # on a 2-core CPU). All linear layers at r=16 and a high rate, since the whole answer format
    # changes; the eval split is small, evaluated once at the end, so it costs little of that time.
    "smollm2-135m-instruct": {
        "data": {"path": "assets/datasets/profile-json.jsonl", "eval_fraction": 0.05, "max_length": 256},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "train": {"learning_rate": 2.0e-3, "max_steps": 24, "per_device_train_batch_size": 4, "warmup_ratio": 0.1,
                  "eval_steps": 24, "save_steps": 12},
    },
}


def starter_config(ref: str) -> RunConfig:
    """The RunConfig model `ref` starts with: the defaults, with its STARTERS entry if it has one."""
    raw: dict[str, dict[str, Any]] = {name: dict(sec) for name, sec in STARTERS.get(ref, {}).items()}
    raw.setdefault("model", {})["name_or_path"] = ref
    return RunConfig.from_dict(raw, source=f"starter settings of {ref}")


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run config; every error names the file (and line for YAML syntax)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    return RunConfig.from_dict(raw, source=str(path))


def field_help(klass: type) -> dict[str, str]:
    """The docstring written under each dataclass field, for help texts in the UI and CLI."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[node.target.id] = nxt.value.value
    return out


def parse_layers(value: Any, name: str = "--layers") -> list[int] | None:
    """'0-3,8' or [0, 1] or 5 -> sorted list of layer indices; '' or None -> None."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected layer indices like '0-3,8', got {value!r}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(f"{name}: layer indices must be integers >= 0, got {list(value)!r}")
        return sorted(set(value))
    out: set[int] = set()
    for part in str(value).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ConfigError(f"{name}: {part!r} in {value!r} is not a layer index or range like 0-3") from None
        if a < 0 or b < a:
            raise ConfigError(f"{name}: range {part!r} in {value!r} must be low-high with 0 <= low <= high")
        out.update(range(a, b + 1))
    if not out:
        raise ConfigError(f"{name}: no layer indices in {value!r}; use a form like 0-3,8")
    return sorted(out)


def format_layers(indices: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8' (parse_layers' own notation)."""
    out, run = [], []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


# --- checks -------------------------------------------------------------------------------

def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(allowed)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_positive(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def _check_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = _is_number(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


def _reject_unknown(source: str, prefix: str, raw: dict, known: dict) -> None:
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")


def _coerce(where: str, klass: type, key: str, value: Any) -> Any:
    """YAML reads 2e-4 as a string; accept numbers written that way, refuse other type mismatches."""
    default = next(f for f in dataclasses.fields(klass) if f.name == key)
    want = default.type if isinstance(default.type, str) else getattr(default.type, "__name__", "")
    if want == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if want == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if want == "str" and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
