"""Adapter <-> bytes for the wire: safetensors with a JSON metadata header, optional fp16/int8.

Tensor names are `{module}.lora_a` (rank, d_in) and `{module}.lora_b` (d_out, rank).
With int8 compression each factor is stored as `{name}.q` (int8) plus `{name}.scale`
(float32, one per rank component: per row of lora_a, per column of lora_b; symmetric,
q = round(x / scale), scale = max|x| / 127 over that row or column).
The safetensors header `__metadata__` holds one key, `edge_rt`, a JSON string with
`alphas` ({module: alpha}), `compression` and the caller's metadata.

Decoding never trusts the bytes: the header is parsed and checked by hand (length,
dtypes, shapes, offsets) before safetensors reads the tensors; any failure is a
`CodecError` with reason "garbage". Nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edge_runtime.adapter import Adapter, LoRAWeights
from edge_runtime.fl.types import PartialSum
from edge_runtime.fleet.transfer import TransferError

__all__ = ["CodecError", "COMPRESSIONS", "encode_adapter", "decode_adapter", "read_header",
           "encode_partial", "decode_partial"]

COMPRESSIONS = ("fp32", "fp16", "int8")
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "I8": 1, "BF16": 2}
_PARTIAL_DTYPES = (torch.float64, torch.float32)
_MAX_HEADER = 16 << 20


class CodecError(TransferError):
    """Bytes that do not decode to an adapter."""

    def __init__(self, detail: str) -> None:
        super().__init__("garbage", detail)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (rows, cols) -> q (rows, cols) int8, scale (rows,) float32
    amax = x.abs().amax(dim=1).clamp_min(1e-12)
    scale = (amax / 127.0).float()
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def encode_adapter(adapter: Adapter, meta: dict[str, Any] | None = None,
                   compression: str = "fp32") -> bytes:
    """Serialize an adapter (and JSON-able `meta`) to safetensors bytes."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} must be one of {COMPRESSIONS}")
    tensors: dict[str, torch.Tensor] = {}
    for name, w in adapter.items():
        for part, t in (("lora_a", w.lora_a), ("lora_b", w.lora_b)):
            t = t.detach().to(torch.float32).contiguous()
            key = f"{name}.{part}"
            if compression == "fp32":
                tensors[key] = t
            elif compression == "fp16":
                tensors[key] = t.to(torch.float16)
            else:
                # one scale per rank component: rows of A (r, d_in), columns of B (d_out, r)
                q, s = _quantize_rows(t if part == "lora_a" else t.t())
                q = q if part == "lora_a" else q.t().contiguous()
                tensors[key + ".q"] = q
                tensors[key + ".scale"] = s
    header = {"alphas": {n: float(w.alpha) for n, w in adapter.items()},
              "compression": compression, "meta": meta or {}}
    return st_save(tensors, metadata={"edge_rt": json.dumps(header, sort_keys=True)})


def read_header(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and check a safetensors header: ({tensor: info}, edge_rt metadata)."""
    if len(data) < 8:
        raise CodecError(f"{len(data)} bytes is too short for safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 1 or n > _MAX_HEADER or 8 + n > len(data):
        raise CodecError(f"safetensors header length {n} does not fit {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not an object")
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or not isinstance(raw_meta.get("edge_rt"), str):
        raise CodecError("safetensors metadata lacks the 'edge_rt' key; not an edge-rt update")
    try:
        meta = json.loads(raw_meta["edge_rt"])
    except json.JSONDecodeError as e:
        raise CodecError(f"edge_rt metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CodecError("edge_rt metadata is not an object")
    body = len(data) - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CodecError(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {dtype!r} not allowed")
        if (not isinstance(shape, list) or len(shape) not in (1, 2)
                or not all(isinstance(s, int) and 0 <= s < (1 << 31) for s in shape)):
            raise CodecError(f"tensor {name!r}: shape {shape!r} must be 1-D or 2-D")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1] <= body):
            raise CodecError(f"tensor {name!r}: data offsets {offs!r} outside the body")
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * _DTYPES[dtype]:
            raise CodecError(f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape}")
    return header, meta


def decode_adapter(data: bytes) -> tuple[Adapter, dict[str, Any]]:
    """Bytes -> (adapter in float32, caller's meta). Raises CodecError on anything malformed."""
    header, info = read_header(data)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt input
        raise CodecError(f"safetensors could not read the tensors ({e})") from None
    if not isinstance(info.get("alphas"), dict):
        raise CodecError("edge_rt metadata lacks 'alphas'; not an adapter")
    if any(t.dtype == torch.float64 for t in tensors.values()):
        raise CodecError("an adapter's factors are float32, float16 or int8, not float64")
    compression = info.get("compression", "fp32")
    if compression not in COMPRESSIONS:
        raise CodecError(f"unknown compression {compression!r}")
    alphas: dict[str, Any] = info["alphas"]

    def factor(key: str) -> torch.Tensor:
        if compression == "int8":
            q, s = tensors.get(key + ".q"), tensors.get(key + ".scale")
            axis = 0 if key.endswith(".lora_a") else 1  # the rank axis
            if q is None or s is None or q.dim() != 2 or s.dim() != 1 or s.shape[0] != q.shape[axis]:
                raise CodecError(f"int8 tensor {key} lacks a matching .q/.scale pair")
            sf = s.to(torch.float32)
            return q.to(torch.float32) * (sf[:, None] if axis == 0 else sf[None, :])
        t = tensors.get(key)
        if t is None or t.dim() != 2:
            raise CodecError(f"tensor {key} is missing or not 2-D")
        return t.to(torch.float32)

    adapter: Adapter = {}
    for name, alpha in alphas.items():
        if not isinstance(name, str) or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise CodecError(f"alpha of {name!r} is not a number")
        a, b = factor(f"{name}.lora_a"), factor(f"{name}.lora_b")
        try:
            adapter[name] = LoRAWeights(a, b, float(alpha))
        except ValueError as e:
            raise CodecError(f"module {name}: {e}") from None
    per_module = 4 if compression == "int8" else 2
    if len(tensors) != per_module * len(alphas):
        raise CodecError(f"{len(tensors)} tensors for {len(alphas)} modules; extra tensors present")
    meta = info.get("meta", {})
    if not isinstance(meta, dict):
        raise CodecError("edge_rt meta is not an object")
    return adapter, meta


def encode_partial(partial: PartialSum, meta: dict[str, Any] | None = None) -> bytes:
    """Serialize a site's partial sum (float64/float32 tensors, kind, count) and `meta`."""
    tensors = {k: t.detach().contiguous() for k, t in partial.tensors.items()}
    for k, t in tensors.items():
        if t.dtype not in _PARTIAL_DTYPES or t.dim() not in (1, 2):
            raise ValueError(f"partial tensor {k}: {t.dtype} {tuple(t.shape)} is not a 1-D or "
                             "2-D float64/float32 tensor")
    header = {"partial": {"kind": partial.kind, "count": partial.count}, "meta": meta or {}}
    return st_save(tensors, metadata={"edge_rt": json.dumps(header, sort_keys=True)})


def decode_partial(data: bytes) -> tuple[PartialSum, dict[str, Any]]:
    """Bytes -> (partial sum, meta). Raises CodecError on anything malformed."""
    _, info = read_header(data)
    p = info.get("partial")
    if (not isinstance(p, dict) or not isinstance(p.get("kind"), str)
            or isinstance(p.get("count"), bool) or not isinstance(p.get("count"), int)
            or p["count"] < 0):
        raise CodecError("edge_rt metadata lacks a valid 'partial' {kind, count}; not a partial "
                         "sum")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt input
        raise CodecError(f"safetensors could not read the tensors ({e})") from None
    for k, t in tensors.items():
        if t.dtype not in _PARTIAL_DTYPES:
            raise CodecError(f"partial tensor {k} is {t.dtype}, not float64/float32")
    meta = info.get("meta", {})
    if not isinstance(meta, dict):
        raise CodecError("edge_rt meta is not an object")
    return PartialSum(p["kind"], dict(tensors), int(p["count"])), meta
