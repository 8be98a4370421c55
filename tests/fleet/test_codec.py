"""Adapter wire codec: exact fp32 round trip, bounded fp16/int8 error, garbage rejected."""

from __future__ import annotations

import struct

import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.fleet.codec import CodecError, decode_adapter, encode_adapter


def _adapter(seed: int = 0) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.1.self_attn.q_proj": LoRAWeights(torch.randn(8, 256, generator=g),
                                                       torch.randn(256, 8, generator=g), 8.0),
        "model.layers.1.self_attn.v_proj": LoRAWeights(torch.randn(4, 256, generator=g),
                                                       torch.randn(128, 4, generator=g), 16.0),
    }


def test_fp32_exact() -> None:
    a = _adapter()
    out, meta = decode_adapter(encode_adapter(a, {"round": 3}))
    assert meta == {"round": 3}
    assert set(out) == set(a)
    for k in a:
        assert torch.equal(out[k].lora_a, a[k].lora_a) and torch.equal(out[k].lora_b, a[k].lora_b)
        assert out[k].alpha == a[k].alpha


@pytest.mark.parametrize("comp,tol,ratio", [("fp16", 2e-3, 0.55), ("int8", 1.5e-2, 0.35)])
def test_compressed_error_and_size(comp: str, tol: float, ratio: float) -> None:
    a = _adapter(1)
    full = encode_adapter(a)
    small = encode_adapter(a, compression=comp)
    assert len(small) < ratio * len(full)
    out, _ = decode_adapter(small)
    for k in a:
        for x, y in ((out[k].lora_a, a[k].lora_a), (out[k].lora_b, a[k].lora_b)):
            # relative to the max magnitude of each rank component (int8 scales per component)
            ref = y.abs().amax(dim=1, keepdim=True) if x is out[k].lora_a else y.abs().amax(0)
            rel = ((x - y).abs() / ref).max().item()
            assert rel < tol


def test_garbage_rejected() -> None:
    good = encode_adapter(_adapter())
    bads = [b"", b"\x00" * 7, b"random garbage bytes" * 10,
            struct.pack("<Q", 1 << 40) + b"{}",
            good[:-10],  # truncated body
            struct.pack("<Q", 2) + b"{}",  # no metadata
            ]
    # header claims a tensor larger than the body
    hdr = b'{"__metadata__":{"edge_rt":"{\\"alphas\\":{}}"},"x":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}'
    bads.append(struct.pack("<Q", len(hdr)) + hdr + b"\x00" * 16)
    for b in bads:
        with pytest.raises(CodecError):
            decode_adapter(b)
