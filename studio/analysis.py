"""What an adapter learned, measured the way the LoRA paper does (Hu et al., 2021, section 7).

Three analyses, each returning plain data (dicts and lists of floats) for the CLI and UI:

- `subspace_similarity`: how much the top directions of two adapters overlap, phi(i, j) =
  ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) (the paper's Figure 3), for the left singular
  vectors of delta W (the default), of lora_B, or the right ones of lora_A, beside the exact
  expectation for random subspaces (`random_baseline`).
- `init_distance`: how far lora_A has moved from its initialisation, re-created from the run's
  seed as the trainer and PEFT made it. In a short run A stays close to its random draw, so its
  subspaces say more about the seed than about the data; B starts at zero and delta W = B A
  holds only what was learned.
- `amplification`: how strongly delta W = scaling * B @ A amplifies directions of W,
  ||delta W||_F / ||U^T W V||_F with U, V the top-r singular vectors of delta W (Table 7),
  next to the same number for a random r-dimensional projection.
- `spectrum`: the singular values of delta W and how much of the rank they use.

Cost: delta W has rank <= r, so its SVD comes from the r x r core of the QR factors of B and
A^T; a 16384 x 16384 update is never formed. Only `amplification` reads base weights, one
tensor at a time and in row blocks, each block multiplied by the thin factors U or V. All
arithmetic is float64 on the CPU (the matrices that get factored are at most r wide).

Orientation: every matrix here is in nn.Linear's (out, in) orientation. GPT-2's Conv1D and
embeddings store W transposed; PEFT's factors are still A (r x in), B (out x r) for Conv1D
and the transposed update for embeddings, so those base weights are read transposed.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from studio.adapters.file import CONFIG_NAME, AdapterFile, module_path, present
from studio.config import load_config
from studio.errors import AnalysisError, StudioError
from studio.models.registry import build_meta_model, model_dir
from studio.runs.rundir import RunDir

RANDOM_SEED = 0
# Which singular vectors subspace_similarity compares: "dW" (left singular vectors of delta W, what
# the update writes into the output space), "B" (left of lora_B) or "A" (right of lora_A, the paper's).
WHICH = ("dW", "B", "A")
DEFAULT_WHICH = "dW"
# lora_A within this relative distance of its initial draw counts as still close to it.
INIT_CLOSE = 0.2
# Row blocks of a base weight converted to float64 at once: bounds the extra memory of
# amplification to about this many bytes, whatever the layer's size.
_BLOCK_BYTES = 64 << 20



# --- adapters -----------------------------------------------------------------------------

class Adapter(AdapterFile):
    """A PEFT LoRA adapter for analysis: a run folder or an adapter folder, factors read on demand."""

    def __init__(self, path: str | Path):
        folder, self.run_dir = _adapter_dir(Path(path))
        super().__init__(folder, error=AnalysisError)
        for module in self.modules:
            if not self.is_matrix(module):
                a, b = self.shape(module, "A"), self.shape(module, "B")
                raise AnalysisError(f"{self.weights_path}: module {module} has lora_A {a} and lora_B {b}; expected "
                                    "r x in and out x r (LoRA on convolutions is not analysed)")
        if not self.modules:
            raise AnalysisError(f"{self.weights_path} holds no lora_A / lora_B tensors")

    def __repr__(self) -> str:
        return f"Adapter({str(self.dir)!r})"

    def shape(self, module: str, role: str) -> tuple:
        m = self.module(module)
        return self.shapes[m.a_key if role == "A" else m.b_key]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float64, A: r x in, B: out x r (embeddings: in = vocabulary, out = dim)."""
        return super().factors(module, torch.float64)

    def select(self, modules=None) -> list[str]:
        """Module paths in model order, optionally only those matching names (full path or .suffix)."""
        if modules is None:
            return list(self.modules)
        if isinstance(modules, str):
            modules = [modules]
        out = []
        for name in modules:
            hits = _match(name, self.modules)
            if not hits:
                raise AnalysisError(f"module {name!r} is not in the adapter {self.dir}; it has "
                                    f"{_preview(self.modules)}")
            out += [h for h in hits if h not in out]
        return out


def _adapter_dir(path: Path) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None) for a run folder or an adapter folder."""
    if present(path):
        run = path.parent if RunDir(path.parent).config.is_file() else None
        return path, run
    if present(RunDir(path).adapter):
        return RunDir(path).adapter, path
    if not path.exists():
        raise AnalysisError(f"{path} does not exist; give a run folder or an adapter folder")
    raise AnalysisError(f"{path} has neither {CONFIG_NAME} nor adapter/{CONFIG_NAME}; "
                        "give a finished run folder or an adapter folder")


def _match(name: str, modules) -> list[str]:
    name = module_path(name)
    if name in modules:
        return [name]
    return [m for m in modules if m.endswith("." + name)]


def _preview(names, n: int = 3) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a JSON object")
    return data


def _as_adapter(x) -> Adapter:
    return x if isinstance(x, Adapter) else Adapter(x)


# --- 1. subspace similarity ---------------------------------------------------------------

def subspace_similarity(adapter_a, adapter_b, module: str | None = None, which: str = DEFAULT_WHICH) -> dict:
    """phi(i, j) between the top singular directions of two adapters, for one module and all.

    which="dW": left-singular vectors of delta W = scaling * B @ A (the output directions the
    update writes, ordered by how much it writes); "B": left-singular vectors of lora_B; "A":
    right-singular vectors of lora_A (input directions, as in the paper, but close to their
    random initialisation after a short run: see init_distance). "baseline" is what independent
    random subspaces of those ranks in R^dim give (random_baseline), to read the grid against.

    Returns {"module", "which", "dim", "r1", "r2", "phi" (r1 x r2 nested lists, phi[i-1][j-1]),
    "baseline" (the same shape), "adapter_a", "adapter_b", "modules" (per common module: module,
    dim, r1, r2, phi_1_1, phi_diag_mean, phi_mean, baseline_1_1, baseline_mean), "summary"
    (modules, phi_1_1_mean, phi_diag_mean, phi_mean, baseline_1_1_mean, baseline_mean)}.
    """
    if which not in WHICH:
        raise AnalysisError(f"which = {which!r}; use 'dW' (left singular vectors of delta W), 'B' (lora_B, output "
                            "directions) or 'A' (lora_A, input directions)")
    a, b = _as_adapter(adapter_a), _as_adapter(adapter_b)
    common = [m for m in a.modules if m in b.modules]
    if module is not None:
        in_a, in_b = _match(module, a.modules), _match(module, b.modules)
        if not in_a or not in_b:
            lacking = [str(x.dir) for x, hits in ((a, in_a), (b, in_b)) if not hits]
            raise AnalysisError(f"module {module!r} is not in both adapters: missing from {' and '.join(lacking)}")
        chosen = [m for m in in_a if m in in_b]
        if len(chosen) != 1:
            why = f"matches {len(chosen)} modules ({_preview(chosen)}); give the full path" if chosen else \
                f"matches {_preview(in_a)} in {a.dir} but {_preview(in_b)} in {b.dir}"
            raise AnalysisError(f"module {module!r} {why}")
        chosen = chosen[0]
    elif not common:
        raise AnalysisError(f"the adapters share no module: {a.dir} has {_preview(a.modules)}, "
                            f"{b.dir} has {_preview(b.modules)}")
    else:
        chosen = common[0]

    rows, grid = [], None
    for m in common:
        phi = _phi(a, b, m, which)
        if m == chosen:
            grid = phi
        base = torch.tensor(random_baseline(_dim(a, m, which), phi.shape[0], phi.shape[1]), dtype=torch.float64)
        rows.append({"module": m, "dim": _dim(a, m, which), "r1": phi.shape[0], "r2": phi.shape[1],
                     "phi_1_1": float(phi[0, 0]), "phi_diag_mean": float(torch.diagonal(phi).mean()),
                     "phi_mean": float(phi.mean()), "baseline_1_1": float(base[0, 0]),
                     "baseline_mean": float(base.mean())})
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    dim = _dim(a, chosen, which)
    return {"module": chosen, "which": which, "dim": dim, "r1": grid.shape[0], "r2": grid.shape[1],
            "phi": grid.tolist(), "baseline": random_baseline(dim, grid.shape[0], grid.shape[1]),
            "adapter_a": str(a.dir), "adapter_b": str(b.dir), "modules": rows,
            "summary": {"modules": len(rows), "phi_1_1_mean": mean("phi_1_1"),
                        "phi_diag_mean": mean("phi_diag_mean"), "phi_mean": mean("phi_mean"),
                        "baseline_1_1_mean": mean("baseline_1_1"), "baseline_mean": mean("baseline_mean")}}


def random_baseline(dim: int, r1: int, r2: int) -> list[list[float]]:
    """E[phi(i, j)] for two independent uniformly random subspaces of R^dim, i <= r1, j <= r2.

    With P, Q the projections on a fixed i-dimensional and a random j-dimensional subspace,
    E[Q] = (j / dim) I by symmetry, so E ||U1^T U2||_F^2 = E tr(P Q) = i j / dim exactly, and
    phi's expectation is i j / (dim min(i, j)) = max(i, j) / dim (capped at 1, as phi is)."""
    return [[min(1.0, max(i, j) / dim) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)]


def _dim(adapter: Adapter, module: str, which: str) -> int:
    return adapter.shape(module, "A")[1] if which == "A" else adapter.shape(module, "B")[0]


def _phi(a: Adapter, b: Adapter, module: str, which: str) -> torch.Tensor:
    da, db = _dim(a, module, which), _dim(b, module, which)
    if da != db:
        what = "lora_A is r x in" if which == "A" else "lora_B is out x r"
        raise AnalysisError(f"module {module}: {what} with {'in' if which == 'A' else 'out'} = {da} in {a.dir} "
                            f"but {db} in {b.dir}; the adapters were made for different models")
    u1, u2 = _directions(a, module, which), _directions(b, module, which)
    # Cumulative sums over both axes give every ||U1[:, :i]^T U2[:, :j]||_F^2 from one r1 x r2 product.
    energy = ((u1.T @ u2) ** 2).cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (energy / torch.minimum(i, j)).clamp(0.0, 1.0)


def _directions(adapter: Adapter, module: str, which: str) -> torch.Tensor:
    """Singular vectors as columns, by decreasing singular value: dim x r."""
    A, B = adapter.factors(module)
    if which == "A":
        return torch.linalg.svd(A, full_matrices=False).Vh.T
    if which == "dW":
        return _low_rank_svd(A, B, adapter.scaling(module))[0]
    return torch.linalg.svd(B, full_matrices=False).U


# --- how far lora_A moved ---------------------------------------------------------------------

def init_distance(run_dir, modules=None) -> dict:
    """||A - A0||_F / ||A0||_F per module, with A0 the lora_A the run started from.

    A0 is re-created as the trainer made it: the run's base model loaded the same way, the torch
    seed set to train.seed, then PEFT's get_peft_model with the run's LoRA settings (so PEFT's own
    initialisation draws it, in its own order). Needs the run folder (its config holds the seed);
    loads the base model once (seconds for a small model). A continued run started from its
    parent's adapter, not from a draw: refused, naming the parent.

    Returns {"seed", "modules": [{"module", "relative_distance"}], "mean", "max", "close"
    (mean below INIT_CLOSE: A's subspaces still mostly reflect the seed)}.
    """
    adapter = _as_adapter(run_dir)
    if adapter.run_dir is None:
        raise AnalysisError(f"{adapter.dir} is not inside a run folder: its initialisation (the run's seed and "
                            "settings) is not known")
    rd = RunDir(adapter.run_dir)
    parent = rd.parent()
    if parent is not None:
        raise AnalysisError(f"run {rd.id} continued run {parent.get('run')} from its adapter: its lora_A did not "
                            "start from a random draw; measure the parent run instead")
    cfg = load_config(rd.config)
    names = adapter.select(modules)
    initial = _initial_lora_a(rd, cfg)
    rows = []
    for m in names:
        if m not in initial:
            raise AnalysisError(f"module {m}: the run's settings ({rd.config}) do not adapt it; the adapter "
                                "was not made by this run's config")
        A0 = initial[m].to(torch.float64)
        A = adapter.factors(m)[0]
        if A.shape != A0.shape:
            raise AnalysisError(f"module {m}: lora_A is {tuple(A.shape)} but the run's settings make "
                                f"{tuple(A0.shape)}; the adapter was not made by this run's config")
        rows.append({"module": m, "relative_distance": float((A - A0).norm() / A0.norm())})
    mean = sum(r["relative_distance"] for r in rows) / len(rows)
    return {"seed": cfg.train.seed, "modules": rows, "mean": mean,
            "max": max(r["relative_distance"] for r in rows), "close": mean < INIT_CLOSE}


def _initial_lora_a(rd: RunDir, cfg) -> dict[str, torch.Tensor]:
    from peft import get_peft_model

    from studio.lora.targets import build_lora_config
    from studio.models.registry import load_model

    m = cfg.model
    labels = rd.id2label() if m.task == "seq_cls" else None
    try:
        with torch.random.fork_rng(devices=[]):  # the server's own random state is left as it was
            torch.manual_seed(cfg.train.seed)
            model = load_model(m.name_or_path, m.task, num_labels=len(labels) if labels else None, id2label=labels,
                               dtype=m.dtype, trust_remote_code=m.trust_remote_code)
            torch.manual_seed(cfg.train.seed)  # the trainer seeds again right before get_peft_model
            peft_model = get_peft_model(model, build_lora_config(cfg.lora, m.task))
    except StudioError as e:
        raise AnalysisError(f"cannot re-create the initial adapter of run {rd.id}: {e}") from None
    out = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            out[module_path(name)] = lora_a["default"].weight.detach().clone()
    return out


# --- the low-rank update ------------------------------------------------------------------

def _low_rank_svd(A: torch.Tensor, B: torch.Tensor, scaling: float):
    """U, S, V of scaling * B @ A without forming it: B = Qb Rb, A^T = Qa Ra, so
    delta W = Qb (scaling Rb Ra^T) Qa^T and only the small core is decomposed."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    uc, s, vch = torch.linalg.svd(scaling * (rb @ ra.T), full_matrices=False)
    return qb @ uc, s, qa @ vch.T


def _rank_stats(s: torch.Tensor, energy: float = 0.9) -> dict:
    total = float((s ** 2).sum())
    if total == 0.0:  # an untrained adapter (B = 0): no direction used
        return {"energy_rank_90": 0, "entropy_rank": 0.0, "stable_rank": 0.0, "numerical_rank": 0}
    cum = (s ** 2).cumsum(0) / total
    p = s / s.sum()
    p = p[p > 0]
    return {
        "energy_rank_90": int((cum < energy - 1e-12).sum()) + 1,
        # Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.
        "entropy_rank": float(torch.exp(-(p * p.log()).sum())),
        "stable_rank": total / float(s[0]) ** 2,
        "numerical_rank": int((s > s[0] * max(s.shape[0], 1) * torch.finfo(torch.float32).eps).sum()),
    }


# --- 3. spectrum --------------------------------------------------------------------------

def spectrum(run_or_adapter, modules=None) -> list[dict]:
    """Singular values of delta W = scaling * B @ A per module, and how much of r they use.

    Per module: {"module", "shape" ([out, in] of delta W, Linear orientation), "r", "scaling",
    "singular_values" (r values, descending; beyond the true rank they are ~0), "fro_norm",
    "spectral_norm", "energy_rank_90" (fewest values holding 90% of sum s^2),
    "entropy_rank" (exp of the entropy of s / sum s, in [1, r]), "stable_rank"
    (||dW||_F^2 / ||dW||_2^2), "numerical_rank" (values above s_max * r * float32 eps)}.
    """
    adapter = _as_adapter(run_or_adapter)
    out = []
    for m in adapter.select(modules):
        A, B = adapter.factors(m)
        sc = adapter.scaling(m)
        _, s, _ = _low_rank_svd(A, B, sc)
        out.append({"module": m, "shape": [B.shape[0], A.shape[1]], "r": A.shape[0], "scaling": sc,
                    "singular_values": s.tolist(), "fro_norm": float(s.norm()), "spectral_norm": float(s[0]),
                    **_rank_stats(s)})
    return out


# --- 2. amplification ---------------------------------------------------------------------

def amplification(run_or_adapter, base=None, modules=None, seed: int = RANDOM_SEED) -> list[dict]:
    """How much delta W amplifies the directions of W it touches (the paper's Table 7).

    base: a model reference or folder; by default the run's config.yaml model, else the
    adapter's base_model_name_or_path. U, V are the top-r left/right singular vectors of
    delta W, and the projection of W is U^T W V (r x r). The random comparison uses
    orthonormal U_rand (out x r), V_rand (in x r) from Gaussian matrices with `seed`.

    Per module: {"module", "base_tensor", "kind" (linear | conv1d | embedding), "shape"
    ([out, in]), "r", "scaling", "delta_w_norm" (||dW||_F), "w_norm" (||W||_F),
    "projected_w_norm" (||U^T W V||_F), "amplification" (delta_w_norm / projected_w_norm),
    "random_projected_w_norm" (||U_rand^T W V_rand||_F), "random_amplification"}.
    """
    adapter = _as_adapter(run_or_adapter)
    names = adapter.select(modules)
    base_dir = _base_dir(adapter, base)
    weights = _BaseWeights(base_dir)
    out = []
    for m in names:
        A, B = adapter.factors(m)
        shape = (B.shape[0], A.shape[1])
        sc = adapter.scaling(m)
        tensor, transposed, kind = weights.locate(m, shape, adapter)
        U, s, V = _low_rank_svd(A, B, sc)
        r = A.shape[0]
        gen = torch.Generator().manual_seed(seed)
        Ur = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64)).Q
        Vr = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64)).Q
        (proj, rproj), w_norm = weights.project(tensor, transposed, [(U, V), (Ur, Vr)])
        dnorm = float(s.norm())
        pn, rn = float(proj.norm()), float(rproj.norm())
        out.append({"module": m, "base_tensor": tensor, "kind": kind, "shape": list(shape), "r": r, "scaling": sc,
                    "delta_w_norm": dnorm, "w_norm": w_norm, "projected_w_norm": pn,
                    "amplification": dnorm / pn if pn > 0 else math.inf,
                    "random_projected_w_norm": rn, "random_amplification": dnorm / rn if rn > 0 else math.inf})
    return out


def _base_dir(adapter: Adapter, base) -> Path:
    if base is None and adapter.run_dir is not None:
        base = load_config(RunDir(adapter.run_dir).config).model.name_or_path
        where = f"{RunDir(adapter.run_dir).config} (model.name_or_path)"
    elif base is None:
        base = adapter.config.get("base_model_name_or_path")
        where = f"{adapter.config_path} (base_model_name_or_path)"
        if not base:
            raise AnalysisError(f"{adapter.dir} is not inside a run folder and its {CONFIG_NAME} names no "
                                "base model; pass the base model")
    else:
        where = "the base argument"
    try:
        return Path(model_dir(str(base)))
    except StudioError as e:
        raise AnalysisError(f"base model {base!r} from {where}: {e}") from None


class _BaseWeights:
    """The base model's safetensors tensors, read one tensor (and one row block) at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = {n: folder / f for n, f in _read_json(index)["weight_map"].items()}
            except (KeyError, TypeError, AttributeError):
                raise AnalysisError(f"{index}: no weight_map; not a safetensors index") from None
        else:
            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    files.update({k: path for k in f.keys()})
            if not files:
                raise AnalysisError(f"{folder} has no *.safetensors weights (pickled .bin files are never loaded)")
        self.files = files
        self._shapes: dict[str, tuple] = {}

    def shape(self, name: str) -> tuple:
        if name not in self._shapes:
            with safe_open(str(self.files[name]), "pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def locate(self, module: str, shape: tuple, adapter: Adapter) -> tuple[str, bool, str]:
        """(tensor name, stored transposed?, kind) of the base weight that module's update adds to."""
        name = self._tensor_name(module)
        stored = self.shape(name)
        out_f, in_f = shape
        embedding = adapter.module(module).embedding
        if stored not in ((out_f, in_f), (in_f, out_f)):
            raise AnalysisError(f"module {module}: the update B @ A is {out_f} x {in_f} but base tensor {name} in "
                                f"{self.folder} is {' x '.join(map(str, stored))}; the adapter was made for a different model")
        if embedding:  # nn.Embedding stores vocabulary x dim; PEFT's factors give dim x vocabulary
            transposed = True
        elif out_f != in_f:
            transposed = stored == (in_f, out_f)
        else:
            transposed = self._is_conv1d(module, adapter)
        kind = "embedding" if embedding else ("conv1d" if transposed else "linear")
        return name, transposed, kind

    def _tensor_name(self, module: str) -> str:
        want = module + ".weight"
        if want in self.files:
            return want
        parts = want.split(".")
        for k in range(1, len(parts) - 1):  # adapter of a task model, checkpoint of the bare model
            if ".".join(parts[k:]) in self.files:
                return ".".join(parts[k:])
        hits = [n for n in self.files if n.endswith("." + want)]  # the other way round
        if len(hits) == 1:
            return hits[0]
        tied_config = _read_json(self.folder / "config.json").get("tie_word_embeddings", True)
        if module.split(".")[-1] in ("lm_head", "embed_out") and tied_config:
            # A tied output head is saved only as the input embedding (vocabulary x dim, Linear's orientation).
            tied = [n for n in self.files if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
            if len(tied) == 1:
                return tied[0]
        raise AnalysisError(f"module {module}: the base model in {self.folder} has no tensor {want}; "
                            "the adapter was made for a different model")

    def _is_conv1d(self, module: str, adapter: Adapter) -> bool:
        # A square weight does not show its orientation. PEFT decides by the module's class
        # (and rewrites fan_in_fan_out as it goes, so the saved flag can be stale): ask the
        # model itself, built without memory; only when that fails trust the flag.
        cls = _module_classes(str(self.folder)).get(module)
        if cls is None and "." in module:
            cls = _module_classes(str(self.folder)).get(module.split(".", 1)[1])
        if cls is not None:
            return cls == "Conv1D"
        return bool(adapter.config.get("fan_in_fan_out"))

    def project(self, name: str, transposed: bool, pairs) -> tuple[list[torch.Tensor], float]:
        """[U^T W V for each (U, V)] and ||W||_F, reading W in row blocks of its stored layout."""
        path = self.files[name]
        rows, cols = self.shape(name)
        step = max(1, _BLOCK_BYTES // (8 * max(cols, 1)))
        acc = [torch.zeros(U.shape[1], V.shape[1], dtype=torch.float64) for U, V in pairs]
        sq = 0.0
        with safe_open(str(path), "pt") as f:
            sl = f.get_slice(name)
            for lo in range(0, rows, step):
                blk = sl[lo:lo + step].double()
                sq += float((blk ** 2).sum())
                for k, (U, V) in enumerate(pairs):
                    if transposed:  # stored W^T (in x out): U^T W V = (V^T W^T U)^T, summed over row blocks of W^T
                        acc[k] += (V[lo:lo + step].T @ (blk @ U)).T
                    else:
                        acc[k] += U[lo:lo + step].T @ (blk @ V)
        return acc, math.sqrt(sq)


@lru_cache(maxsize=4)
def _module_classes(folder: str) -> dict[str, str]:
    """{module path: class name} of the model in folder, built on the meta device; {} if it cannot be."""
    try:
        model = build_meta_model(folder)
    except Exception:  # unknown architecture or remote code not trusted: fall back to the adapter's flag
        return {}
    return {n: type(m).__name__ for n, m in model.named_modules()}
