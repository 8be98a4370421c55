"""A lean GGUF reader: metadata as a dict, tensors as zero-copy views of a memory map.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array (49,152
tokens and 48,900 merges for SmolLM2), which costs seconds and ~180 MB on the device we
care about. This reads the same format directly:

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type u32, value)
    n_tensors x (name: string, n_dims u32, dims u64 x n_dims (fastest first), type u32,
                 offset u64)
    padding to `general.alignment` (default 32), then the tensor data

with strings as (length u64, UTF-8 bytes) and arrays as (item type u32, count u64,
items), all little-endian (the GGUF spec in ggml's `docs/gguf.md`). Tensor data is
returned as uint8 rows (rows, bytes per row), the form `gguf.quants.dequantize` takes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import CheckpointError

__all__ = ["GGUFFile", "GGUFTensor", "read_gguf"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: int  # ggml type id (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # numpy order (slowest first): token_embd is (vocab, dim)
    data: np.ndarray  # uint8 (rows, bytes per row), read-only view of the file


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buf: mmap.mmap, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"{self.where} ends inside its header; the file is truncated")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.where} ends inside its header; the file is truncated")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _ARRAY_DTYPES:  # numbers: one vectorised read
                dt = np.dtype(_ARRAY_DTYPES[item_type])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise CheckpointError(f"{self.where}: metadata array runs past the end")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise CheckpointError(f"{self.where}: unknown GGUF value type {vtype}; corrupt file?")


def _block(tensor_type: int, name: str, where: str) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{where}: tensor {name} has unknown ggml type {tensor_type}") from None


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; tensor data stays in the (read-only) memory map.

    Raises:
        CheckpointError: not a GGUF file, unsupported version, or truncated/corrupt.
    """
    where = str(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {where}: {e}") from None
    cur = _Cursor(buf, where)
    if len(buf) < 4 or buf[:4] != b"GGUF":
        raise CheckpointError(f"{where} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{where}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, ttype, offset in infos:
        block, block_bytes = _block(ttype, name, where)
        shape = tuple(int(d) for d in reversed(dims)) or (1,)
        cols = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if cols % block:
            raise CheckpointError(f"{where}: tensor {name} row of {cols} is not whole blocks")
        row_bytes = cols // block * block_bytes
        start = data_start + offset
        if start + rows * row_bytes > len(buf):
            raise CheckpointError(f"{where}: tensor {name} runs past the end; file truncated")
        data = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=start)
        tensors.append(GGUFTensor(name, ttype, shape, data.reshape(rows, row_bytes)))
    return GGUFFile(where, version, metadata, tensors)
