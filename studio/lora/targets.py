"""LoRA targets with PEFT's own rules, and the LoraConfig built from the settings.

Matching goes through PEFT's `check_target_module_exists`, so the set of adapted modules is
PEFT's by construction; `compact_targets` turns ticked tree rows back into the shortest
target_modules that selects exactly them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from peft import LoraConfig, TaskType
from peft.tuners.tuners_utils import check_target_module_exists

from studio import _compat
from studio.config import LoraSettings
from studio.errors import ConfigError, TargetError
from studio.models.tree import ModelTree

TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}
# PeftModelForSequenceClassification adds these to modules_to_save: a fresh head must train.
SEQ_CLS_MODULES_TO_SAVE = ["classifier", "score"]
ALL_LINEAR = "all-linear"



@dataclass
class Resolution:
    matched: list[str]  # module paths that get adapters, in model order
    unmatched_targets: list[str]  # requested names that matched no module
    suggestions: dict[str, list[str]]  # unmatched target -> closest real names
    unsupported: list[str]  # matched paths whose class LoRA cannot wrap
    modules_to_save: list[str]  # paths trained in full (copies)
    conflicts: list[str] = field(default_factory=list)  # paths both adapted and in modules_to_save
    missing_layers: list[int] = field(default_factory=list)  # layers_to_transform the model does not have
    layer_count: int = 0  # repeated blocks of the model (0: none found)


def peft_config(settings: LoraSettings, task: str = "causal_lm", inference_mode: bool = False) -> LoraConfig:
    """The LoraConfig PEFT will use; modules_to_save as PEFT completes it for the task."""
    mts = list(settings.modules_to_save) if settings.modules_to_save else None
    if task == "seq_cls":
        mts = (mts or []) + [m for m in SEQ_CLS_MODULES_TO_SAVE if m not in (mts or [])]
    try:
        return LoraConfig(
            r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=settings.target_list(), layers_to_transform=settings.layers_to_transform,
            layers_pattern=settings.layers_pattern, exclude_modules=settings.exclude_modules,
            rank_pattern=dict(settings.rank_pattern), alpha_pattern=dict(settings.alpha_pattern),
            bias=settings.bias, modules_to_save=mts, use_rslora=settings.use_rslora, use_dora=settings.use_dora,
            task_type=TASK_TYPES[task], inference_mode=inference_mode,
        )
    except ValueError as e:  # PEFT's own consistency checks, e.g. layers_pattern without layers_to_transform
        raise ConfigError(f"lora: {e}") from None


def build_lora_config(settings: LoraSettings, task: str = "causal_lm") -> LoraConfig:
    """The config handed to `get_peft_model`: modules_to_save as the user gave it (PEFT adds the head)."""
    cfg = peft_config(settings, task)
    cfg.modules_to_save = list(settings.modules_to_save) if settings.modules_to_save else None
    return cfg


def resolve_targets(tree: ModelTree, settings: LoraSettings) -> Resolution:
    cfg = peft_config(settings, tree.task)
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == ALL_LINEAR:
        cfg.target_modules = set(tree.all_linear)
    else:
        _check_regex(cfg.target_modules, "lora.target_modules")
        _check_regex(cfg.exclude_modules, "lora.exclude_modules")
    matched, unsupported = [], []
    for m in tree.modules:
        if not m.path:
            continue
        hit = check_target_module_exists(cfg, m.path)
        if hit and not _compat.is_excluded_match(hit):
            (matched if m.lora_targetable else unsupported).append(m.path)
    unmatched = _unmatched(settings.target_modules, matched)
    mts = _modules_to_save(tree, cfg.modules_to_save or [])
    # PEFT excludes modules_to_save from LoRA by a dotted-name regex but wraps them by a plain
    # suffix, so e.g. DistilBERT's pre_classifier ends up in both and get_peft_model fails.
    conflicts = sorted(set(mts) & set(matched))
    n_layers = layer_count(tree)
    missing = [i for i in (settings.layers_to_transform or []) if n_layers and i >= n_layers]
    return Resolution(matched, unmatched, {t: suggest(tree, t) for t in unmatched}, unsupported, mts, conflicts,
                      missing, n_layers)


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def layer_count(tree: ModelTree) -> int:
    """Repeated blocks (the indices layers_to_transform refers to): one more than the highest index
    found in the paths of LoRA-able modules; 0 when the model has no numbered blocks."""
    top = -1
    for m in tree.modules:
        if m.lora_targetable and m.path:
            hit = _BLOCK_INDEX.search(m.path)
            if hit:
                top = max(top, int(hit.group(1)))
    return top + 1


def _check_regex(value, name: str) -> None:
    if isinstance(value, str) and value.lower() != ALL_LINEAR:
        try:
            re.compile(value)
        except re.error as e:
            raise TargetError(f"{name}: {value!r} is not a valid regular expression ({e})") from None


def _unmatched(requested, matched: list[str]) -> list[str]:
    """Requested names that account for no adapted module (a silent non-match trains nothing)."""
    if isinstance(requested, str):
        return [] if matched else [requested]
    return [t for t in requested if not any(p == t or p.endswith("." + t) for p in matched)]


def _modules_to_save(tree: ModelTree, names: list[str]) -> list[str]:
    # PEFT's _set_trainable: a plain endswith (no dot), over all module names.
    if not names:
        return []
    return [m.path for m in tree.modules if m.path and any(m.path.endswith(n) for n in names)]


def suggest(tree: ModelTree, target: str, n: int = 3) -> list[str]:
    """Closest real names: LoRA-able leaf names first, then any module path."""
    leaves = tree.targetable_types()
    hits = difflib.get_close_matches(target, leaves, n=n, cutoff=0.4)
    if len(hits) < n:
        paths = [m.path for m in tree.modules if m.lora_targetable]
        hits += [p for p in difflib.get_close_matches(target, paths, n=n, cutoff=0.4) if p not in hits]
    return hits[:n] or leaves[:n]


def compact_targets(tree: ModelTree, paths, allow_string: bool = True) -> list[str] | str:
    """The shortest PEFT target_modules that selects exactly `paths` (a set of module paths).

    Leaf names (q_proj) when every module so named is selected, then longer dotted suffixes
    (attn.c_proj vs mlp.c_proj), then full paths: the result matches `paths` and nothing else.
    """
    chosen = set(paths)
    if not chosen:
        return []
    if allow_string and chosen == set(tree.all_linear):
        return ALL_LINEAR
    names = [m.path for m in tree.modules if m.path]
    out: list[str] = []
    left = set(chosen)
    depth = 1
    while left and depth <= 4:
        for suffix in sorted({".".join(p.split(".")[-depth:]) for p in left}):
            covered = {n for n in names if n == suffix or n.endswith("." + suffix)}
            if covered and covered <= chosen and covered & left:
                out.append(suffix)
                left -= covered
        depth += 1
    return out + sorted(left, key=names.index)
