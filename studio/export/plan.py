"""What a merge will write, worked out from file headers before any weight is read.

A plan lists every output tensor with where its value comes from (a base tensor, a tensor
of the adapter that replaces it, plus the LoRA update to add) and checks everything that can
be checked without reading weights: the adapter's keys map onto the base's tensors, every
update's shape fits, ranks agree with rank_pattern. So a mismatched adapter is refused in
a second, before anything is written, with the tensor and both shapes named.

Names: PEFT saves adapter tensors as `base_model.model.<module path>.lora_A.weight`, where the
module path is the task model's (e.g. `bert.encoder...` for BertForSequenceClassification),
while a checkpoint saved from the bare model has no `bert.` prefix. The task model is built
on the meta device (no memory) to learn its names, its tied weights and which modules are
GPT-2 Conv1D (stored transposed, PEFT's fan_in_fan_out).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import MergeError
from studio.export.verify import quiet
from studio.models import shards

PEFT_PREFIX = "base_model.model."
_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias",
          ".lora_embedding_A": "A", ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude"}
# adapter_config.json settings whose adapters cannot be folded into plain weights.
_UNSUPPORTED = {
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication (it changes the model's structure)",
    "alora_invocation_tokens": "activated LoRA (it only acts after its invocation tokens)",
    "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA",
}
_HEADS = ("score.weight", "classifier.weight", "classifier.out_proj.weight")



@dataclass
class LoraUpdate:
    module: str
    kind: str            # linear | conv1d (GPT-2, stored transposed) | embedding
    a_key: str
    b_key: str
    r: int
    scaling: float       # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    magnitude_key: str | None = None   # DoRA
    b_bias_key: str | None = None      # lora_bias: lora_B has a bias added to the layer's bias


@dataclass
class Entry:
    name: str                               # output tensor name
    shard: int
    dtype: torch.dtype                      # dtype before the output cast
    shape: tuple
    source: shards.TensorInfo | None = None  # base tensor the value starts from
    replace: str | None = None              # adapter tensor that replaces the base value
    lora: LoraUpdate | None = None
    bias_lora: LoraUpdate | None = None


@dataclass
class Plan:
    base_dir: Path
    adapter_dir: Path
    adapter_file: Path
    shard_files: list[Path]
    entries: list[Entry]
    untie: bool
    task_type: str | None
    num_labels: int | None
    base_config: dict
    config_updates: dict = field(default_factory=dict)


def make_plan(base_dir: Path, adapter_dir: Path, trust_remote_code: bool = False) -> Plan:
    acfg, afile = _read_adapter(adapter_dir)
    base_config = _read_json(base_dir / "config.json", "base model config")
    files = _base_files(base_dir)
    try:
        infos = shards.list_tensors(files)
        ashapes = {k: (v.shape, v.torch_dtype) for k, v in shards.list_tensors([afile]).items()}
    except ValueError as e:
        raise MergeError(str(e)) from None
    modules, replacements = _parse_adapter_keys(ashapes, afile)
    task = acfg.get("task_type")
    num_labels = None
    if task == "SEQ_CLS":
        head = next((replacements[h] for h in _HEADS if h in replacements), None)
        num_labels = ashapes[head][0][0] if head else int(base_config.get("num_labels") or len(base_config.get("id2label") or {}) or 2)
    meta = _meta_model(base_dir, task, num_labels, trust_remote_code)

    # Output names: a checkpoint of the bare model gets the task model's prefix (bert., model., ...).
    prefix = getattr(meta, "base_model_prefix", "") if meta is not None else ""
    meta_keys = set(meta.state_dict()) if meta is not None else set()
    headless = bool(prefix) and any(k.startswith(prefix + ".") for k in meta_keys) \
        and not any(k.startswith(prefix + ".") for k in infos)
    shard_of = {p: i for i, p in enumerate(files)}
    entries = {}
    for info in infos.values():
        name = f"{prefix}.{info.name}" if headless else info.name
        entries[name] = Entry(name, shard_of[info.file], info.torch_dtype, info.shape, source=info)

    tied = _tied_pairs(meta, base_config, entries)
    updates = {}  # output weight name -> LoraUpdate
    for module, parts in modules.items():
        u = _lora_update(module, parts, acfg, ashapes, meta)
        target = _resolve(f"{module}.weight", entries, tied, parts["A"])
        updates.setdefault(target, u)
        if u.b_bias_key:
            bias = _resolve(f"{module}.bias", entries, tied, u.b_bias_key)
            entries[bias].bias_lora = u

    # Tied pairs: one saved matrix serves both sides. An update to either side unties them,
    # unless it is the same update on both (PEFT's ensure_weight_tying shares lora_A/lora_B).
    untie = False
    repl_target = {_resolve_replacement(n, entries, tied, meta_keys, meta is not None, k): k for n, k in replacements.items()}
    for t, s in tied.items():
        touched = any(x in updates or x in repl_target for x in (t, s))
        if not touched or s not in entries:
            continue
        if t not in entries and _same_update(updates.get(t), updates.get(s), repl_target, t, s, afile):
            updates.pop(t, None)
            repl_target.pop(t, None)
            continue
        untie = True
        if t not in entries:
            src = entries[s]
            entries[t] = Entry(t, src.shard, src.dtype, src.shape, source=src.source)

    last = len(files) - 1
    for target, key in repl_target.items():
        shape, dtype = ashapes[key]
        if target in entries:
            e = entries[target]
            if tuple(shape) != tuple(e.shape):
                raise MergeError(f"adapter tensor {key} has shape {tuple(shape)} but base tensor {target} "
                                 f"has {tuple(e.shape)}; the adapter was made for a different model")
            e.replace = key
        else:  # a head the base checkpoint does not have (e.g. a new classifier)
            entries[target] = Entry(target, last, dtype, tuple(shape), replace=key)
    for target, u in updates.items():
        e = entries[target]
        want = _delta_shape(u, ashapes)
        if tuple(want) != tuple(e.shape):
            raise MergeError(f"adapter tensors {u.b_key} @ {u.a_key} give an update of shape {tuple(want)} but "
                             f"{target} has shape {tuple(e.shape)}; the adapter was made for a different model")
        e.lora = u
    updates_cfg = _config_updates(meta, base_config, task, num_labels)
    return Plan(base_dir, adapter_dir, afile, files, list(entries.values()), untie, task, num_labels,
                base_config, updates_cfg)


# --- the adapter --------------------------------------------------------------------------

def _read_adapter(adapter_dir: Path) -> tuple[dict, Path]:
    cfg = _read_json(adapter_dir / "adapter_config.json", "adapter config")
    afile = adapter_dir / "adapter_model.safetensors"
    if not afile.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise MergeError(f"{adapter_dir} holds only a pickled adapter_model.bin; pickles are never loaded "
                             "(they can run code): save the adapter with safetensors")
        raise MergeError(f"{adapter_dir} has no adapter_model.safetensors")
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{adapter_dir}/adapter_config.json: peft_type = {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise MergeError(f"{adapter_dir}/adapter_config.json: {key} = {cfg[key]!r}; {what} cannot be merged into plain weights")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda"):
        raise MergeError(f"{adapter_dir}/adapter_config.json: init_lora_weights = {init!r} changes the base weights "
                         "while training; convert the adapter to plain LoRA when saving (PEFT's "
                         "path_initial_model_for_weight_conversion) and merge that")
    return cfg, afile


def _parse_adapter_keys(ashapes: dict, afile: Path) -> tuple[dict, dict]:
    """Adapter keys -> {module path: {role: key}} and {replaced tensor name: key}."""
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in ashapes:
        if not key.startswith(PEFT_PREFIX):
            raise MergeError(f"{afile}: tensor {key} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA adapter")
        rest = key[len(PEFT_PREFIX):]
        role = next((r for suf, r in _ROLES.items() if rest.endswith(suf)), None)
        if role:
            suffix = next(s for s in _ROLES if rest.endswith(s))
            parts = modules.setdefault(rest[: -len(suffix)], {})
            parts[role] = key
            parts.setdefault("embedding", "lora_embedding" in suffix)
            continue
        if ".lora_" in rest or "trainable_tokens" in rest:
            raise MergeError(f"{afile}: tensor {key} is not a LoRA factor this merge knows (lora_A, lora_B, "
                             "lora_embedding_A/B, lora_magnitude_vector)")
        name = rest.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        while ".base_layer." in name:
            name = name.replace(".base_layer.", ".")
        replacements[name] = key
    return modules, replacements


def _lora_update(module: str, parts: dict, acfg: dict, ashapes: dict, meta) -> LoraUpdate:
    for role in ("A", "B"):
        if role not in parts:
            have = ", ".join(sorted(r for r in parts if r != "embedding"))
            raise MergeError(f"adapter has {have} for {module} but no lora_{role}; the adapter file is incomplete")
    a_shape, b_shape = ashapes[parts["A"]][0], ashapes[parts["B"]][0]
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise MergeError(f"{parts['A']} has shape {tuple(a_shape)}: LoRA on convolutions is not supported by merge")
    r = a_shape[0]
    if b_shape[1] != r:
        raise MergeError(f"{parts['A']} has rank {r} but {parts['B']} has shape {tuple(b_shape)}")
    r_cfg = _pattern_value(acfg.get("rank_pattern") or {}, module, acfg.get("r"))
    alpha = _pattern_value(acfg.get("alpha_pattern") or {}, module, acfg.get("lora_alpha"))
    if r_cfg != r:
        raise MergeError(f"adapter_config.json gives r = {r_cfg} for {module} but {parts['A']} has rank {r}")
    scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    if parts["embedding"]:
        kind = "embedding"
        if "magnitude" in parts:
            raise MergeError(f"{module}: DoRA on embeddings is not supported by merge; train without use_dora on embeddings")
    else:
        kind = _module_kind(meta, module, bool(acfg.get("fan_in_fan_out")))
    return LoraUpdate(module, kind, parts["A"], parts["B"], r, scaling, parts.get("magnitude"), parts.get("B_bias"))


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's own rule for rank_pattern / alpha_pattern keys (a suffix or regex of the module path)."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # the helper moved: same rule as PEFT 0.21's
        import re

        def get_pattern_key(keys, key_to_match):
            return next((k for k in keys if re.match(rf"(.*\.)?({k})$", key_to_match)), key_to_match)
    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def _module_kind(meta, module: str, fan_in_fan_out: bool) -> str:
    # PEFT itself decides by the module's class (it overrides a wrong fan_in_fan_out with a warning).
    if meta is not None:
        try:
            cls = type(meta.get_submodule(module)).__name__
        except AttributeError:
            cls = ""
        if cls == "Conv1D":
            return "conv1d"
        if cls:
            return "linear"
    return "conv1d" if fan_in_fan_out else "linear"


def _delta_shape(u: LoraUpdate, ashapes: dict) -> tuple:
    out_f, in_f = ashapes[u.b_key][0][0], ashapes[u.a_key][0][1]
    return (out_f, in_f) if u.kind == "linear" else (in_f, out_f)


# --- the base model -----------------------------------------------------------------------

def _base_files(base_dir: Path) -> list[Path]:
    if not base_dir.is_dir():
        raise MergeError(f"base model folder {base_dir} does not exist")
    try:
        files = shards.checkpoint_files(base_dir)
    except ValueError as e:
        raise MergeError(str(e)) from None
    if files:
        return files
    pickled = shards.pickled_files(base_dir)
    if pickled:
        raise MergeError(f"{base_dir} stores its weights only as pickled .bin/.pt files ({', '.join(pickled[:3])}), "
                         "which are never loaded (a pickle can run code); convert the model to safetensors first")
    raise MergeError(f"{base_dir} has no model.safetensors or model.safetensors.index.json")


def _meta_model(base_dir: Path, task: str | None, num_labels: int | None, trust_remote_code: bool):
    """The task model with no memory behind it, or None when transformers cannot build it."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        with quiet():
            config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
            if task == "SEQ_CLS":
                config.num_labels = num_labels
                build = lambda: AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
            elif task == "CAUSAL_LM":
                build = lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            else:
                arch = getattr(transformers, (config.architectures or [""])[0], None)
                build = (lambda: arch._from_config(config)) if arch else (lambda: AutoModel.from_config(config))
            with torch.device("meta"):
                return build()
    except Exception:  # unknown architecture or remote code not trusted: fall back to the files alone
        return None


def _tied_pairs(meta, base_config: dict, entries: dict) -> dict[str, str]:
    """{tied name: source name}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    if meta is not None:
        pairs = getattr(meta, "all_tied_weights_keys", None) or getattr(meta, "_tied_weights_keys", None)
        return dict(pairs) if isinstance(pairs, dict) else {}
    if not base_config.get("tie_word_embeddings", True) or "lm_head.weight" in entries:
        return {}
    src = next((n for n in entries if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))), None)
    return {"lm_head.weight": src} if src else {}


def _resolve(name: str, entries: dict, tied: dict, key: str) -> str:
    if name in entries or (name in tied and tied[name] in entries):
        return name
    tail = name.split(".", 1)[-1]  # adapter trained on the bare model, checkpoint of a task model
    if tail in entries:
        return tail
    near = difflib.get_close_matches(name, list(entries), n=2, cutoff=0.6)
    hint = f"; closest: {', '.join(near)}" if near else ""
    raise MergeError(f"adapter tensor {key} targets {name}, which the base model does not have{hint}; "
                     "the adapter was made for a different model")


def _resolve_replacement(name: str, entries: dict, tied: dict, meta_keys: set, have_meta: bool, key: str) -> str:
    if name in entries or name in tied or (name.split(".", 1)[-1] in entries):
        return _resolve(name, entries, tied, key)
    if name in meta_keys or not have_meta:
        return name
    raise MergeError(f"adapter tensor {key} replaces {name}, which the base model does not have")


def _same_update(ut: LoraUpdate | None, us: LoraUpdate | None, repl: dict, t: str, s: str, afile: Path) -> bool:
    """Both sides of a tied pair get the identical update, so they can stay tied."""
    if ut is None or us is None or ut.scaling != us.scaling or (t in repl) != (s in repl):
        return False
    if (ut.kind, us.kind) != ("linear", "embedding") or ut.magnitude_key or us.magnitude_key:
        return False
    rd = lambda k: shards.read_tensor(afile, k)
    # lm_head's Linear delta B @ A must equal the embedding's (B_e @ A_e).T, i.e. A = B_e.T and B = A_e.T.
    same = torch.equal(rd(ut.a_key), rd(us.b_key).T) and torch.equal(rd(ut.b_key), rd(us.a_key).T)
    if same and t in repl:
        same = torch.equal(rd(repl[t]), rd(repl[s]))
    return same


def _config_updates(meta, base_config: dict, task: str | None, num_labels: int | None) -> dict:
    out = {}
    if meta is not None and (task in ("SEQ_CLS", "CAUSAL_LM") or not base_config.get("architectures")):
        out["architectures"] = [type(meta).__name__]
    if task == "SEQ_CLS" and num_labels:
        id2label = base_config.get("id2label") or {}
        if len(id2label) != num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return out


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MergeError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a JSON object")
    return data
