"""A PEFT LoRA adapter on disk: the one module that knows its file names, keys and settings.

PEFT saves an adapter as `adapter_config.json` (the LoraConfig) and `adapter_model.safetensors`
with keys `base_model.model.<module path>.<role>`: `lora_A.weight` (r x in), `lora_B.weight`
(out x r), `lora_embedding_A` (r x vocabulary) and `lora_embedding_B` (dim x r) for embeddings,
`lora_magnitude_vector` for DoRA, `lora_B.bias` with lora_bias, and whole tensors of the
modules_to_save (a classification head) under their own path. Merge, analysis, the playground
and the zips ask `AdapterFile` instead of reading these themselves, so a new PEFT layout is
handled here once.

PEFT itself is the reader of record (`PeftModel.from_pretrained`), but it builds the whole base
model to read an adapter; this reads only the config and the safetensors header, so a merge plan
or an analysis of a 70B model's adapter needs no model at all. The per-module rank and alpha
come from PEFT's own `get_pattern_key`, the rule `LoraModel` applies when it builds the layers.
Pickled weights (`adapter_model.bin`) are refused by name and never opened: PEFT would
`torch.load` them, and a pickle can run code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from studio.errors import AdapterError, StudioError
from studio.adapters.names import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from studio.models import shards

PEFT_LORA_ALPHA = 8                        # LoraConfig's default, for a config that omits it
ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias",
         ".lora_embedding_A": "A", ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude"}
# Classification heads PEFT adds to modules_to_save (Llama/GPT-2 score, BERT/DistilBERT
# classifier, RoBERTa classifier.out_proj), first match wins.
HEADS = ("score.weight", "classifier.out_proj.weight", "classifier.weight")
# adapter_config.json settings whose adapters cannot be folded into plain weights.
UNMERGEABLE = {
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication (it changes the model's structure)",
    "alora_invocation_tokens": "activated LoRA (it only acts after its invocation tokens)",
    "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA",
}
# init_lora_weights that move the base weights while training (the adapter alone is not the update).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module's tensor keys in the adapter file."""

    path: str                        # module path in the task model, without PEFT_PREFIX
    a_key: str
    b_key: str
    embedding: bool                  # lora_embedding_A/B: the update is stored transposed
    magnitude_key: str | None = None  # DoRA
    b_bias_key: str | None = None     # lora_bias: lora_B carries a bias added to the layer's


def module_path(name: str) -> str:
    """A module path from a name that may carry PEFT's key prefix (copied from the file's keys)."""
    return name.removeprefix(PEFT_PREFIX)


def present(folder) -> bool:
    """Whether `folder` holds an adapter config (the file PEFT and the trainer write last)."""
    return (Path(folder) / CONFIG_NAME).is_file()


def has_weights(folder) -> bool:
    """Whether `folder` holds safetensors adapter weights (a checkpoint with no pickle needed)."""
    return (Path(folder) / WEIGHTS_NAME).is_file()


def pickled_reason(folder) -> str | None:
    """Why an adapter folder must not be loaded: its weights are only pickled; None when it may be."""
    folder = Path(folder)
    if not present(folder) or has_weights(folder):
        return None
    pickled = shards.pickled_files(folder)
    if not pickled:
        return None
    return (f"{folder} holds only a pickled {', '.join(pickled[:3])}; pickles are never loaded "
            "(they can run code): save the adapter with safetensors")


class AdapterFile:
    """A PEFT LoRA adapter folder: its config, tensor keys and shapes, factors and scaling.

    Opening reads the config and the safetensors header only. `error` is the StudioError kind
    raised for a bad adapter, so each caller reports in its own terms (merge: MergeError).
    """

    def __init__(self, folder, *, error: type[StudioError] = AdapterError):
        self.dir = Path(folder)
        self.error = error
        self.config_path = self.dir / CONFIG_NAME
        self.weights_path = self.dir / WEIGHTS_NAME
        self.config = self._read_config()
        if not self.weights_path.is_file():
            raise error(pickled_reason(self.dir) or f"{self.dir} has no {WEIGHTS_NAME}")
        try:
            with safe_open(str(self.weights_path), "pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise error(f"{self.weights_path}: not a readable safetensors file ({e})") from None
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # replaced tensor name (task model) -> adapter key
        self.unknown: list[str] = []            # LoRA-like keys this module does not know
        self._parse_keys()

    def __repr__(self) -> str:
        return f"AdapterFile({str(self.dir)!r})"

    # --- the config -------------------------------------------------------------------------

    def _read_config(self) -> dict:
        if not self.config_path.is_file():
            raise self.error(f"adapter config {self.config_path} does not exist")
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"{self.config_path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise self.error(f"{self.config_path}: expected a JSON object")
        return data

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def base_model(self) -> str | None:
        """base_model_name_or_path as PEFT recorded it (may be None)."""
        return self.config.get("base_model_name_or_path")

    def check_mergeable(self) -> None:
        """Refuse adapters that are not plain LoRA updates W + scaling * B @ A, naming the setting."""
        cfg, where = self.config, self.config_path
        if cfg.get("peft_type") != "LORA":
            raise self.error(f"{where}: peft_type = {cfg.get('peft_type')!r}; only LORA adapters can be merged")
        for key, what in UNMERGEABLE.items():
            if cfg.get(key):
                raise self.error(f"{where}: {key} = {cfg[key]!r}; {what} cannot be merged into plain weights")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().split("_")[0] in _BASE_CHANGING_INITS:
            raise self.error(f"{where}: init_lora_weights = {init!r} changes the base weights while training; "
                             "convert the adapter to plain LoRA when saving (PEFT's "
                             "path_initial_model_for_weight_conversion) and merge that")
        if self.unknown:
            raise self.error(f"{self.weights_path}: tensor {self.unknown[0]} is not a LoRA factor this merge knows "
                             "(lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector)")

    # --- the keys ---------------------------------------------------------------------------

    def _parse_keys(self) -> None:
        parts: dict[str, dict] = {}
        for key in self.shapes:
            if not key.startswith(PEFT_PREFIX):
                raise self.error(f"{self.weights_path}: tensor {key} does not start with {PEFT_PREFIX!r}; "
                                 "not a PEFT LoRA adapter")
            rest = key[len(PEFT_PREFIX):]
            suffix = next((s for s in ROLES if rest.endswith(s)), None)
            if suffix:
                p = parts.setdefault(rest[: -len(suffix)], {"embedding": False})
                p[ROLES[suffix]] = key
                p["embedding"] |= "lora_embedding" in suffix
                continue
            if ".lora_" in rest or "trainable_tokens" in rest:
                self.unknown.append(key)
                continue
            # modules_to_save: PEFT saves the trained copy under the wrapped module's path.
            name = rest.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            while ".base_layer." in name:
                name = name.replace(".base_layer.", ".")
            self.replacements[name] = key
        for path in sorted(parts, key=_natural_key):  # model order: layers.2 before layers.10
            p = parts[path]
            for role in ("A", "B"):
                if role not in p:
                    have = ", ".join(sorted(r for r in p if r != "embedding"))
                    raise self.error(f"{self.weights_path}: module {path} has {have} but no lora_{role}; "
                                     "the adapter file is incomplete")
            a, b = self.shapes[p["A"]], self.shapes[p["B"]]
            if len(a) == 2 and len(b) == 2 and a[0] != b[1]:
                raise self.error(f"{self.weights_path}: {p['A']} has rank {a[0]} but {p['B']} has shape {b}")
            self.modules[path] = LoraModule(path, p["A"], p["B"], p["embedding"], p.get("magnitude"), p.get("B_bias"))

    def module(self, path: str) -> LoraModule:
        try:
            return self.modules[path]
        except KeyError:
            raise self.error(f"module {path!r} is not in the adapter {self.dir}") from None

    def is_matrix(self, path: str) -> bool:
        """lora_A and lora_B are 2-D (not LoRA on a convolution)."""
        m = self.module(path)
        return len(self.shapes[m.a_key]) == 2 and len(self.shapes[m.b_key]) == 2

    def rank(self, path: str) -> int:
        """r as stored: lora_A's first dimension."""
        return self.shapes[self.module(path).a_key][0]

    def delta_shape(self, path: str) -> tuple[int, int]:
        """(out, in) of B @ A in nn.Linear's orientation (embeddings: (dim, vocabulary))."""
        m = self.module(path)
        return self.shapes[m.b_key][0], self.shapes[m.a_key][1]

    # --- r, alpha and scaling ---------------------------------------------------------------

    def r(self, path: str) -> int:
        """The configured r of a module: rank_pattern by PEFT's rule, else r."""
        return self._pattern("rank_pattern", path, self.config.get("r", self.rank(path)))

    def alpha(self, path: str) -> float:
        """The configured lora_alpha of a module: alpha_pattern by PEFT's rule, else lora_alpha."""
        return self._pattern("alpha_pattern", path, self.config.get("lora_alpha", PEFT_LORA_ALPHA))

    def scaling(self, path: str) -> float:
        """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

        Checks that the configured r is the stored rank, so a config and a file that disagree
        are refused instead of merged with the wrong factor.
        """
        r, stored = self.r(path), self.rank(path)
        if r != stored:
            raise self.error(f"{self.config_path} gives r = {r} for {path} but {self.module(path).a_key} "
                             f"has rank {stored}")
        alpha = self.alpha(path)
        return float(alpha) / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def _pattern(self, field: str, path: str, default):
        from peft.utils.other import get_pattern_key

        pattern = self.config.get(field) or {}
        return pattern.get(get_pattern_key(pattern.keys(), path), default)

    # --- tensors ----------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor of the file, as stored."""
        return shards.read_tensor(self.weights_path, key)

    def factors(self, path: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) of a module: A is r x in, B is out x r (embeddings: in = vocabulary)."""
        m = self.module(path)
        with safe_open(str(self.weights_path), "pt") as f:
            a, b = f.get_tensor(m.a_key), f.get_tensor(m.b_key)
        return (a, b) if dtype is None else (a.to(dtype), b.to(dtype))

    def head(self) -> str | None:
        """The adapter key of the classification head it carries (modules_to_save), or None."""
        for h in HEADS:
            for name, key in self.replacements.items():
                if name == h or name.endswith("." + h):
                    return key
        return None

    def head_size(self) -> int | None:
        """Number of classes of the classification head the adapter carries, or None."""
        key = self.head()
        return self.shapes[key][0] if key else None

    def files(self) -> list[Path]:
        """The adapter's own files: config and weights (what PEFT's from_pretrained reads)."""
        return [self.config_path, self.weights_path]


def _natural_key(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]
