"""The module tree of a model as plain data.

`ModelTree` is built once per model (real or on the meta device) and holds everything the
analytic LoRA count needs, so changing r, alpha or targets never touches the model again.
Its nested form folds runs of identical blocks the way PyTorch prints them
(`(0-125): 126 x LlamaDecoderLayer`), keeping blocks that differ as separate runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

try:  # transformers' GPT-2 style layer: a Linear with its weight stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

# Module kinds PEFT's LoRA can wrap, with how their adapter is shaped.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's own list, in its order


@dataclass
class ModuleInfo:
    path: str
    cls: str
    kind: str | None  # "linear", "conv1d" (transformers Conv1D), "embedding", "conv", or None
    in_features: int = 0
    out_features: int = 0
    a_fan_in: int = 0  # inputs to lora_A per rank: in_features, or in_channels * kernel for convs
    bias: int = 0  # numel of this module's own bias
    bias_named: int = 0  # unique params in this subtree named "*.bias"
    params: int = 0  # unique parameters in this module and below
    own_params: int = 0

    @property
    def lora_targetable(self) -> bool:
        return self.kind is not None

    def lora_params(self, r: int) -> int:
        """lora_A + lora_B parameters PEFT creates for this module at rank r."""
        if self.kind == "embedding":
            return r * (self.in_features + self.out_features)
        return r * self.a_fan_in + r * self.out_features


@dataclass
class ModelTree:
    model: str
    cls: str
    task: str
    modules: list[ModuleInfo]
    total_params: int
    bias_params: int  # unique params named "*.bias" (PEFT's bias="all" rule)
    all_linear: list[str]  # what PEFT's "all-linear" expands to for this model and task
    output_embedding: str | None
    nodes: dict = field(repr=False, default_factory=dict)
    by_path: dict = field(repr=False, default_factory=dict)
    leaf_names: list[str] = field(repr=False, default_factory=list)
    model_type: str = ""
    # Rebuilds the (meta) model; only needed where PEFT rewrites targets itself (see lora.count).
    factory: Callable[[], nn.Module] | None = field(repr=False, default=None, compare=False)

    def __post_init__(self):
        self.by_path = {m.path: m for m in self.modules}
        self.leaf_names = sorted({m.path.rsplit(".", 1)[-1] for m in self.modules if m.path})

    def targetable_types(self) -> list[str]:
        """Leaf names of LoRA-able modules (q_proj, v_proj, c_attn ...), in model order."""
        seen = {}
        for m in self.modules:
            if m.lora_targetable and m.path:
                seen.setdefault(m.path.rsplit(".", 1)[-1], None)
        return list(seen)

    def to_dict(self) -> dict:
        return {"model": self.model, "class": self.cls, "task": self.task, "total_params": self.total_params,
                "nodes": self.nodes}


def module_kind(module: nn.Module) -> tuple[str | None, int, int, int]:
    """(kind, in_features, out_features, lora_A fan-in) for modules PEFT's LoRA can wrap."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        w = module.weight
        fan_in, fan_out = w.shape  # stored transposed: (in, out)
        return "conv1d", fan_in, fan_out, fan_in
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim, module.num_embeddings
    if isinstance(module, _CONV):
        k = math.prod(module.kernel_size)
        return "conv", module.in_channels, module.out_channels, module.in_channels * k // module.groups
    return None, 0, 0, 0


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def build_tree(model: nn.Module, name: str = "", task: str = "causal_lm",
               factory: Callable[[], nn.Module] | None = None) -> ModelTree:
    """Walk `model` once; works on meta-device models (only shapes are read)."""
    seen_params: set[int] = set()
    total = 0
    bias_total = 0
    for pname, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        total += p.numel()
        if _is_bias(pname):
            bias_total += p.numel()
        seen_params.add(id(p))

    bias_named: dict[str, int] = {}
    for pname, p in model.named_parameters():
        if _is_bias(pname):
            parts = pname.split(".")[:-1]
            for i in range(len(parts) + 1):
                key = ".".join(parts[:i])
                bias_named[key] = bias_named.get(key, 0) + p.numel()

    infos: list[ModuleInfo] = []
    subtree_params: dict[int, int] = {}
    for path, mod in model.named_modules():
        kind, fin, fout, a_in = module_kind(mod)
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        b = getattr(mod, "bias", None)
        bias = b.numel() if isinstance(b, torch.Tensor) else 0
        infos.append(ModuleInfo(path, type(mod).__name__, kind, fin, fout, a_in, bias, bias_named.get(path, 0), 0, own))
        subtree_params[id(mod)] = _unique_numel(mod)
    for info, (_, mod) in zip(infos, model.named_modules()):
        info.params = subtree_params[id(mod)]

    out_emb = _output_embedding_path(model)
    tree = ModelTree(name or type(model).__name__, type(model).__name__, task, infos, total, bias_total,
                     _all_linear(model, task, out_emb), out_emb,
                     model_type=getattr(getattr(model, "config", None), "model_type", "") or "", factory=factory)
    tree.nodes = _fold(model, "", "", {id(m): i for i, m in zip(infos, model.modules())}, subtree_params)
    return tree


def _unique_numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())  # parameters() de-duplicates shared tensors


def _output_embedding_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def _all_linear(model: nn.Module, task: str, out_emb: str | None) -> list[str]:
    """PEFT's `_maybe_include_all_linear_layers`: every Linear/Conv1D but the output head."""
    from transformers import PreTrainedModel

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D))]
    exclude = set()
    if isinstance(model, PreTrainedModel):
        if out_emb is not None:
            exclude.add(out_emb)
        elif task == "seq_cls":
            for head in SEQ_CLS_HEAD_NAMES:
                mod = getattr(model, head, None)
                if mod is not None:
                    exclude.add(next(n for n, m in model.named_modules() if m is mod))
                    break
    return [n for n in linear if n not in exclude]


# --- folding ------------------------------------------------------------------------------

def _signature(mod: nn.Module, memo: dict) -> tuple:
    """Structure and shapes of a subtree: equal signatures print as one folded block."""
    key = id(mod)
    if key not in memo:
        own = tuple((n, tuple(p.shape)) for n, p in mod.named_parameters(recurse=False))
        kids = tuple((n, _signature(c, memo)) for n, c in mod.named_children())
        memo[key] = (type(mod).__name__, own, kids, _extra(mod))
    return memo[key]


def _extra(mod: nn.Module) -> str:
    # extra_repr carries what shapes alone miss (eps, kernel size, sliding window flags ...)
    try:
        return mod.extra_repr()
    except Exception:  # some extra_repr implementations read real data; meta tensors have none
        return ""


def _node(mod: nn.Module, name: str, path: str, info: ModuleInfo, subtree: dict) -> dict:
    node = {"name": name, "path": path, "class": type(mod).__name__, "params": subtree[id(mod)],
            "own_params": info.own_params, "lora_targetable": info.lora_targetable, "repeat": 1}
    if info.kind:
        node.update(kind=info.kind, in_features=info.in_features, out_features=info.out_features)
    return node


def _fold(mod: nn.Module, name: str, path: str, info_of: dict, subtree: dict, memo: dict | None = None) -> dict:
    memo = {} if memo is None else memo
    node = _node(mod, name or type(mod).__name__, path, info_of[id(mod)], subtree)
    children = list(mod.named_children())
    kids = []
    i = 0
    while i < len(children):
        cname, child = children[i]
        j = i + 1
        if cname.isdigit():
            sig = _signature(child, memo)
            while (j < len(children) and children[j][0].isdigit()
                   and int(children[j][0]) == int(children[j - 1][0]) + 1
                   and _signature(children[j][1], memo) == sig):
                j += 1
        cpath = f"{path}.{cname}" if path else cname
        kid = _fold(child, cname, cpath, info_of, subtree, memo)
        if j - i > 1:
            last = children[j - 1][0]
            kid["name"] = f"{cname}-{last}"
            kid["repeat"] = j - i
            kid["members"] = [f"{path}.{n}" if path else n for n, _ in children[i:j]]
            kid["params"] = subtree[id(child)] * (j - i)
        kids.append(kid)
        i = j
    if kids:
        node["children"] = kids
    return node


# --- text rendering -----------------------------------------------------------------------

def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render(tree: ModelTree, max_depth: int = 12) -> str:
    lines = [f"{tree.cls}  ({human(tree.total_params)} parameters)"]

    def walk(node: dict, prefix: str, depth: int) -> None:
        kids = node.get("children", [])
        for k, kid in enumerate(kids):
            last = k == len(kids) - 1
            label = _label(kid)
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{label}")
            if depth < max_depth:
                walk(kid, prefix + ("   " if last else "│  "), depth + 1)

    walk(tree.nodes, "", 1)
    return "\n".join(lines)


def _label(node: dict) -> str:
    rep = node["repeat"]
    head = f"({node['name']}): {rep} x {node['class']}" if rep > 1 else f"{node['name']} ({node['class']})"
    if node.get("kind"):
        shape = f" {node['in_features']}→{node['out_features']}"
        head += shape + ("  [LoRA]" if node["lora_targetable"] else "")
    if node["params"]:
        per = f", {human(node['params'] // rep)} each" if rep > 1 else ""
        head += f"  {human(node['params'])}{per}"
    return head


@lru_cache(maxsize=4)
def model_tree(ref: str, task: str | None = None, trust_remote_code: bool = False) -> ModelTree:
    """The tree of any reference, built on the meta device (no weights are read) and cached."""
    from studio.models.registry import build_meta_model, resolve

    task = task or resolve(ref).default_task

    def factory():
        return build_meta_model(ref, task, trust_remote_code=trust_remote_code)

    return build_tree(factory(), ref, task, factory)
