"""Export a run to GGUF, the file llama.cpp, Ollama and LM Studio run, merged or as a LoRA file.

The format itself is gguf-py's (the library llama.cpp's converter uses): `GGUFWriter` writes
the header and metadata, `TensorNameMap` gives llama.cpp's tensor names, `gguf.quants` packs
Q8_0/Q5/Q4 blocks. What the studio adds is streaming: llama.cpp's convert_hf_to_gguf.py loads
each tensor lazily but still needs the merged model on disk first, while here every tensor is
declared from the safetensors headers (so the GGUF header goes first), then read, merged by
the same code as `studio merge` (studio.export.merge), permuted or transposed the way
llama.cpp expects, packed and appended, one at a time. So a model is never in memory whole,
and no merged folder is written on the way.

Per architecture (the table is in studio/export/gguf_arch.py; llama.cpp's convert_hf_to_gguf.py is the reference):
- Llama / Mistral: q_proj and k_proj rows are permuted from Hugging Face's rotate-half layout
  to llama.cpp's interleaved one; `vocab_size` and `rope.dimension_count` are written.
- Qwen2 / Qwen3: no permutation (NeoX rope); Qwen3's q/k norms map to attn_q_norm/attn_k_norm.
- GPT-2: Conv1D weights are stored (in, out) and written transposed.

The file is written under a hidden temporary name in the output folder, read back by an
independent reader (studio.export.gguf_verify) and renamed into place only when that passes,
so a failed, refused or interrupted export leaves nothing that looks like a model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from studio.errors import ExportError, MergeError
from studio.export.gguf_arch import (_BY_MODEL_TYPE, _CONV1D, _MODEL_ARCH, _SKIP_SUFFIXES, ARCHS, _add_hparams,
                                     _check_rope, _permuter)
from studio.export.gguf_vocab import Vocab, modelfile, read_vocab, write_vocab
from studio.export.merge import _compute, _Scratch  # the merge itself: one implementation
from studio.export.plan import Entry, Plan, make_plan
from studio.export.zips import TOKENIZER_FILES

Progress = Callable[[int, int, str], None]

# Quant types gguf-py can pack itself (gguf.quants has a quantize for them). The K-quants and
# I-quants have only a dequantize there: packing them needs llama.cpp's llama-quantize (and,
# for the I-quants, an importance matrix), so they are left to that tool.
QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f32")
ADAPTER_QUANTS = ("f16", "bf16", "q8_0", "f32")  # what llama.cpp's convert_lora_to_gguf.py writes
MODELFILE = "Modelfile"


@dataclass
class GgufReport:
    out: str
    """The written .gguf file."""
    quant: str
    """Requested quant type; 1-D tensors (norms, biases) are always f32."""
    bytes: int
    """Size of the file."""
    seconds: float
    """Wall time of the conversion (verification not included)."""
    peak_rss_mb: float
    """Highest resident memory of this process while converting (sampled once a tensor)."""
    verify: dict
    """The independent reader's check (see studio.export.gguf_verify)."""
    architecture: str
    tensors: int
    adapter_only: bool = False
    fallback_f16: list[str] = field(default_factory=list)
    """Tensors written as f16 because their rows are not a whole number of quant blocks."""
    modelfile: str | None = None
    """With --ollama: the Modelfile written beside the GGUF."""
    commands: list[str] = field(default_factory=list)
    """With --ollama: the commands that create and run the model."""
    verify_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def export_run(run_dir, out=None, *, quant: str = "f16", ollama: bool = False, adapter_only: bool = False,
               progress: Progress | None = None) -> GgufReport:
    """Export a run's final adapter with its base model; default out RUN_DIR/exports/<run>-<quant>.gguf."""
    from studio.adapters import file as adapter_file
    from studio.config import load_config
    from studio.models.registry import model_dir
    from studio.runs.rundir import RunDir

    rd = RunDir(run_dir)
    cfg = load_config(rd.config)
    if not adapter_file.present(rd.adapter):
        state = rd.status().get("state", "unknown")
        raise ExportError(f"{rd.path} has no final adapter yet (adapter/{adapter_file.CONFIG_NAME} missing; run state: "
                          f"{state}); export a run after it completed or was stopped")
    if out is None:
        rd.exports.mkdir(exist_ok=True)
        out = rd.exports / f"{rd.id}-{'lora-' if adapter_only else ''}{quant}.gguf"
    base = model_dir(cfg.model.name_or_path, trust_remote_code=False)
    return export_gguf(base, rd.adapter, out, quant=quant, ollama=ollama, adapter_only=adapter_only,
                       progress=progress, name=rd.id)


def export_gguf(base_dir, adapter_dir, out, *, quant: str = "f16", ollama: bool = False,
                adapter_only: bool = False, progress: Progress | None = None, name: str | None = None,
                verify: bool = True) -> GgufReport:
    """Merge the PEFT LoRA adapter into the base and write one GGUF file (or, with `adapter_only`,
    the adapter as a llama.cpp LoRA GGUF), then verify it with an independent reader.

    `verify=False` exists for the benchmark that measures the conversion alone; every export a
    person asks for (CLI, UI) is verified."""
    t0 = time.perf_counter()
    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    allowed = ADAPTER_QUANTS if adapter_only else QUANTS
    if quant not in allowed:
        raise ExportError(f"quant type {quant!r} is not one of: {', '.join(allowed)}"
                          + (" (a LoRA GGUF)" if adapter_only else ""))
    if ollama and adapter_only:
        raise ExportError("--ollama needs a merged model; an Ollama Modelfile can take a LoRA GGUF only with its base GGUF")
    _check_out(out)
    cfg = _read_config(base_dir)
    arch_cls = (cfg.get("architectures") or [_BY_MODEL_TYPE.get(cfg.get("model_type"), f"model_type {cfg.get('model_type')!r}")])[0]
    if arch_cls not in ARCHS:
        raise ExportError(f"{base_dir}: architecture {arch_cls} cannot be exported to GGUF; supported: {', '.join(ARCHS)}")
    arch, permute_qk, conv1d = ARCHS[arch_cls]
    _check_rope(cfg, base_dir)
    try:
        plan = make_plan(base_dir, adapter_dir)
    except MergeError as e:
        raise ExportError(str(e)) from None
    if plan.task_type not in (None, "CAUSAL_LM"):
        raise ExportError(f"{adapter_dir}: task_type {plan.task_type} cannot be exported to GGUF; "
                          "llama.cpp runs causal language models (task_type CAUSAL_LM)")
    tok = _tokenizer(plan)
    vocab = read_vocab(tok, int(cfg.get("vocab_size") or len(tok)))
    tensors = _tensor_specs(plan, cfg, arch, permute_qk, conv1d, quant, adapter_only)

    # ends in .gguf: transformers' reader takes the file by name
    tmp = out.parent / f".{out.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf"
    _remove_stale_partials(out)
    import gguf

    writer = _Writer(tmp, arch)
    try:
        writer.add_name(name or base_dir.name)
        writer.add_file_type(int(_FILE_TYPES(gguf)[quant]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if adapter_only:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(_adapter_config(adapter_dir)["lora_alpha"]))
        else:
            writer.add_type(gguf.GGUFType.MODEL)
            _add_hparams(writer, arch, cfg, len(vocab.tokens))
            write_vocab(writer, vocab)
        for t in tensors:
            writer.add_tensor_info(t.gname, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        peak = _write_tensors(writer, plan, tensors, cfg, adapter_only, progress)
        writer.close()
        seconds = time.perf_counter() - t0
        report = GgufReport(out=str(out), quant=quant, bytes=tmp.stat().st_size, seconds=round(seconds, 3),
                            peak_rss_mb=round(peak / 2**20, 1), verify={}, architecture=arch, tensors=len(tensors),
                            adapter_only=adapter_only,
                            fallback_f16=[t.gname for t in tensors if t.fallback])
        if progress and verify:
            progress(len(tensors), len(tensors), "verifying with an independent reader")
        from studio.export import gguf_verify

        t1 = time.perf_counter()
        if not verify:
            report.verify = {"tokenizer_ok": None, "agreement": None, "max_abs_logit_diff": None, "reader": None}
        elif adapter_only:
            report.verify = gguf_verify.verify_adapter(tmp, plan, [(t.gname, t.entry) for t in tensors],
                                                       _permuter(cfg))
        else:
            report.verify = gguf_verify.verify_model(tmp, plan, tok, quant)
        report.verify_seconds = round(time.perf_counter() - t1, 3) if verify else None
        os.replace(tmp, out)
    except OSError as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"no space left on the device of {out.parent} while writing {out.name}; "
                              "nothing was written (free space or pick another --out)") from None
        raise
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if ollama:
        report.modelfile, report.commands = _write_modelfile(out, vocab, name)
    return report


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """GGUFWriter that can write an empty typed array (GGUF allows one; gguf-py's packer refuses it)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)
    return Writer


def _Writer(path: Path, arch: str):
    return _writer_class()(path, arch)


# --- what gets written ------------------------------------------------------------------------

@dataclass
class _Tensor:
    gname: str            # llama.cpp's name
    entry: Entry
    shape: tuple          # torch order (rows, cols)
    qtype: object         # gguf.GGMLQuantizationType
    nbytes: int
    kind: str             # weight | transpose | permute_q | permute_k | lora_a | lora_b
    fallback: bool = False


def _tensor_specs(plan: Plan, cfg: dict, arch: str, permute_qk: bool, conv1d: bool, quant: str,
                  adapter_only: bool) -> list[_Tensor]:
    import gguf

    n_layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    names = gguf.get_tensor_name_map(_MODEL_ARCH(gguf)[arch], n_layers)
    out: list[_Tensor] = []
    for e in plan.entries:
        if e.name.endswith(_SKIP_SUFFIXES):
            continue
        gname = names.get_name(e.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"tensor {e.name} of the base has no llama.cpp name for architecture {arch}; "
                              "this checkpoint is not one the GGUF exporter knows")
        kind = "weight"
        if conv1d and e.name.endswith(_CONV1D):
            kind = "transpose"
        elif permute_qk and e.name.endswith(".self_attn.q_proj.weight"):
            kind = "permute_q"
        elif permute_qk and e.name.endswith(".self_attn.k_proj.weight"):
            kind = "permute_k"
        if adapter_only:
            out += _lora_specs(e, gname, kind, plan, quant)
            continue
        shape = tuple(e.shape[::-1]) if kind == "transpose" else tuple(e.shape)
        out.append(_spec(gname, e, shape, kind, quant))
    if adapter_only and not out:
        raise ExportError(f"{plan.adapter_dir} has no LoRA update on a tensor llama.cpp names; nothing to export")
    return out


def _lora_specs(e: Entry, gname: str, kind: str, plan: Plan, quant: str) -> list[_Tensor]:
    if e.replace is not None:
        raise ExportError(f"the adapter replaces {e.name} whole (modules_to_save); a llama.cpp LoRA file cannot "
                          "carry that: export the merged model instead")
    if e.bias_lora is not None:
        raise ExportError(f"the adapter trains a lora_B bias on {e.name}; llama.cpp LoRA files have no bias: export merged")
    u = e.lora
    if u is None:
        return []
    if u.magnitude_key or u.kind == "embedding":
        what = "DoRA" if u.magnitude_key else "LoRA on embeddings"
        raise ExportError(f"{e.name}: {what} cannot be written as a llama.cpp LoRA file; export the merged model instead")
    rows, cols = (e.shape[1], e.shape[0]) if kind == "transpose" else e.shape
    return [_spec(gname + ".lora_a", e, (u.r, cols), "lora_a", quant),
            _spec(gname + ".lora_b", e, (rows, u.r), "lora_b:" + kind, quant)]


def _spec(gname: str, e: Entry, shape: tuple, kind: str, quant: str) -> _Tensor:
    import gguf

    Q = gguf.GGMLQuantizationType
    table = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0,
             "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}
    fallback = False
    if len(shape) == 1 or not e.dtype.is_floating_point:
        q = Q.F32  # norms and biases: llama.cpp keeps them f32 whatever the file type
    else:
        q = table[quant]
        if quant.startswith(("q4", "q5")) and gname in ("token_embd.weight", "output.weight"):
            q = Q.Q8_0  # as llama-quantize does, the vocabulary matrices keep more bits
        block = gguf.GGML_QUANT_SIZES[q][0]
        if shape[-1] % block:
            q, fallback = Q.F16, True
    nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, q)) if q not in (Q.F32, Q.F16, Q.BF16) \
        else math.prod(shape) * (4 if q == Q.F32 else 2)
    return _Tensor(gname, e, tuple(shape), q, nbytes, kind, fallback)


def _write_tensors(writer, plan: Plan, tensors: list[_Tensor], cfg: dict, adapter_only: bool,
                   progress: Progress | None) -> int:
    proc = psutil.Process()
    peak = proc.memory_info().rss
    scratch = _Scratch()
    permute = _permuter(cfg)
    for i, t in enumerate(tensors):
        if adapter_only:
            w = _lora_factor(t, plan, permute)
        else:
            try:
                w, _ = _compute(t.entry, plan, torch.float32, scratch)
            except MergeError as err:
                raise ExportError(str(err)) from None
            if t.kind == "transpose":
                w = w.T.contiguous()
            elif t.kind.startswith("permute"):
                w = permute(w, t.kind)
        data = _encode(w, t)
        writer.write_tensor_data(data)
        peak = max(peak, proc.memory_info().rss)
        del w, data
        if progress:
            progress(i + 1, len(tensors), f"{t.gname} ({t.qtype.name})")
    return peak


def _lora_factor(t: _Tensor, plan: Plan, permute) -> torch.Tensor:
    """A or B of one update, for llama.cpp's LoRA loader, which scales by adapter.lora.alpha / r."""
    from studio.models import shards

    u = t.entry.lora
    if t.kind == "lora_a":
        return shards.read_tensor(plan.adapter_file, u.a_key).to(torch.float32)
    b = shards.read_tensor(plan.adapter_file, u.b_key).to(torch.float32)
    # rsLoRA and alpha_pattern give a module a scaling other than alpha / r: fold the difference into B.
    alpha = float(_adapter_config(plan.adapter_dir)["lora_alpha"])
    b = b * (u.scaling / (alpha / u.r))
    kind = t.kind.split(":", 1)[1]
    # Rows of B are the weight's output rows, so the q/k permutation acts on B alone.
    return permute(b, kind) if kind.startswith("permute") else b


def _encode(w: torch.Tensor, t: _Tensor) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if tuple(w.shape) != t.shape:
        raise ExportError(f"{t.gname}: computed shape {tuple(w.shape)} differs from the declared {t.shape}")
    if t.qtype == Q.F32:
        return w.to(torch.float32).contiguous().numpy()
    if t.qtype == Q.F16:
        lo, hi = torch.aminmax(w)
        if max(abs(float(lo)), abs(float(hi))) > 65504:
            raise ExportError(f"{t.gname}: values overflow float16 (max |x| = {max(abs(float(lo)), abs(float(hi))):.4g}); "
                              "export with --quant bf16 or f32 instead")
        return w.to(torch.float16).numpy()
    if t.qtype == Q.BF16:
        return w.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(w.to(torch.float32).contiguous().numpy(), t.qtype)


# --- metadata -----------------------------------------------------------------------------------

def _FILE_TYPES(gguf) -> dict:
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q5_1": F.MOSTLY_Q5_1, "q5_0": F.MOSTLY_Q5_0, "q4_1": F.MOSTLY_Q4_1, "q4_0": F.MOSTLY_Q4_0}


# --- inputs and outputs ---------------------------------------------------------------------

def _tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    from studio.export.verify import quiet

    # The run's tokenizer wins (training may have added a pad token), as in merge.
    src = plan.adapter_dir if any((plan.adapter_dir / f).is_file() for f in TOKENIZER_FILES) else plan.base_dir
    try:
        with quiet():
            return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ExportError(f"{src}: no tokenizer the GGUF can carry ({e}); a GGUF needs the model's tokenizer") from None


def _read_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"base model config {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def _adapter_config(adapter_dir: Path) -> dict:
    from studio.adapters.file import AdapterFile

    return AdapterFile(adapter_dir, error=ExportError).config


def _check_out(out: Path) -> None:
    if out.suffix.lower() != ".gguf":
        raise ExportError(f"output {out} must be a .gguf file name")
    if not out.parent.is_dir():
        raise ExportError(f"output folder {out.parent} does not exist; create it or pick another --out")
    if out.is_dir():
        raise ExportError(f"output {out} is a folder; give a file name ending in .gguf")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"output folder {out.parent} is not writable")


def _remove_stale_partials(out: Path) -> None:
    # Left by an export that was killed (a crash cannot run cleanup); the pid in the name says whose.
    for p in out.parent.glob(f".{out.stem}.partial-*.gguf"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            p.unlink(missing_ok=True)


def _write_modelfile(out: Path, vocab: Vocab, name: str | None) -> tuple[str, list[str]]:
    path = out.parent / MODELFILE
    tmp = path.with_name(f".{MODELFILE}.partial-{os.getpid()}")
    tmp.write_text(modelfile(out.name, vocab), encoding="utf-8")
    os.replace(tmp, path)
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in (name or out.stem).lower())
    return str(path), [f"ollama create {tag} -f {path}", f"ollama run {tag}"]
