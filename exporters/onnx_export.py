"""ONNX export: the decoder step graph (`exporters.onnx_graph`) written to `model.onnx`.

The graph is emitted op by op from the model's weights, with ONNX Runtime's fused LLM
operators (`GroupQueryAttention` with rotary and a KV buffer shared between past and
present, `SkipSimplifiedLayerNormalization`), rather than traced: a traced step
concatenated the cache into new tensors every step and ran rotary, RMSNorm and the
attention as dozens of small ops per block. LoRA factors stay graph inputs of symbolic
rank, so any adapter runs without re-export.

Weights: fp32 `MatMul` (`none`), `MatMulNBits` on Q8_0's grid (`int8`), or on GGUF's
Q4_1 grid with the exact per-block correction and the LM head on Q8_0's grid (`int4`,
`exporters.onnx_int4`); int8 activations in MatMulNBits (accuracy level 4). The LoRA
MatMuls read graph inputs and stay fp32.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edge_runtime.model import CausalLM
from exporters.config import ExportConfig
from exporters.onnx_graph import build_decoder
from exporters.transforms import SlotShapes

__all__ = ["export_onnx", "ONNX_NAME", "KV_LAYOUT"]

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
# the manifest's name for the graph's KV contract (the runner refuses other layouts)
KV_LAYOUT = "gqa-shared-buffer"


def export_onnx(model: CausalLM, cfg: ExportConfig, out_dir: Path, slots: SlotShapes
                ) -> dict[str, Any]:
    """Write `out_dir/model.onnx` for `model` (plain base + `InputLoRALinear` slots)."""
    import onnx

    t0 = time.perf_counter()
    proto = build_decoder(model, slots, cfg.quant, cfg.max_seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out_dir / ONNX_NAME), save_as_external_data=False)
    seconds = time.perf_counter() - t0
    log.info("onnx: graph built and saved in %.1fs", seconds)
    return {"program": ONNX_NAME, "kv_layout": KV_LAYOUT, "seconds": {"export": seconds}}
