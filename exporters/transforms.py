"""Export passes: `transform(module, ...) -> module` with explicit filter/replace steps.

The eager model carries `LoRALinear` (rank r, scale alpha/r as a Python float) and maybe
`QuantLinear`. An exported program needs fixed shapes and the adapter as *data*, so:

- `dequantize_base` replaces every `QuantLinear` by an `nn.Linear` with its dequantized
  weight (the export quantizes again with the target runtime's own scheme);
- `strip_lora` unwraps every `LoRALinear` (its factors travel separately as an Adapter);
- `insert_lora_slots` wraps the chosen modules in `PaddedLoRALinear`, whose factors have
  the fixed slot rank R (zero-padded) and whose scale is a tensor, not a constant:

      y = base(x) + s * ((x A_pad^T) B_pad^T),  A_pad = [A; 0] (R, d_in), B_pad = [B, 0] (d_out, R)

  Padding adds only exact zeros to each dot product over the rank, and s = alpha / r uses
  the adapter's TRUE rank r, so the output equals the unpadded LoRA (Hu et al., LoRA,
  eq. 3). Carrying s as data (not folded into B) keeps the arithmetic identical to the
  eager `LoRALinear`, which multiplies the low-rank product by s.

`use_llama_ops` hands each attention's KV cache and attention to ExecuTorch's LLM
custom ops (`llama::update_cache`, `llama::custom_sdpa`), which run as kernels of the
ExecuTorch runtime; it is an export pass only (the eager model keeps `KVCache` + SDPA).

`slot_tensors` is the one function that turns an Adapter into slot data; the ExecuTorch
adapter file (.ptd) and the ONNX adapter inputs both come from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.adapter import Adapter, LoRAWeights, layer_index
from edge_runtime.config import lora_module_name
from edge_runtime.errors import AdapterMismatchError
from edge_runtime.lora import LoRALinear, lora_modules, lora_scale
from edge_runtime.model import CausalLM
from edge_runtime.quant import QuantLinear

__all__ = [
    "SlotShapes",
    "PaddedLoRALinear",
    "InputLoRALinear",
    "LastTokenLogits",
    "replace_modules",
    "dequantize_base",
    "strip_lora",
    "choose_slots",
    "insert_lora_slots",
    "insert_input_lora",
    "pad_lora",
    "slot_tensors",
    "load_slot_tensors",
    "SLOT_SUFFIXES",
    "LlamaOpsSDPA",
    "use_llama_ops",
    "load_llama_ops",
]

# {module name: (d_in, d_out)} of every LoRA slot in an export.
SlotShapes = dict[str, tuple[int, int]]
SLOT_SUFFIXES = ("lora_a", "lora_b", "lora_scale")


class PaddedLoRALinear(nn.Module):
    """A frozen base linear plus a LoRA slot of fixed rank whose factors are buffers.

    Buffers: `lora_a` (R, d_in), `lora_b` (d_out, R), `lora_scale` (1,). A module
    without an adapter has all three at zero and returns `base(x)` exactly.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_scale: torch.Tensor

    def __init__(self, base: nn.Module, d_in: int, d_out: int, max_rank: int) -> None:
        super().__init__()
        if max_rank <= 0:
            raise ValueError(f"slot rank must be positive, got {max_rank}")
        self.base = base
        self.d_in, self.d_out, self.max_rank = d_in, d_out, max_rank
        self.register_buffer("lora_a", torch.zeros(max_rank, d_in))  # (R, d_in)
        self.register_buffer("lora_b", torch.zeros(d_out, max_rank))  # (d_out, R)
        self.register_buffer("lora_scale", torch.zeros(1))  # (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear(x, W) == x @ W^T, the same matmuls as LoRALinear.forward.
        low = F.linear(F.linear(x, self.lora_a), self.lora_b)  # (..., d_out)
        return self.base(x) + self.lora_scale * low

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, max_rank={self.max_rank}"


class InputLoRALinear(nn.Module):
    """A frozen base linear plus LoRA factors handed in per call (ONNX graph inputs).

    The exporting wrapper sets `lora_a` (r, d_in), `lora_b` (d_out, r) and `lora_scale`
    (1,) before each forward; r may differ between modules and between calls.
    """

    def __init__(self, base: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.lora_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_a is None or self.lora_b is None or self.lora_scale is None:
            raise RuntimeError("InputLoRALinear called without its LoRA inputs set")
        low = F.linear(F.linear(x, self.lora_a), self.lora_b)  # (..., d_out)
        return self.base(x) + self.lora_scale * low


class LastTokenLogits(nn.Module):
    """forward(tokens (1, T), input_pos (T,)) -> logits of the last position (1, V).

    Prefill of T tokens then runs the LM head once, not T times (the head is the
    largest matmul of a small model).
    """

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden_states(tokens, input_pos)  # (1, T, dim)
        return self.model.lm_head(h[:, -1, :])  # (1, V)


def load_llama_ops() -> None:
    """Register ExecuTorch's LLM custom ops with torch and with the ExecuTorch runtime.

    Importing the module loads `libcustom_ops_aot_lib.so` of the executorch wheel, which
    holds the ATen (eager, export) and the ExecuTorch kernels of `llama::custom_sdpa`
    and `llama::update_cache`; a runner must call this before loading such a program.
    """
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class LlamaOpsSDPA(nn.Module):
    """Static KV cache + causal attention through `llama::update_cache` / `llama::custom_sdpa`.

    The cache is laid out as ExecuTorch's kernels want it, (B, S_max, KV, hd), sequence
    second. `update_cache` writes the new positions in place (no index_copy, no copy of
    the cache); `custom_sdpa` attends each query at position p to keys 0..p only (causal
    from `start_pos`), so a decode step reads `start_pos + 1` cached positions instead of
    all S_max under a mask, and it takes grouped-query heads without repeating K and V.
    Positions must be contiguous, `input_pos = start_pos + arange(T)`, as every runner
    feeds them.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, batch: int, max_seq_len: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.max_seq_len = n_heads, head_dim, max_seq_len
        shape = (batch, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                input_pos: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, hd), k, v (B, KV, T, hd) after RoPE; input_pos (T,) -> (B, T, H*hd)."""
        bsz, _, seqlen, _ = q.shape
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seqlen <= self.max_seq_len)
        torch.ops.llama.update_cache(k.transpose(1, 2), self.k_cache, start)  # (B, T, KV, hd)
        torch.ops.llama.update_cache(v.transpose(1, 2), self.v_cache, start)
        y = torch.ops.llama.custom_sdpa(q.transpose(1, 2), self.k_cache, self.v_cache, start,
                                        None, 0.0, True)  # (B, T, H, hd)
        return y.reshape(bsz, seqlen, self.n_heads * self.head_dim)


def use_llama_ops(model: CausalLM, batch: int, max_seq_len: int) -> CausalLM:
    """Pass: every attention's cache and SDPA -> a `LlamaOpsSDPA` of `max_seq_len` positions.

    Replaces any `KVCache` (the eager cache is not used any more); the rotary tables
    are extended to `max_seq_len`. Module names of the projections do not change, so
    LoRA slot names are the same with and without this pass.
    """
    load_llama_ops()
    model.setup_cache(batch, max_seq_len)  # the rotary tables; the caches are dropped below
    for layer in model.blocks():
        attn = layer.self_attn
        dtype = attn.kv_cache.k_cache.dtype if attn.kv_cache is not None else torch.float32
        attn.kv_cache = None
        attn.sdpa = LlamaOpsSDPA(batch, max_seq_len, attn.n_heads, attn.n_kv_heads,
                                 attn.head_dim, dtype)
    return model


def replace_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                    build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule for which `select(name, module)` holds by `build(name, module)`.

    Returns the replaced names. The list of targets is taken before any replacement.
    """
    targets = [(n, m) for n, m in model.named_modules() if n and select(n, m)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, build(name, mod))
    return [n for n, _ in targets]


def _dense(q: nn.Module) -> nn.Linear:
    assert isinstance(q, QuantLinear)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize(torch.float32))
        if isinstance(q.bias, torch.Tensor):
            lin.bias.copy_(q.bias)
    lin.requires_grad_(False)
    return lin


def dequantize_base(model: CausalLM) -> CausalLM:
    """Pass: every `QuantLinear` -> `nn.Linear` holding its dequantized weight."""
    replace_modules(model, lambda _n, m: isinstance(m, QuantLinear), lambda _n, m: _dense(m))
    return model


def strip_lora(model: CausalLM) -> CausalLM:
    """Pass: every `LoRALinear` -> its base module (read the adapter first if you need it)."""
    def unwrap(_name: str, mod: nn.Module) -> nn.Module:
        assert isinstance(mod, LoRALinear)
        return mod.base

    replace_modules(model, lambda _n, m: isinstance(m, LoRALinear), unwrap)
    model.frozen_prefix = 0
    return model


def _linear_shape(model: nn.Module, name: str) -> tuple[int, int]:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise AdapterMismatchError(
            f"adapter names module {name!r}, which this base model does not have; "
            "the adapter is for another base model"
        ) from None
    if isinstance(mod, (LoRALinear, PaddedLoRALinear)):
        return mod.d_in, mod.d_out
    if not hasattr(mod, "in_features"):
        raise AdapterMismatchError(f"adapter module {name!r} is not a linear layer")
    d_in, d_out = mod.in_features, mod.out_features
    assert isinstance(d_in, int) and isinstance(d_out, int)
    return d_in, d_out


def choose_slots(model: CausalLM, adapter: Adapter | None, targets: Iterable[str],
                 depth: int) -> SlotShapes:
    """The modules that get a LoRA slot: the adapter's, or `targets` on the top `depth` blocks.

    `depth` 0 means every block. Returns {name: (d_in, d_out)} in model order.
    """
    n_layers = model.config.n_layers
    if adapter:
        names = set(adapter)
    else:
        first = 0 if depth == 0 else max(n_layers - depth, 0)
        names = set()
        for i in range(first, n_layers):
            for t in targets:
                names.add(lora_module_name(i, t))
    ordered = sorted(names, key=lambda n: (layer_index(n), n))
    return {n: _linear_shape(model, n) for n in ordered}


def insert_lora_slots(model: CausalLM, slots: SlotShapes, max_rank: int) -> CausalLM:
    """Pass: wrap each slot module (plain base linear) in a `PaddedLoRALinear` of rank R."""
    if max_rank <= 0 or not slots:
        return model
    present = lora_modules(model)
    if present:
        raise ValueError(f"strip_lora first: {next(iter(present))} still has a LoRALinear")

    def build(name: str, mod: nn.Module) -> nn.Module:
        d_in, d_out = slots[name]
        return PaddedLoRALinear(mod, d_in, d_out, max_rank)

    replace_modules(model, lambda n, _m: n in slots, build)
    return model


def insert_input_lora(model: CausalLM, slots: SlotShapes) -> CausalLM:
    """Pass: wrap each slot module (plain base linear) in an `InputLoRALinear`."""
    present = lora_modules(model)
    if present:
        raise ValueError(f"strip_lora first: {next(iter(present))} still has a LoRALinear")
    replace_modules(model, lambda n, _m: n in slots,
                    lambda n, m: InputLoRALinear(m, *slots[n]))
    return model


def pad_lora(w: LoRAWeights, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_pad (R, d_in), B_pad (d_out, R), scale (1,)) for one module; scale = alpha / r."""
    r = w.rank
    a = torch.zeros(max_rank, w.d_in, dtype=torch.float32)
    b = torch.zeros(w.d_out, max_rank, dtype=torch.float32)
    a[:r] = w.lora_a.detach().float()
    b[:, :r] = w.lora_b.detach().float()
    scale = torch.tensor([lora_scale(w.alpha, r)], dtype=torch.float32)
    return a, b, scale


def slot_tensors(adapter: Adapter | None, slots: SlotShapes, max_rank: int | None
                 ) -> dict[str, torch.Tensor]:
    """Slot data for an adapter: `{name}.lora_a|lora_b|lora_scale` for every slot.

    With `max_rank` R every module is zero-padded to rank R (ExecuTorch slots); with None
    each keeps its own rank (ONNX inputs take any rank). Slots the adapter does not name
    get zero factors and a zero scale (output = base exactly).

    Raises:
        AdapterMismatchError: the adapter has a module without a slot, a rank above the
            slot rank, or factors of the wrong shape.
    """
    adapter = adapter or {}
    extra = sorted(set(adapter) - set(slots))
    if extra:
        raise AdapterMismatchError(
            f"adapter module {extra[0]} has no LoRA slot in this export (slots: "
            f"{len(slots)} modules); re-export with this adapter: edge-rt export ... --adapter DIR"
        )
    out: dict[str, torch.Tensor] = {}
    for name, (d_in, d_out) in slots.items():
        w = adapter.get(name)
        if w is None:
            w = LoRAWeights(torch.zeros(1, d_in), torch.zeros(d_out, 1), alpha=0.0)
        if (w.d_in, w.d_out) != (d_in, d_out):
            raise AdapterMismatchError(
                f"adapter module {name} is {w.d_out}x{w.d_in}, the export's slot is "
                f"{d_out}x{d_in}; the adapter is for another base model"
            )
        if max_rank is not None and w.rank > max_rank:
            raise AdapterMismatchError(
                f"adapter module {name} has rank {w.rank}, above the export's slot rank "
                f"{max_rank}; re-export with --max-rank {w.rank} or more"
            )
        a, b, s = pad_lora(w, w.rank if max_rank is None else max_rank)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"], out[f"{name}.lora_scale"] = a, b, s
    return out


def load_slot_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy slot data into the model's `PaddedLoRALinear` buffers; every key consumed."""
    slots = {n: m for n, m in model.named_modules() if isinstance(m, PaddedLoRALinear)}
    expected = {f"{n}.{s}" for n in slots for s in SLOT_SUFFIXES}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        raise AdapterMismatchError(f"slot data mismatch: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, mod in slots.items():
            for s in SLOT_SUFFIXES:
                getattr(mod, s).copy_(tensors[f"{name}.{s}"])
