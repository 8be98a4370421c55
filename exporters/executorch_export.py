"""ExecuTorch export: `torch.export` -> XNNPACK lowering -> `model.pte` + `lora.ptd`.

Layout of the program (what ExecuTorch's own LLM export does, minus its custom ops):
- a static KV cache (mutable buffers, `max_seq_len` positions) written at `input_pos`,
  with a dynamic number of new tokens T (prefill T > 1, decode T = 1);
- base linears quantized with torchao (`8da4w`: int8 dynamic activations, int4 weights
  in groups of 32, symmetric; `8da8w`: int8 weights per output channel) or fp32, run by
  XNNPACK;
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
    load_slot_tensors,
    slot_tensors,
)

__all__ = ["quantize_for_xnnpack", "export_executorch", "write_adapter_ptd", "read_ptd",
           "LORA_TAG", "PTE_NAME", "PTD_NAME"]

log = logging.getLogger(__name__)

LORA_TAG = "lora"  # external-constant tag -> file name `lora.ptd`
PTE_NAME = "model.pte"
PTD_NAME = f"{LORA_TAG}.ptd"
KEY_PREFIX = "model."  # the slot buffers' names as seen from the exported LastTokenLogits
INT4_GROUP = 32


def quantize_for_xnnpack(model: nn.Module, quant: ExportQuant) -> nn.Module:
    """Pass: torchao 8-bit dynamic-activation quantization of every base `nn.Linear`.

    LoRA slot factors are buffers of `PaddedLoRALinear`, not `nn.Linear`, so they stay fp32.
    """
    if quant is ExportQuant.NONE:
        return model
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant is ExportQuant.DA8W4:
        cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, "int4"),  # noqa: B009 (missing from torch's stubs)
            weight_granularity=PerGroup(INT4_GROUP))

        def want(m: nn.Module, _fqn: str) -> bool:
            return isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0
    elif quant is ExportQuant.DA8W8:
        cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0))

        def want(m: nn.Module, _fqn: str) -> bool:
            return isinstance(m, nn.Linear)
    else:
        raise ValueError(f"{quant.value} is not an ExecuTorch quantization")
    with torch.no_grad():
        quantize_(model, cfg, filter_fn=want)
    return model


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

    has_slots = any(isinstance(m, PaddedLoRALinear) for m in model.modules())
    if has_slots:
        load_slot_tensors(model, slot_tensors(adapter, slots, cfg.max_rank))
    model.eval()
    model.setup_cache(1, cfg.max_seq_len)
    quantize_for_xnnpack(model, cfg.quant)
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
    n_delegates = sum(1 for n in edge.exported_program().graph.nodes
                      if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    log.info("executorch: export %.1fs, lower %.1fs, serialize %.1fs, %d XNNPACK calls",
             t1 - t0, t2 - t1, t3 - t2, n_delegates)
    return {
        "program": PTE_NAME,
        "adapter_data": PTD_NAME if has_slots else None,
        "xnnpack_calls": n_delegates,
        "seconds": {"export": t1 - t0, "lower": t2 - t1, "serialize": t3 - t2},
    }


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
