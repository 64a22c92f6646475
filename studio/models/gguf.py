"""GGUF files as model references: checked, then dequantized once into a safetensors folder.

A `.gguf` file (llama.cpp's format, usually quantized) cannot be trained or merged as it is:
LoRA needs float weights. So the first use converts it into an ordinary transformers model
folder (config.json, model.safetensors in float32, tokenizer files with the chat template),
and every later use, in any process, loads that folder.

What is the library's and what is the studio's:
- Reading and dequantizing is transformers' GGUF loader (`from_pretrained(gguf_file=...)`
  with `GgufConfig(dequantize=True)`), and the tokenizer is rebuilt by transformers from the
  file's vocabulary. So the folder's weights equal exactly what transformers' own gguf_file=
  load gives.
- transformers marks such a model as quantized and refuses `save_pretrained`, so the studio
  writes the state dict itself with `shards.ShardWriter` (one tensor at a time, no second
  copy of the model in memory), and the config without its `quantization_config`.
- The checks before anything is written are the studio's: a file that is not a GGUF, is
  truncated, holds no tensors, or has an architecture the loader cannot read is refused in
  one line naming the file (and the supported architectures), with nothing left in the cache.
  They read the header with a small struct scan (`_scan`, with gguf-py's format constants),
  fast enough to run whenever a reference is resolved.

Cache key: the file's size and the SHA-256 of its whole content, read in 1 MiB chunks (about
half a second per 100 MB), so a renamed or copied file reuses its conversion and an edited
one does not. The hash is remembered per process by (path, size, mtime, inode).

Atomicity: the folder is written under a hidden temporary name beside its final name and
renamed when complete, so an interrupted conversion never leaves a folder that looks usable;
temporary folders of processes that no longer run are removed by the next conversion.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import ModelRefError
from studio.models import shards

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
# Bump when the conversion recipe changes, so folders made by an older one are rebuilt.
CONVERSION_VERSION = 1
SOURCE_NAME = "gguf_source.json"  # what the folder was converted from, for people and for checks
HASH_CHUNK = 2**20

# progress(fraction in [0, 1], message): the UI shows a bar, the CLI a line on stderr.
Progress = Callable[[float, str], None]
_reporter: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("gguf_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Send the progress of any conversion started inside this block to `progress`.

    Conversions start deep inside model loading (a tree, a count, a preflight), so the surface
    that wants a progress bar sets it once around the call instead of threading it through.
    """
    token = _reporter.set(progress)
    try:
        yield
    finally:
        _reporter.reset(token)


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    log.info("%3.0f%% %s", fraction * 100, message)
    cb = progress or _reporter.get()
    if cb is not None:
        cb(min(max(fraction, 0.0), 1.0), message)


# --- checks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str
    tensor_count: int
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    size: int
    data_end: int  # where the last tensor's bytes end; at most `size` in a whole file


def check_header(path: Path) -> None:
    """Refuse a file that is not a GGUF at all, from its first 8 bytes (cheap: used by resolve)."""
    path = Path(path)
    if not path.is_file():
        raise ModelRefError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != MAGIC:
        raise ModelRefError(f"{path}: not a GGUF file (it starts with {head[:4]!r}; a GGUF file starts with "
                            f"{MAGIC!r}); pass a .gguf model file, or a folder with config.json and *.safetensors")
    if len(head) < 8 or struct.unpack("<I", head[4:8])[0] not in (2, 3):
        version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else None
        raise ModelRefError(f"{path}: GGUF version {version} is not readable (versions 2 and 3 are)")


def supported_architectures() -> list[str]:
    """GGUF architectures transformers' loader reads (its legacy table and its newer path)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    # The legacy table's keys include two that are metadata sections, not architectures.
    return sorted(names - {"general", "tokenizer"})


# GGUF spells a few architectures differently from transformers' table (the loader maps them).
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "t5encoder": "t5", "gpt-oss": "gpt_oss",
                 "minimax-m2": "minimax_m2"}


def is_supported(architecture: str) -> bool:
    known = supported_architectures()
    return not known or architecture in known or _ARCH_ALIASES.get(architecture, architecture) in known


_INFOS: dict[tuple, GGUFInfo] = {}


def inspect(path: Path) -> GGUFInfo:
    """Scan the header and tensor table; refuse damaged, truncated, empty or unsupported files.

    Remembered per (path, size, mtime), so resolving the same file again costs a stat.
    """
    path = Path(path)
    check_header(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _INFOS:
        info = _scan(path, st.st_size)
        if not is_supported(info.architecture):
            import transformers

            raise ModelRefError(f"{path}: GGUF architecture {info.architecture!r} is not supported by transformers "
                                f"{transformers.__version__}'s GGUF loader; supported: "
                                f"{', '.join(supported_architectures())}")
        _INFOS[memo] = info
    return _INFOS[memo]


def _scan(path: Path, size: int) -> GGUFInfo:
    """The header facts, read with struct from a memory map.

    gguf-py's GGUFReader builds a numpy view of every element of every metadata array: on a
    file with a 49k-token vocabulary that is about 10 s on a busy 2-core machine, for facts
    this reads in a fraction of a second (the vocabulary's strings are skipped, not parsed).
    The format's constants (value types, block sizes) are gguf-py's.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

    fixed = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.BOOL: "?",
             GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I",
             GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q",
             GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize("<" + fmt)
            if pos + n > size:
                raise EOFError(f"the header ends at byte {size:,}")
            out = struct.unpack_from("<" + fmt, m, pos)
            pos += n
            return out[0] if len(out) == 1 else out

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > size:
                raise EOFError(f"a {n:,}-byte string runs past the end ({size:,} bytes)")
            pos += n
            return m[pos - n:pos].decode("utf-8", errors="replace")

        def value(vtype: int):
            nonlocal pos
            vtype = GGUFValueType(vtype)
            if vtype == GGUFValueType.STRING:
                return string()
            if vtype == GGUFValueType.ARRAY:
                item, count = take("I"), take("Q")
                if GGUFValueType(item) in fixed:  # skipped in one step: only its length matters here
                    pos += count * struct.calcsize("<" + fixed[GGUFValueType(item)])
                    if pos > size:
                        raise EOFError(f"an array of {count:,} items runs past the end ({size:,} bytes)")
                    return None
                for _ in range(count):
                    value(item)
                return None
            return take(fixed[vtype])

        try:
            _, _, n_tensors, n_kv = take("4s"), take("I"), take("Q"), take("Q")
            meta = {}
            for _ in range(n_kv):
                key = string()
                meta[key] = value(take("I"))
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("Q") for _ in range(take("I"))]
                tensors.append((name, dims, GGMLQuantizationType(take("I")), take("Q")))
        except (EOFError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelRefError(f"{path}: damaged or truncated GGUF file ({e})") from None
        alignment = meta.get("general.alignment") or GGUF_DEFAULT_ALIGNMENT
        data_start = pos + (-pos % alignment)
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ModelRefError(f"{path}: GGUF file without general.architecture: not a model file")
    if not tensors:
        raise ModelRefError(f"{path}: GGUF file with no tensors (a vocabulary or metadata file?): not a model")
    end, types = data_start, {}
    for _name, dims, ttype, offset in tensors:
        if ttype not in GGML_QUANT_SIZES:
            raise ModelRefError(f"{path}: tensor {_name} has ggml type {ttype.name}, which gguf-py cannot size")
        block, type_size = GGML_QUANT_SIZES[ttype]
        end = max(end, data_start + offset + math.prod(dims) // block * type_size)
        types[ttype.name] = types.get(ttype.name, 0) + 1
    if end > size:
        raise ModelRefError(f"{path}: truncated GGUF file: its {len(tensors)} tensors need {end:,} bytes, "
                            f"the file has {size:,}; download or copy it again")
    return GGUFInfo(path, architecture, str(meta.get("general.name") or ""), len(tensors), types, size, end)


# --- cache -------------------------------------------------------------------------------

_HASHES: dict[tuple, str] = {}


def content_key(path: Path) -> str:
    """`<first 20 hex digits of sha256>-<size>`: the name of the file's converted folder."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        _HASHES[memo] = f"{h.hexdigest()[:20]}-{st.st_size}"
    return _HASHES[memo]


def folder_name(path: Path) -> str:
    return f"{content_key(path)}-v{CONVERSION_VERSION}"


def is_converted(folder: Path) -> bool:
    # Complete folders only ever appear by rename, so the marker written last is enough.
    return (Path(folder) / SOURCE_NAME).is_file() and (Path(folder) / shards.SINGLE_NAME).is_file()


def ensure_converted(path: Path, folder: Path, progress: Progress | None = None) -> Path:
    """`folder` holding the converted model of GGUF `path`; converts it the first time only."""
    folder = Path(folder)
    if is_converted(folder):
        return folder
    convert(path, folder, progress)
    return folder


def _remove_stale_temporaries(folder: Path) -> None:
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still converting: leave it
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


# --- conversion --------------------------------------------------------------------------

def convert(path: Path, folder: Path, progress: Progress | None = None) -> dict:
    """Dequantize GGUF `path` into the model folder `folder` (float32 safetensors, config, tokenizer).

    Returns what it did: tensors, bytes, seconds. Bad files are refused before the folder's
    parent is even created; a failure part-way leaves nothing behind.
    """
    t0 = time.perf_counter()
    path = Path(path)
    _report(progress, 0.0, f"checking {path.name}")
    info = inspect(path)
    key = content_key(path)
    types = ", ".join(f"{n} {k}" for k, n in sorted(info.tensor_types.items()))
    _report(progress, 0.05, f"reading and dequantizing {info.tensor_count} tensors ({types}) of {path.name}")
    model = _load_dequantized(path, info)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n_tensors, n_bytes = _write_weights(model, tmp, path, progress)
        model.config.architectures = [type(model).__name__]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the folder's weights are plain float32
        model.config.dtype = "float32"
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        del model
        gc.collect()  # the model's memory goes back before the tokenizer is built
        _report(progress, 0.9, "rebuilding the tokenizer from the file's vocabulary")
        tokenizer = _load_tokenizer(path)
        tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - t0
        import transformers

        source = {"file": str(path.resolve()), "size": info.size, "sha256_prefix": key.split("-")[0],
                  "architecture": info.architecture, "name": info.name, "tensor_types": info.tensor_types,
                  "dtype": "float32", "tensors": n_tensors, "bytes": n_bytes, "seconds": round(seconds, 1),
                  "transformers": transformers.__version__, "conversion_version": CONVERSION_VERSION}
        (tmp / SOURCE_NAME).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first; its copy is the same
            if not is_converted(folder):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(progress, 1.0, f"converted {path.name} in {seconds:.0f} s ({n_bytes / 2**20:.0f} MiB float32)")
    return {"folder": str(folder), "tensors": n_tensors, "bytes": n_bytes, "seconds": seconds}


def _load_dequantized(path: Path, info: GGUFInfo):
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        # transformers' refusals (an architecture or tensor type it cannot map) end up here.
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelRefError(f"{path}: transformers cannot load this GGUF ({info.architecture}) as a causal LM: "
                            f"{first}") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelRefError(f"{path}: transformers cannot rebuild the tokenizer of this GGUF: {first}") from None


def _write_weights(model, folder: Path, path: Path, progress: Progress | None) -> tuple[int, int]:
    state = model.state_dict()
    # Tied weights (lm_head = embed_tokens) are one tensor under two names: keep the first
    # name only, as save_pretrained does; loading the folder ties them again from the config.
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ptr in seen:
            continue
        seen.add(ptr)
        unique[name] = t
    writer = shards.ShardWriter(folder / shards.SINGLE_NAME, {n: (t.dtype, tuple(t.shape)) for n, t in unique.items()},
                                metadata={"format": "pt"})
    n_bytes = 0
    try:
        for i, name in enumerate(writer.order, 1):
            t = unique[name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelRefError(f"{path}: tensor {name} holds NaN or infinite values after dequantizing; "
                                    "the file is damaged")
            writer.write(name, t)
            n_bytes += t.numel() * t.element_size()
            if i % 16 == 0 or i == len(writer.order):
                _report(progress, 0.75 + 0.15 * i / len(writer.order), f"writing weights {i}/{len(writer.order)}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return len(unique), n_bytes


def dequantized_bytes(folder: Path) -> int:
    """Bytes of the converted folder's weights (the benchmark's yardstick)."""
    files = shards.checkpoint_files(Path(folder))
    return sum(math.prod(i.shape) * i.torch_dtype.itemsize for i in shards.list_tensors(files).values())
