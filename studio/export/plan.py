"""What a merge will write, worked out from file headers before any weight is read.

A plan lists every output tensor with where its value comes from (a base tensor, a tensor
of the adapter that replaces it, plus the LoRA update to add) and checks everything that can
be checked without reading weights: the adapter's keys map onto the base's tensors, every
update's shape fits, ranks agree with rank_pattern. So a mismatched adapter is refused in
a second, before anything is written, with the tensor and both shapes named.

Names: the adapter's module paths (studio.adapters.file) are the task model's (e.g.
`bert.encoder...` for BertForSequenceClassification), while a checkpoint saved from the bare
model has no `bert.` prefix. The task model is built
on the meta device (no memory) to learn its names, its tied weights and which modules are
GPT-2 Conv1D (stored transposed, PEFT's fan_in_fan_out).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio import _compat
from studio.adapters.file import AdapterFile
from studio.errors import MergeError
from studio.export.verify import quiet
from studio.models import shards




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
    adapter = AdapterFile(adapter_dir, error=MergeError)
    adapter.check_mergeable()
    afile = adapter.weights_path
    base_config = _read_json(base_dir / "config.json", "base model config")
    files = _base_files(base_dir)
    try:
        infos = shards.list_tensors(files)
        ashapes = {k: (v.shape, v.torch_dtype) for k, v in shards.list_tensors([afile]).items()}
    except ValueError as e:
        raise MergeError(str(e)) from None
    replacements = adapter.replacements
    task = adapter.task_type
    num_labels = None
    if task == "SEQ_CLS":
        num_labels = adapter.head_size() or int(base_config.get("num_labels") or len(base_config.get("id2label") or {}) or 2)
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
    for module in adapter.modules:
        u = _lora_update(adapter, module, meta)
        target = _resolve(f"{module}.weight", entries, tied, u.a_key)
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

def _lora_update(adapter: AdapterFile, module: str, meta) -> LoraUpdate:
    m = adapter.module(module)
    if not adapter.is_matrix(module):
        raise MergeError(f"{m.a_key} has shape {adapter.shapes[m.a_key]}: LoRA on convolutions is not supported by merge")
    if m.embedding:
        kind = "embedding"
        if m.magnitude_key:
            raise MergeError(f"{module}: DoRA on embeddings is not supported by merge; train without use_dora on embeddings")
    else:
        kind = _module_kind(meta, module, bool(adapter.config.get("fan_in_fan_out")))
    return LoraUpdate(module, kind, m.a_key, m.b_key, adapter.rank(module), adapter.scaling(module),
                      m.magnitude_key, m.b_bias_key)


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
                build = (lambda: _compat.model_from_config(arch, config)) if arch else (lambda: AutoModel.from_config(config))
            with torch.device("meta"):
                return build()
    except Exception:  # unknown architecture or remote code not trusted: fall back to the files alone
        return None


def _tied_pairs(meta, base_config: dict, entries: dict) -> dict[str, str]:
    """{tied name: source name}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    if meta is not None:
        return _compat.tied_weight_pairs(meta)
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
