"""Safetensors checkpoints read and written one tensor at a time.

The merge must run on machines that cannot hold the model, so nothing here keeps more than
one tensor in memory. Reading opens the file once per tensor: `safe_open` maps the whole
file, and every page a tensor touches stays resident (and counts in RSS) until the file is
closed, so a handle kept open for a shard costs the whole shard by its end. Writing streams:
the safetensors format is an 8-byte header length, a JSON header with every tensor's dtype,
shape and byte range, then the raw bytes. All shapes are known before the first byte is
written, so the header goes first and each tensor is appended the moment it is computed;
`safetensors.torch.save_file` would need every tensor of a shard in memory at once.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# The format's dtype names (safetensors' own table; kept here because it is private there).
DTYPE_NAMES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
NAME_OF_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight files in torch's pickle format: never loaded, since unpickling can run any code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str      # the format's name, e.g. "BF16"
    shape: tuple

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {self.name} in {self.file.name} has dtype {self.dtype}, which this reader does not know")
        return DTYPE_NAMES[self.dtype]


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of a saved model, in index order; [] when it has none."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index} lists shard {missing[0]}, which is not in {folder}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    return []


def pickled_files(folder: Path) -> list[str]:
    """Names of the pickled weight files in `folder` (for messages that refuse them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES)


def list_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards, from the headers only (no tensor data is read)."""
    out: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    if name in out:
                        raise ValueError(f"tensor {name} is in both {out[name].file.name} and {path.name}")
                    s = f.get_slice(name)
                    out[name] = TensorInfo(name, path, s.get_dtype(), tuple(s.get_shape()))
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, with the file's mapping released as soon as the tensor is freed."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


class ShardWriter:
    """Writes one safetensors file whose tensors (name -> (dtype, shape)) are declared up front.

    Tensors must then be written in `order` (largest item size first, so every tensor starts
    on an aligned offset the way safetensors' own writer arranges them); each one is checked
    against its declaration. `close()` fails if any declared tensor was not written.
    """

    def __init__(self, path: Path, declared: dict[str, tuple[torch.dtype, tuple]], metadata: dict | None = None):
        self.path = path
        self.order = sorted(declared, key=lambda n: -torch.empty(0, dtype=declared[n][0]).element_size())
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._sizes = {}
        for name in self.order:
            dtype, shape = declared[name]
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": NAME_OF_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes[name] = (dtype, tuple(shape), nbytes)
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path.name}: wrote {name} out of order, expected {want}")
        dtype, shape, nbytes = self._sizes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                               f"declared {dtype} {shape}")
        if nbytes:
            # A byte view of the tensor's own memory: no copy, whatever the dtype (numpy has no bf16).
            self._f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"{self.path.name}: {len(self.order) - self._next} declared tensors were not written, "
                                   f"first {self.order[self._next]}")
            # No fsync: the merge's atomicity comes from renaming the finished folder, and
            # forcing gigabytes to disk here would only add its write-back time to the merge.
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()


def shard_names(n: int) -> list[str]:
    """transformers' own file names, so tools that guess names instead of reading the index work too."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
