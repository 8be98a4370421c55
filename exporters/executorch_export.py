"""ExecuTorch export: `torch.export` -> XNNPACK lowering -> `model.pte` + `lora.ptd`.

Layout of the program (what ExecuTorch's own LLM export does):
- a static KV cache (mutable buffers, `max_seq_len` positions, (B, S, KV, hd)) written
  in place by `llama::update_cache` at `input_pos[0]` and read by `llama::custom_sdpa`
  (causal from that position, grouped-query heads), with a dynamic number of new tokens
  T (prefill T > 1, decode T = 1); see `transforms.use_llama_ops`;
- base linears, the LM head included, quantized with torchao (`8da4w`: int8 dynamic
  activations, int4 weights in groups of 32, symmetric; `8da8w`: int8 weights per
  output channel) or fp32, run by XNNPACK; the token embedding weight-only on the same
  grid, run by ExecuTorch's quantized embedding kernels;
- LoRA slots (`PaddedLoRALinear`, rank `max_rank`) kept OUT of the XNNPACK delegate and
  their buffers tagged as external constants, so ExecuTorch's program-data separation
  writes them to `lora.ptd` under their module names. XNNPACK would pack a delegated
  weight under the SHA-256 of its bytes, which changes with the adapter; the portable
  kernels read a named external constant instead, so any adapter of the slot shapes is
  a new `lora.ptd` written by `write_adapter_ptd`, with no re-export.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.adapter import Adapter
from edge_runtime.errors import AdapterMismatchError
from edge_runtime.model import CausalLM
from exporters.config import ExportConfig, ExportQuant
from exporters.transforms import (
    LastTokenLogits,
    PaddedLoRALinear,
    SlotShapes,
    load_llama_ops,
    load_slot_tensors,
    replace_modules,
    slot_tensors,
    use_llama_ops,
)

__all__ = ["quantize_for_xnnpack", "QuantizedEmbedding", "export_executorch", "load_kernels", "write_adapter_ptd", "read_ptd",
           "LORA_TAG", "PTE_NAME", "PTD_NAME"]

log = logging.getLogger(__name__)

LORA_TAG = "lora"  # external-constant tag -> file name `lora.ptd`
PTE_NAME = "model.pte"
PTD_NAME = f"{LORA_TAG}.ptd"
KEY_PREFIX = "model."  # the slot buffers' names as seen from the exported LastTokenLogits
INT4_GROUP = 32


class QuantizedEmbedding(nn.Module):
    """A token embedding on a symmetric int4/int8 grid, gathered by ExecuTorch's kernels.

    `forward` calls `quantized_decomposed::embedding_4bit` / `embedding_byte`, which read
    only the rows of the given tokens and dequantize them (w = q * s per group).
    Buffers: `weight` (V, D/2) uint8, two int4 values per byte (+8, even column in the
    high nibble: the kernels' layout), or (V, D) int8; `scales` (V, D/group) fp32.
    """

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"embedding bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.num_embeddings, self.embedding_dim = qdata.shape
        if bits == 4:
            shifted = (qdata.to(torch.int16) + 8).to(torch.uint8)  # (V, D) in 0..15
            qdata = shifted[:, 0::2] * 16 + shifted[:, 1::2]  # (V, D/2)
        self.register_buffer("weight", qdata.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).reshape(qdata.shape[0], -1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return torch.ops.quantized_decomposed.embedding_4bit.dtype(
                self.weight, self.scales, None, -8, 7, ids, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, ids, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def _quantized_embedding(emb: nn.Module, cfg: Any, bits: int) -> QuantizedEmbedding:
    """torchao's weight-only grid for `emb` (the linears' grid), as a `QuantizedEmbedding`."""
    from torchao.quantization import quantize_

    assert isinstance(emb, nn.Embedding)
    tmp = nn.Embedding(emb.num_embeddings, emb.embedding_dim)
    tmp.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    quantize_(tmp, cfg, filter_fn=lambda m, _n: isinstance(m, nn.Embedding))
    w = tmp.weight
    if bool((w.zero_point != 0).any()):  # type: ignore[attr-defined]
        raise RuntimeError("the embedding grid is not symmetric; the kernels take no zero point")
    return QuantizedEmbedding(w.qdata, w.scale, bits)  # type: ignore[attr-defined]


def quantize_for_xnnpack(model: nn.Module, quant: ExportQuant) -> dict[str, Any]:
    """Pass: torchao quantization of every base `nn.Linear` and of the token embedding.

    Linears (the LM head included; a tied head gets its own quantized copy of the
    embedding matrix) take int8 dynamic activations and `8da4w` int4 weights in groups of
    `INT4_GROUP` (32 divides SmolLM2's 576 and 1536) or `8da8w` int8 weights per output
    channel; XNNPACK runs them. A linear whose input width is not a multiple of the group
    falls back to int8 per channel rather than staying fp32. The embedding gets the same
    weight grid without activation quantization, which ExecuTorch runs as
    `quantized_decomposed::embedding_4bit` / `embedding_byte` (the gather reads one
    quantized row per token). LoRA slot factors are buffers of `PaddedLoRALinear`, not
    `nn.Linear`, so they stay fp32.

    Returns:
        A summary for the manifest: weight scheme per module kind and the counts.

    Raises:
        RuntimeError: a linear or embedding weight is still fp32 after the pass.
    """
    if quant is ExportQuant.NONE:
        return {"scheme": "fp32"}
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    int8_channel = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if quant is ExportQuant.DA8W4:
        int4 = getattr(torch, "int4")  # noqa: B009 (missing from torch's stubs)
        linear_cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=int4, weight_granularity=PerGroup(INT4_GROUP))
        embed_cfg = IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(INT4_GROUP))
        group, bits = INT4_GROUP, 4
        scheme = {"linear": f"8da4w g{INT4_GROUP}", "embedding": f"int4 g{INT4_GROUP}"}
    elif quant is ExportQuant.DA8W8:
        linear_cfg, embed_cfg, group = int8_channel, IntxWeightOnlyConfig(
            weight_dtype=torch.int8, granularity=PerAxis(0)), 1
        bits = 8
        scheme = {"linear": "8da8w per channel", "embedding": "int8 per row"}
    else:
        raise ValueError(f"{quant.value} is not an ExecuTorch quantization")

    def grouped(m: nn.Module, _fqn: str) -> bool:
        return isinstance(m, nn.Linear) and m.in_features % group == 0

    fallback = [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and not grouped(m, n)]
    with torch.no_grad():
        quantize_(model, linear_cfg, filter_fn=grouped)
        if fallback:
            log.info("executorch: %d linears not a multiple of %d wide -> int8 per channel: %s",
                     len(fallback), group, fallback[:3])
            quantize_(model, int8_channel, filter_fn=lambda _m, n: n in fallback)
        replace_modules(model, lambda _n, m: isinstance(m, nn.Embedding),
                        lambda _n, m: _quantized_embedding(m, embed_cfg, bits))
    kinds = (nn.Linear, nn.Embedding)
    plain = [n for n, m in model.named_modules()
             if isinstance(m, kinds) and type(m.weight) in (torch.Tensor, nn.Parameter)]
    if plain:
        raise RuntimeError(f"quantization left {len(plain)} weights in fp32: {plain[:3]}")
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_embed = sum(isinstance(m, QuantizedEmbedding) for m in model.modules())
    return {"scheme": scheme, "linears": n_linear, "embeddings": n_embed,
            "int8_fallback": fallback}


def load_kernels() -> None:
    """Register the non-core kernels our programs call (before loading or exporting one).

    ExecuTorch's LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`) and its
    quantized kernels (`quantized_decomposed::embedding_4bit`, `embedding_byte`) ship with
    the executorch wheel as shared libraries that importing these modules loads into
    both torch and the ExecuTorch runtime of the Python bindings.
    """
    import executorch.kernels.quantized  # noqa: F401

    load_llama_ops()


def _is_lora_node(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and any(
        s in node.name for s in ("lora_a", "lora_b", "lora_scale"))


def _uses_lora(node: torch.fx.Node) -> bool:
    return any(isinstance(a, torch.fx.Node) and _is_lora_node(a) for a in node.all_input_nodes)


def _lora_free_partitioner() -> Any:
    """An XNNPACK partitioner that leaves every op reading a LoRA slot buffer undelegated."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class LoRAFreeXnnpackPartitioner(XnnpackPartitioner):  # type: ignore[misc]
        def ops_to_not_decompose(self, ep: Any) -> Any:
            ops, keep = super().ops_to_not_decompose(ep)

            def filter_fn(node: torch.fx.Node) -> bool:
                return (not _uses_lora(node)) and bool(keep(node) if keep else False)

            return ops, filter_fn

        def get_matched_nodes_from_configs(self, ep: Any) -> list[list[torch.fx.Node]]:
            groups = super().get_matched_nodes_from_configs(ep)
            return [g for g in groups if not any(_is_lora_node(n) or _uses_lora(n) for n in g)]

    return LoRAFreeXnnpackPartitioner()


def _tag_lora(node: torch.fx.Node) -> str | None:
    return LORA_TAG if _is_lora_node(node) else None


def export_executorch(model: CausalLM, cfg: ExportConfig, out_dir: Path,
                      adapter: Adapter | None, slots: SlotShapes) -> dict[str, Any]:
    """Lower `model` (already through the transforms: plain base, LoRA slots) to `out_dir`.

    Writes `model.pte` and, when the model has LoRA slots, `lora.ptd` with the adapter's
    padded factors. Returns manifest fields (file names, timings).
    """
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from torch.export import Dim, export

    load_kernels()
    has_slots = any(isinstance(m, PaddedLoRALinear) for m in model.modules())
    if has_slots:
        load_slot_tensors(model, slot_tensors(adapter, slots, cfg.max_rank))
    model.eval()
    use_llama_ops(model, 1, cfg.max_seq_len)
    quant_summary = quantize_for_xnnpack(model, cfg.quant)
    wrapper = LastTokenLogits(model).eval()
    tokens = torch.zeros(1, 2, dtype=torch.long)
    pos = torch.arange(2)
    seq = Dim("seq", min=1, max=cfg.max_seq_len)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = export(wrapper, (tokens, pos), dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    t1 = time.perf_counter()
    edge = to_edge_transform_and_lower(
        ep, partitioner=[_lora_free_partitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    t2 = time.perf_counter()
    n_delegates, outside = _op_counts(edge.exported_program().graph)
    prog = edge.to_executorch(ExecutorchBackendConfig(
        external_constants=_tag_lora if has_slots else False))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PTE_NAME).write_bytes(prog.buffer)
    tensor_data = prog._tensor_data or {}  # filename -> Cord; no public getter in 1.5.1
    data_files = {name.removesuffix(".ptd"): bytes(c) for name, c in tensor_data.items()}
    if has_slots:
        if set(data_files) != {LORA_TAG}:
            raise RuntimeError(f"expected one external data file {LORA_TAG!r}, got {list(data_files)}")
        # Write our own file (one buffer per key, same layout) so the exported and a swapped
        # adapter go through the same writer.
        write_adapter_ptd(out_dir / PTD_NAME, slot_tensors(adapter, slots, cfg.max_rank))
        _check_ptd_keys(data_files[LORA_TAG], slots)
    t3 = time.perf_counter()
    log.info("executorch: export %.1fs, lower %.1fs, serialize %.1fs, %d XNNPACK calls, "
             "outside the delegate %s", t1 - t0, t2 - t1, t3 - t2, n_delegates, outside)
    return {
        "program": PTE_NAME,
        "adapter_data": PTD_NAME if has_slots else None,
        "xnnpack_calls": n_delegates,
        "undelegated_ops": outside,
        "quantized": quant_summary,
        "seconds": {"export": t1 - t0, "lower": t2 - t1, "serialize": t3 - t2},
    }


def _op_name(node: torch.fx.Node) -> str:
    """An op's name (`llama::custom_sdpa`), also of one export wrapped as auto_functionalized."""
    target: Any = node.target
    if "auto_functionalized" in str(target) and node.args:
        target = node.args[0]  # the mutating op (llama::update_cache), run in place later
    name = getattr(target, "name", None)  # OpOverload.name()
    return str(name()) if callable(name) else str(target)


def _op_counts(graph: torch.fx.Graph) -> tuple[int, dict[str, int]]:
    """(number of XNNPACK delegate calls, {operator: count} of the ops run outside it)."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    n_delegates = sum("executorch_call_delegate" in str(n.target) for n in calls)
    outside = Counter(_op_name(n) for n in calls
                      if "executorch_call_delegate" not in str(n.target)
                      and "getitem" not in str(n.target))
    return n_delegates, dict(sorted(outside.items()))


def _check_ptd_keys(blob: bytes, slots: SlotShapes) -> None:
    """The program's own external data must name exactly our slot tensors."""
    keys = set(read_ptd(blob))
    expected = {f"{KEY_PREFIX}{n}.{s}" for n in slots for s in ("lora_a", "lora_b", "lora_scale")}
    if keys != expected:
        raise RuntimeError(
            "ExecuTorch wrote external constants under unexpected names: missing "
            f"{sorted(expected - keys)[:3]}, extra {sorted(keys - expected)[:3]}"
        )


def write_adapter_ptd(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write slot tensors as an ExecuTorch FlatTensor data file (.ptd), one buffer per key.

    Keys are the slot names (`model.layers.1.self_attn.q_proj.lora_a`) prefixed with
    `KEY_PREFIX`, the buffers' fully qualified names in the exported program.
    """
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    buffers: list[bytes] = []
    named: dict[str, DataEntry] = {}
    for key in sorted(tensors):
        t = tensors[key].detach().to(torch.float32).contiguous()
        named[KEY_PREFIX + key] = DataEntry(buffer_index=len(buffers), alignment=16,
                               tensor_layout=TensorLayout.from_tensor(t))
        buffers.append(t.numpy().tobytes())
    blob = FlatTensorSerializer().serialize(DataPayload(buffers=buffers, named_data=named))
    tmp = path.with_suffix(".ptd.tmp")
    tmp.write_bytes(bytes(blob))
    tmp.replace(path)


def read_ptd(blob: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a .ptd file by key as written (float32 only: what LoRA slots hold)."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(Cord(blob))
    out: dict[str, torch.Tensor] = {}
    for key, entry in payload.named_data.items():
        layout = entry.tensor_layout
        if layout is None:
            raise AdapterMismatchError(f"entry {key!r} of the .ptd file is not a tensor")
        raw = bytes(payload.buffers[entry.buffer_index])
        n = 1
        for s in layout.sizes:
            n *= int(s)
        t = torch.frombuffer(bytearray(raw[: 4 * n]), dtype=torch.float32)
        out[key] = t.reshape([int(s) for s in layout.sizes]).clone()
    return out
