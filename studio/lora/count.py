"""Trainable-parameter counts, exactly as PEFT will count them, without building a PEFT model.

The count is analytic: a sum over matched modules of r_m * (in_m + out_m) plus DoRA magnitudes,
trainable biases and modules_to_save copies, read from a `ModelTree`. It equals
`PeftModel.get_nb_trainable_parameters()` without building one, which matters when the model is a
405B config explored on the meta device. The cost explorer (rank x target set) lives here too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from peft.utils.other import get_pattern_key

from studio import _compat
from studio.config import LoraSettings
from studio.errors import TargetError
from studio.lora.targets import ALL_LINEAR, Resolution, build_lora_config, resolve_targets
from studio.models.tree import ModelTree


@dataclass
class Count:
    trainable: int
    total: int  # PEFT's all_param: base parameters plus everything the adapter adds
    base_params: int
    trainable_percent: float
    matched_modules: list[str]
    unmatched_targets: list[str]
    suggestions: dict[str, list[str]]
    by_type: dict[str, int]
    by_layer: dict[str, int]
    adapter_mb: dict[str, float]
    scaling: float
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_LAYER_RE = re.compile(r"\.(\d+)\.")


def peft_rewrites_targets(model_type: str) -> bool:
    """PEFT re-targets some MoE models whose experts became fused parameters in transformers 5."""
    return _compat.peft_moe_retargets(model_type)


def count(tree: ModelTree, settings: LoraSettings, resolution: Resolution | None = None) -> Count:
    """Trainable parameters PEFT would create for `settings` on the model of `tree`."""
    res = resolution or resolve_targets(tree, settings)
    if tree.factory is not None and peft_rewrites_targets(tree.model_type):
        return _count_with_peft(tree, settings, res)
    by_path = tree.by_path
    rank_keys = list(settings.rank_pattern)
    lora = 0
    by_type: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    extra_bias = 0
    for path in res.matched:
        m = by_path[path]
        r = settings.rank_pattern.get(get_pattern_key(rank_keys, path), settings.r) if rank_keys else settings.r
        n = m.lora_params(r)
        if settings.use_dora:
            n += m.out_features  # the magnitude vector, one per output feature
        if settings.bias == "lora_only":
            extra_bias += m.bias
        lora += n
        leaf = path.rsplit(".", 1)[-1]
        by_type[leaf] = by_type.get(leaf, 0) + n
        hit = _LAYER_RE.search(path)
        layer = hit.group(1) if hit else "other"
        by_layer[layer] = by_layer.get(layer, 0) + n
    outer_mts = _outermost(res.modules_to_save)
    mts_params = sum(by_path[p].params for p in outer_mts)
    if settings.bias == "all":
        # Every "bias" parameter trains, except inside a modules_to_save original: PEFT freezes
        # the original and trains its copy (already counted in full).
        bias = tree.bias_params - sum(by_path[p].bias_named for p in outer_mts)
    else:
        bias = extra_bias
    trainable = lora + mts_params + bias
    total = tree.total_params + lora + mts_params
    if mts_params:
        by_type["modules_to_save"] = mts_params
    if bias:
        by_type["bias"] = bias
    return Count(
        trainable=trainable, total=total, base_params=tree.total_params,
        trainable_percent=round(100.0 * trainable / total, 6) if total else 0.0,
        matched_modules=res.matched, unmatched_targets=res.unmatched_targets, suggestions=res.suggestions,
        by_type=by_type, by_layer=dict(sorted(by_layer.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0))),
        adapter_mb={"float32": round(trainable * 4 / 2**20, 3), "bfloat16": round(trainable * 2 / 2**20, 3)},
        scaling=settings.scaling, modules_to_save=res.modules_to_save,
    )


def _count_with_peft(tree: ModelTree, settings: LoraSettings, res: Resolution) -> Count:
    """Exact count by letting PEFT build the adapter on the meta model (MoE models PEFT re-targets).

    Slower than the analytic sum (a second or so for a large MoE), so used only where PEFT's
    own target rewriting would make the sum wrong.
    """
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tree.factory()
    cfg = build_lora_config(settings, tree.task)
    if tree.task == "causal_lm" and not hasattr(model, "prepare_inputs_for_generation"):
        cfg.task_type = None
    try:
        pm = get_peft_model(model, cfg)
    except (ValueError, TypeError) as e:
        raise TargetError(f"PEFT refuses these settings on {tree.model}: {str(e).splitlines()[0]}") from None
    trainable, total = pm.get_nb_trainable_parameters()
    inner = pm.get_base_model()  # the wrapped model: its names are the tree's paths
    matched = [n for n, m in inner.named_modules()
               if isinstance(m, BaseTunerLayer) and not any(isinstance(c, BaseTunerLayer) for c in m.children())]
    by_type: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    for path, p in inner.named_parameters():
        if p.requires_grad:
            key = next((mm.rsplit(".", 1)[-1] for mm in matched if path.startswith(mm + ".")), "other")
            by_type[key] = by_type.get(key, 0) + p.numel()
            hit = _LAYER_RE.search(path)
            layer = hit.group(1) if hit else "other"
            by_layer[layer] = by_layer.get(layer, 0) + p.numel()
    return Count(trainable=trainable, total=total, base_params=tree.total_params,
                 trainable_percent=round(100.0 * trainable / total, 6) if total else 0.0,
                 matched_modules=matched or res.matched, unmatched_targets=res.unmatched_targets,
                 suggestions=res.suggestions, by_type=by_type, by_layer=by_layer,
                 adapter_mb={"float32": round(trainable * 4 / 2**20, 3), "bfloat16": round(trainable * 2 / 2**20, 3)},
                 scaling=settings.scaling, modules_to_save=res.modules_to_save)


def _outermost(paths: list[str]) -> list[str]:
    # Nested matches (a head and its child both ending in the name) are wrapped once, at the outer one.
    return [p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths)]


def check(tree: ModelTree, settings: LoraSettings) -> Count:
    """`count`, raising TargetError when a target matches nothing or a module LoRA cannot wrap."""
    res = resolve_targets(tree, settings)
    if res.unsupported:
        kinds = sorted({tree.by_path[p].cls for p in res.unsupported})
        raise TargetError(f"targets match {len(res.unsupported)} module(s) LoRA cannot wrap "
                          f"({', '.join(kinds)}; e.g. {res.unsupported[0]}); LoRA wraps Linear, Conv1D, "
                          "Embedding and Conv layers")
    if res.conflicts:
        raise TargetError(f"{', '.join(res.conflicts)} would get LoRA and also be trained in full as modules_to_save "
                          f"(PEFT matches modules_to_save by name suffix); add it to exclude_modules")
    if res.missing_layers:
        from studio.config import format_layers

        raise TargetError(f"lora.layers_to_transform: {tree.model} has layers 0-{res.layer_count - 1}; "
                          f"{format_layers(res.missing_layers)} do not exist")
    if res.unmatched_targets:
        parts = [f"{t!r} (closest: {', '.join(res.suggestions[t]) or 'none'})" for t in res.unmatched_targets]
        raise TargetError(f"target(s) matched no module in {tree.model}: {'; '.join(parts)}")
    return count(tree, settings, res)


# --- exploring costs across ranks and target sets -----------------------------------------

SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
_QV = {"q_proj", "v_proj", "query", "value", "q", "v", "q_lin", "v_lin"}
_FUSED_QKV = {"c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "in_proj"}
_BLOCK_RE = re.compile(r"^.*?\.\d+\.")


def target_sets(tree: ModelTree) -> dict[str, list[str] | str]:
    """Common target choices for this architecture, as suffixes PEFT matches (q+v, attention, MLP, all)."""
    rel: dict[str, None] = {}
    for path in tree.all_linear:
        m = _BLOCK_RE.match(path)
        if m:  # only modules inside repeated blocks; heads and embeddings stay out
            rel.setdefault(path[m.end():], None)
    attention = [s for s in rel if any(w in s for w in ("attn", "attention"))]
    mlp = [s for s in rel if s not in attention]
    qv = [s for s in attention if s.rsplit(".", 1)[-1] in _QV] or [
        s for s in attention if s.rsplit(".", 1)[-1] in _FUSED_QKV]
    sets = {"q+v": qv, "attention": attention, "mlp": mlp, "all-linear": ALL_LINEAR}
    return {k: v for k, v in sets.items() if v}


def sweep(tree: ModelTree, base: LoraSettings, ranks=SWEEP_RANKS) -> list[dict]:
    """Trainable parameters and adapter size for each rank x target set (alpha follows 2r)."""
    rows = []
    for name, targets in target_sets(tree).items():
        for r in ranks:
            s = LoraSettings(**{**asdict(base), "r": r, "lora_alpha": 2 * r, "target_modules": targets,
                                "rank_pattern": {}, "alpha_pattern": {}})
            c = count(tree, s)
            rows.append({"targets": name, "r": r, "trainable": c.trainable,
                         "trainable_percent": c.trainable_percent, "adapter_mb_bf16": c.adapter_mb["bfloat16"],
                         "adapter_mb_fp32": c.adapter_mb["float32"], "modules": len(c.matched_modules)})
    return rows


def render_sweep(rows: list[dict]) -> str:
    from studio.models.tree import human

    sets = list(dict.fromkeys(r["targets"] for r in rows))
    ranks = sorted({r["r"] for r in rows})
    cell = {(r["targets"], r["r"]): r for r in rows}
    out = ["trainable parameters (adapter MB in bf16) by rank and target set",
           f"{'r':>5} " + " ".join(f"{s:>22}" for s in sets)]
    for r in ranks:
        out.append(f"{r:>5} " + " ".join(
            f"{human(cell[(s, r)]['trainable']) + ' (' + format(cell[(s, r)]['adapter_mb_bf16'], '.1f') + ')':>22}"
            for s in sets))
    return "\n".join(out)


