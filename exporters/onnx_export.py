"""ONNX export: `torch.onnx.export` (dynamo) of one decode/prefill step, any-rank LoRA inputs.

Graph signature (B = 1):
    inputs:  input_ids (1, T); past_key_i, past_value_i (1, KV, P, hd) for every block i;
             for every LoRA slot m: `m.lora_a` (r_m, d_in), `m.lora_b` (d_out, r_m),
             `m.lora_scale` (1,)
    outputs: logits (1, V) of the last position; present_key_i, present_value_i
             (1, KV, P + T, hd)
(With quantization the LM head gets its own transposed weight so it is quantized too;
the embedding table stays fp32 for the gather.)
T, P and every r_m are symbolic, so one graph runs prefill, decode and adapters of any
rank (zero factors with a zero scale = no adapter). The KV cache is explicit state: the
runner feeds `present_*` back as `past_*`. Positions are P + arange(T).

Optional weight quantization afterwards as `MatMulNBits` in blocks of 32: `int4` on
GGUF's Q4_1 grid (`exporters.onnx_int4`: integer zero points plus an exact per-block
correction, so a Q4_1 GGUF's weights come back exactly at the fast kernel's speed) with
the LM head (the tied embedding) on Q8_0's 8-bit grid, as GGUF files keep it; int8
activations in the matmuls (accuracy level 4);
`int8` with ONNX Runtime's
`MatMulNBitsQuantizer`. Only MatMuls with a constant weight are touched: the LoRA
MatMuls read graph inputs and stay fp32.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.model import CausalLM
from exporters.config import ExportConfig, ExportQuant
from exporters.transforms import InputLoRALinear, SlotShapes

__all__ = ["ConcatKVCache", "OnnxStep", "export_onnx", "quantize_onnx", "ONNX_NAME",
           "input_names", "output_names"]

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
QUANT_BLOCK = 32


class ConcatKVCache(nn.Module):
    """KV cache as explicit state: present = cat(past, new) along the position axis.

    Stands in for `edge_runtime.model.KVCache` (same `update` contract), so the model's
    own attention, RoPE at `input_pos` and mask `key_pos <= input_pos` run unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.past_k: torch.Tensor | None = None  # (1, KV, P, hd)
        self.past_v: torch.Tensor | None = None
        self.present_k: torch.Tensor | None = None  # (1, KV, P + T, hd)
        self.present_v: torch.Tensor | None = None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.past_k is not None and self.past_v is not None
        self.present_k = torch.cat([self.past_k, k], dim=2)
        self.present_v = torch.cat([self.past_v, v], dim=2)
        return self.present_k, self.present_v


class OnnxStep(nn.Module):
    """One step of the model with explicit KV state and LoRA factors as inputs."""

    def __init__(self, model: CausalLM, slots: SlotShapes, max_seq_len: int,
                 untie_head: bool = False) -> None:
        super().__init__()
        self.model = model
        # A tied LM head exports as Gemm(transB) on the embedding, which MatMulNBits
        # cannot take; a separate (dim, V) copy makes it a plain MatMul the quantizer packs.
        head_t = model.lm_head.weight.detach().t().contiguous().clone() if untie_head else None
        self.register_buffer("head_t", head_t)  # (dim, V) or None
        model.setup_cache(1, max_seq_len)  # RoPE tables for max_seq_len positions
        self.caches = nn.ModuleList(ConcatKVCache() for _ in model.model.layers)
        for layer, cache in zip(model.model.layers, self.caches, strict=True):
            layer.self_attn.kv_cache = cache  # type: ignore[union-attr,assignment]
            layer.self_attn.fold_gqa = True  # type: ignore[union-attr,assignment]
        self.slot_names = list(slots)
        self.slots: list[InputLoRALinear] = []
        for name in self.slot_names:
            mod = model.get_submodule(name)
            if not isinstance(mod, InputLoRALinear):
                raise ValueError(f"{name} is not an InputLoRALinear; run insert_input_lora")
            self.slots.append(mod)

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...],
                lora: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        n_past = past[0].shape[2]
        input_pos = torch.arange(input_ids.shape[1]) + n_past  # (T,)
        for i, cache in enumerate(self.caches):
            assert isinstance(cache, ConcatKVCache)
            cache.past_k, cache.past_v = past[2 * i], past[2 * i + 1]
        for j, mod in enumerate(self.slots):
            mod.lora_a, mod.lora_b, mod.lora_scale = lora[3 * j], lora[3 * j + 1], lora[3 * j + 2]
        h = self.model.hidden_states(input_ids, input_pos)  # (1, T, dim)
        last = h[:, -1, :]  # (1, dim)
        head_t = self.head_t
        logits = last @ head_t if isinstance(head_t, torch.Tensor) else self.model.lm_head(last)
        presents: list[torch.Tensor] = []
        for cache in self.caches:
            assert isinstance(cache, ConcatKVCache)
            assert cache.present_k is not None and cache.present_v is not None
            presents += [cache.present_k, cache.present_v]
        return (logits, *presents)


def input_names(n_layers: int, slot_names: list[str]) -> list[str]:
    names = ["input_ids"]
    for i in range(n_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    for s in slot_names:
        names += [f"{s}.lora_a", f"{s}.lora_b", f"{s}.lora_scale"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def export_onnx(model: CausalLM, cfg: ExportConfig, out_dir: Path, slots: SlotShapes
                ) -> dict[str, Any]:
    """Export `model` (plain base + `InputLoRALinear` slots) to `out_dir/model.onnx`."""
    from torch.export import Dim

    model.eval()
    step = OnnxStep(model, slots, cfg.max_seq_len,
                    untie_head=cfg.quant is not ExportQuant.NONE).eval()
    mc = model.config
    n_layers = mc.n_layers
    ex_t, ex_p, ex_r = 2, 3, 2
    ids = torch.zeros(1, ex_t, dtype=torch.long)
    past = tuple(torch.zeros(1, mc.n_kv_heads, ex_p, mc.hd) for _ in range(2 * n_layers))
    lora: list[torch.Tensor] = []
    for d_in, d_out in slots.values():
        lora += [torch.zeros(ex_r, d_in), torch.zeros(d_out, ex_r), torch.zeros(1)]
    seq = Dim("seq", min=1, max=cfg.max_seq_len)
    n_past = Dim("past", min=0, max=cfg.max_seq_len)
    lora_dims: list[dict[int, Any]] = []
    for j in range(len(slots)):
        r = Dim(f"rank_{j}", min=1, max=4096)
        lora_dims += [{0: r}, {1: r}, {}]
    args: tuple[Any, ...] = (ids, past, tuple(lora))
    dyn: tuple[Any, ...] = ({1: seq}, tuple({2: n_past} for _ in past), tuple(lora_dims))
    if not slots:  # the exporter cannot match an empty tuple input with its shapes
        args, dyn = args[:2], dyn[:2]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_NAME
    t0 = time.perf_counter()
    with torch.no_grad():
        prog = torch.onnx.export(
            step, args, dynamo=True, dynamic_shapes=dyn,
            input_names=input_names(n_layers, list(slots)), output_names=output_names(n_layers),
            optimize=True, verbose=False,
        )
    assert prog is not None
    prog.save(str(path), external_data=False)
    t1 = time.perf_counter()
    if cfg.quant is not ExportQuant.NONE:
        quantize_onnx(path, cfg.quant, model.config.vocab_size)
    t2 = time.perf_counter()
    log.info("onnx: export %.1fs, quantize %.1fs", t1 - t0, t2 - t1)
    return {"program": ONNX_NAME, "seconds": {"export": t1 - t0, "quantize": t2 - t1}}


def quantize_onnx(path: Path, quant: ExportQuant, vocab_size: int = 0) -> None:
    """Rewrite constant-weight MatMuls of `path` as `MatMulNBits` in blocks of 32: int4 on
    the Q4_1 grid with float zero points (`exporters.onnx_int4`), int8 with ONNX Runtime's
    quantizer (asymmetric)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    if quant is ExportQuant.INT4:
        from exporters.onnx_int4 import quantize_matmuls_q4

        n = quantize_matmuls_q4(model, QUANT_BLOCK, head_n=vocab_size, accuracy_level=4)
        log.info("onnx int4: %d MatMuls on the Q4_1 grid", n)
        onnx.save_model(model, str(path), save_as_external_data=False)
        return
    bits = {ExportQuant.INT8: 8}[quant]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=False,
                             accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(path), use_external_data_format=False)
