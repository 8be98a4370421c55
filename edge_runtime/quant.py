"""Weight-only quantized frozen linears (QLoRA-style) with an input gradient.

`QuantLinear` stores the frozen weight as int8 per output channel (symmetric) or int4 in
groups of `group_size` input columns (asymmetric, two nibbles per byte). The forward
dequantizes on the fly; the backward returns the gradient for the input only (the base
weight is a buffer, never a parameter), recomputing the dequantized weight instead of
saving it, so a step keeps only the packed weight resident.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.config import QuantMode

__all__ = ["QuantLinear", "quantize_linears", "resident_bytes"]

INT4_GROUP = 32


_scratch = threading.local()


def _scratch_weight(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight in a per-thread buffer reused by every layer of its shape.

    Only for a weight used at once and not kept (the matmuls below: no autograd graph
    holds it). A fresh 1-4 MB tensor per call, forward and backward, was ~40% of a step's
    page faults on SmolLM2-135M (each buffer that size is a new mapping that the kernel
    zero-fills).
    """
    if module.mode is not QuantMode.INT8:
        return module.dequantize(dtype)
    bufs: dict[tuple[int, int, torch.dtype], torch.Tensor] = _scratch.__dict__.setdefault("bufs", {})
    key = (module.out_features, module.in_features, dtype)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(key[:2], dtype=dtype)
    return torch.mul(module.qweight, module.scale[:, None].to(dtype), out=buf)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T + b with W dequantized from `module`; grad flows to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return F.linear(x, _scratch_weight(module, x.dtype), module.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return grad_out @ _scratch_weight(ctx.module, grad_out.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights. Same call contract as `nn.Linear`."""

    qweight: torch.Tensor  # int8 (out, in) or uint8 (out, in/2), two nibbles per byte
    scale: torch.Tensor  # (out,) for int8, (out, in/group) for int4
    zero: torch.Tensor | None  # (out, in/group) group minimum for int4
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, mode: QuantMode, group_size: int = INT4_GROUP) -> None:
        super().__init__()
        if mode is QuantMode.NONE:
            raise ValueError("QuantLinear needs int8 or int4; keep nn.Linear for 'none'")
        w = linear.weight.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.mode = mode
        self.group_size = group_size
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        if mode is QuantMode.INT8:
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", None)
        else:
            if self.in_features % group_size != 0:
                raise ValueError(
                    f"int4 needs in_features ({self.in_features}) divisible by {group_size}"
                )
            g = w.view(self.out_features, -1, group_size)  # (out, n_groups, gs)
            lo = g.amin(dim=2)
            hi = g.amax(dim=2)
            scale = ((hi - lo) / 15.0).clamp(min=1e-8)  # (out, n_groups)
            q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
            q = q.view(self.out_features, -1)  # (out, in)
            packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2)
            self.register_buffer("qweight", packed.contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero", lo)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense (out, in) tensor (a new one each call)."""
        if self.mode is QuantMode.INT8:
            return (self.qweight.to(dtype) * self.scale[:, None].to(dtype))
        p = self.qweight
        assert self.zero is not None
        q = torch.stack([p & 0x0F, p >> 4], dim=-1).view(self.out_features, -1)  # (out, in)
        g = q.view(self.out_features, -1, self.group_size).to(dtype)
        w = g * self.scale[..., None].to(dtype) + self.zero[..., None].to(dtype)
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _DequantMatmul.apply(x, self)
            assert isinstance(out, torch.Tensor)
            return out
        return F.linear(x, _scratch_weight(self, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode.value}"


def quantize_linears(model: nn.Module, mode: QuantMode, skip: tuple[str, ...] = ("lm_head",)
                     ) -> int:
    """Replace every `nn.Linear` (except names in `skip`) by a `QuantLinear`. Returns the count.

    The tied LM head shares the embedding and stays in full precision.
    """
    if mode is QuantMode.NONE:
        return 0
    targets = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.split(".")[-1] not in skip
    ]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear(mod, mode))
    return len(targets)


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and persistent buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
