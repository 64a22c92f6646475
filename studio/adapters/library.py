"""The adapter library: every adapter the studio knows, grouped by the base model it belongs to.

Sources: each run's final adapter (`run/adapter`), its newest complete checkpoint, and the
folders under `RUNS/adapters/` (combined ones, with `combination.json`, and imported ones, with
`import.json`). A reference to an adapter is a run folder, an adapter folder, or the name of a
library entry; `resolve` turns any of them into the folder, its base model and its task.

Imports are checked before they are kept: safetensors only (a pickle can run code), no path
that leaves the folder (a zip's `../` names), a PEFT LoRA config, tensor keys PEFT would write,
and shapes that fit the base (A is r x in, B is out x r of the module they adapt). Nothing is
written until all of that holds; then the folder appears at once (temp folder + rename).
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from studio.adapters.file import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, present
from studio.config import load_config
from studio.errors import AdapterError
from studio.runs import manager
from studio.runs.rundir import RunDir, is_run_id

LIBRARY = "adapters"
COMBINATION, IMPORT = "combination.json", "import.json"
# Files an imported adapter may carry besides its config and weights (tokenizer, readme).
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".model", ".jinja")


@dataclass
class Entry:
    name: str           # run id, "run-id@checkpoint-N", or the library folder's name
    path: str           # the adapter folder
    base: str | None    # the model reference it was trained on
    task: str | None    # causal_lm / seq_cls
    origin: str         # run | checkpoint | combined | imported
    r: int | None
    lora_alpha: float | None
    targets: list[str]
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def library_dir(root=None) -> Path:
    return manager.runs_dir(root) / LIBRARY


def _entry(name: str, folder: Path, base: str | None, task: str | None, origin: str) -> Entry:
    a = AdapterFile(folder)
    cfg = a.config
    targets = cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else ([targets] if targets else [])
    return Entry(name, str(folder), base, task, origin, cfg.get("r"), cfg.get("lora_alpha"), targets,
                 sum(p.stat().st_size for p in a.files()))


def _task_of(a: AdapterFile) -> str | None:
    return {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}.get(a.task_type or "")


def entries(root=None) -> list[Entry]:
    """Every adapter of the runs folder and the library, newest runs first."""
    root = manager.runs_dir(root)
    out: list[Entry] = []
    for r in manager.list_runs(root):
        rd = RunDir(r["dir"])
        try:
            if present(rd.adapter):
                out.append(_entry(r["id"], rd.adapter, r.get("model"), r.get("task"), "run"))
            ckpt = rd.last_complete_checkpoint()
            if ckpt is not None and r.get("state") != "completed":
                out.append(_entry(f"{r['id']}@{ckpt.name}", ckpt, r.get("model"), r.get("task"), "checkpoint"))
        except AdapterError:
            continue  # a run whose adapter is half-written or pickled is not offered
    lib = library_dir(root)
    for d in sorted(lib.iterdir()) if lib.is_dir() else []:
        rec = _record(d)
        if rec is None:
            continue
        try:
            out.append(_entry(d.name, d, rec.get("base"), rec.get("task"), rec["origin"]))
        except AdapterError:
            continue
    return out


def _record(folder: Path) -> dict | None:
    for name, origin in ((COMBINATION, "combined"), (IMPORT, "imported")):
        rec = manager.read_json(folder / name)
        if rec is not None:
            return {**rec, "origin": origin}
    return None


def resolve(ref: str, root=None) -> Entry:
    """A run folder, an adapter folder, or a library name -> its Entry (folder, base, task)."""
    root = manager.runs_dir(root)
    p = Path(ref)
    rd = RunDir(p)
    if rd.config.is_file():  # a run folder
        cfg = load_config(rd.config)
        if not present(rd.adapter):
            st = rd.status()
            raise AdapterError(f"run {p.name} has no final adapter yet (state {st.get('state')}, step "
                               f"{st.get('step', 0)})")
        return _entry(p.name, rd.adapter, cfg.model.name_or_path, cfg.model.task, "run")
    if present(p):
        rec = _record(p) or {}
        a = AdapterFile(p)
        return _entry(p.name, p, rec.get("base") or a.base_model, rec.get("task") or _task_of(a),
                      rec.get("origin", "folder"))
    if is_run_id(ref):
        for e in entries(root):
            if e.name == ref:
                return e
    known = ", ".join(e.name for e in entries(root)[:8]) or "none yet"
    raise AdapterError(f"{ref}: not a run folder, an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}) or a "
                       f"library name; known adapters: {known}")


def same_base(a: Entry, b: Entry) -> bool:
    """Whether two adapters were trained on the same model (names resolved to their folders)."""
    return _base_key(a.base) == _base_key(b.base)


def _base_key(ref: str | None) -> str | None:
    if ref is None:
        return None
    from studio.models.registry import model_dir

    try:
        return str(Path(model_dir(ref)).resolve())
    except Exception:  # a base that is gone or a Hub id offline: compare the names as written
        return str(ref)


# --- import ---------------------------------------------------------------------------------

def import_adapter(src: str | os.PathLike, name: str | None = None, root=None, base: str | None = None) -> Entry:
    """Check a PEFT adapter folder or zip and keep a copy in the library; returns its entry."""
    src = Path(src)
    if not src.exists():
        raise AdapterError(f"{src}: no such file or folder")
    name = name or src.stem
    if not is_run_id(name):
        raise AdapterError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    lib = library_dir(root)
    dest = lib / name
    if dest.exists():
        raise AdapterError(f"{dest} already exists; pick another --name")
    lib.mkdir(parents=True, exist_ok=True)
    tmp = lib / f".{name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unpack(src, tmp)
        a = AdapterFile(tmp)
        a.check_mergeable()
        base = base or a.base_model
        if not base:
            raise AdapterError(f"{src}: {CONFIG_NAME} names no base_model_name_or_path; pass --base MODEL")
        _check_shapes(a, base, src)
        manager.write_json_atomic(tmp / IMPORT, {"source": str(src.resolve()), "base": base, "task": _task_of(a),
                                                 "imported_at": time.time()})
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _entry(name, dest, base, _task_of(AdapterFile(dest)), "imported")


def _unpack(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    if src.is_dir():
        members = [p for p in src.rglob("*") if p.is_file()]
        for p in members:
            _check_member(p.relative_to(src).as_posix(), src)
        for p in members:
            shutil.copy2(p, dest / p.name)
        return
    if not zipfile.is_zipfile(src):
        raise AdapterError(f"{src}: neither a folder nor a zip file")
    with zipfile.ZipFile(src) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        for n in names:
            _check_member(n, src)
        for n in names:
            with z.open(n) as f, open(dest / Path(n).name, "wb") as out:
                shutil.copyfileobj(f, out)
    if not (dest / CONFIG_NAME).is_file():
        raise AdapterError(f"{src}: holds no {CONFIG_NAME} at its top level")


def _check_member(name: str, src: Path) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise AdapterError(f"{src}: member {name!r} points outside the adapter folder; refused")
    if len(parts) > 2:
        raise AdapterError(f"{src}: member {name!r} is nested; an adapter is one flat folder")
    if not name.endswith(ALLOWED_SUFFIXES):
        what = "a pickle (it can run code when loaded)" if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) \
            else "not a file an adapter holds"
        raise AdapterError(f"{src}: member {name!r} is {what}; only safetensors weights and JSON/text files are kept")


def _check_shapes(a: AdapterFile, base: str, src: Path) -> None:
    """Every adapted module exists in the base and A/B fit its in/out features."""
    if a.unknown:
        raise AdapterError(f"{src}: tensor {a.unknown[0]} is not a LoRA factor PEFT writes")
    from studio.models.tree import model_tree

    tree = model_tree(base, _task_of(a) or None)
    by_path = tree.by_path
    for path, m in a.modules.items():
        info = by_path.get(path)
        if info is None:
            raise AdapterError(f"{src}: adapts {path}, which {base} does not have; is it an adapter for another model?")
        r, n_in = a.shapes[m.a_key][0], a.shapes[m.a_key][-1]
        n_out = a.shapes[m.b_key][0]
        if not m.embedding and (info.in_features, info.out_features) not in ((n_in, n_out), (n_out, n_in)):
            raise AdapterError(f"{src}: {path} is {info.in_features} -> {info.out_features} in {base}, but the adapter's "
                               f"A is {r} x {n_in} and B {n_out} x {r}; it belongs to another model")
