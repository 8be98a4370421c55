"""Export front door: a loaded model (+ adapter) -> an export folder a runner can use alone.

Folder layout:
    export.json           manifest: format, quant, shapes, LoRA slots, base fingerprint
    tokenizer.json, tokenizer_config.json, generation_config.json
    model.pte + lora.ptd  (ExecuTorch)   or   model.onnx + adapter.safetensors (ONNX)

The passes run in order: dequantize_base -> strip_lora -> choose_slots ->
insert_lora_slots (ExecuTorch, padded rank) | insert_input_lora (ONNX, any rank).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from edge_runtime.adapter import Adapter
from edge_runtime.checkpoints import LoadedModel
from edge_runtime.errors import ConfigError, UserError
from edge_runtime.lora import get_adapter, lora_modules
from exporters.config import ExportConfig, ExportFormat
from exporters.transforms import (
    choose_slots,
    dequantize_base,
    insert_input_lora,
    insert_lora_slots,
    slot_tensors,
    strip_lora,
)

__all__ = ["export_model", "read_manifest", "MANIFEST", "ONNX_ADAPTER",
           "ExportFolderError"]

log = logging.getLogger(__name__)

MANIFEST = "export.json"
ONNX_ADAPTER = "adapter.safetensors"
MANIFEST_VERSION = 1


class ExportFolderError(UserError):
    """An export folder is missing files or was written by something else."""


def export_model(loaded: LoadedModel, cfg: ExportConfig, out_dir: str | Path,
                 adapter: Adapter | None = None, adapter_source: str | None = None
                 ) -> dict[str, Any]:
    """Export `loaded.model` with `adapter` (or the LoRA it carries) to `out_dir`.

    The model is transformed in place (take a copy first if you still need it eager).
    ExecuTorch slots get rank `max(cfg.max_rank, adapter's largest rank)`.
    Returns the manifest written to `out_dir/export.json`.
    """
    out = Path(out_dir)
    model = loaded.model
    if adapter is None and lora_modules(model):
        adapter = get_adapter(model)
    dequantize_base(model)
    strip_lora(model)
    if cfg.max_seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"--max-seq-len {cfg.max_seq_len} is above the model's context "
            f"({model.config.max_seq_len}); pass --max-seq-len {model.config.max_seq_len} or less"
        )
    adapter_rank = max((w.rank for w in (adapter or {}).values()), default=0)
    max_rank = max(cfg.max_rank, adapter_rank)
    with_lora = bool(adapter) or cfg.max_rank > 0
    slots = choose_slots(model, adapter, cfg.targets, cfg.depth) if with_lora else {}
    slot_tensors(adapter, slots, None)  # validates the adapter against the slots early
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.format is ExportFormat.EXECUTORCH:
        from exporters.executorch_export import export_executorch

        insert_lora_slots(model, slots, max_rank)
        info = export_executorch(model, cfg, out, adapter, slots)
    else:
        from exporters.onnx_export import export_onnx

        insert_input_lora(model, slots)
        info = export_onnx(model, cfg, out, slots)
        info["adapter_data"] = None
        if slots:
            save_file(slot_tensors(adapter, slots, None), str(out / ONNX_ADAPTER))
            info["adapter_data"] = ONNX_ADAPTER
    loaded.tokenizer.save(out)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "format": cfg.format.value,
        "quant": cfg.quant.value,
        "max_seq_len": cfg.max_seq_len,
        "max_rank": max_rank if cfg.format is ExportFormat.EXECUTORCH else None,
        "model_config": model.config.to_json(),
        "base_name": loaded.name,
        "base_fingerprint": loaded.fingerprint,
        "slots": {n: list(s) for n, s in slots.items()},
        "adapter_source": adapter_source,
        "export_seconds": time.perf_counter() - t0,
        **info,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("exported %s (%s, %s) to %s in %.1fs", loaded.name, cfg.format.value,
             cfg.quant.value, out, manifest["export_seconds"])
    return manifest


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, with a clear error if it is not one."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportFolderError(
            f"{path} not found; {export_dir} is not an export folder (make one with "
            "`edge-rt export MODEL --format executorch|onnx --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportFolderError(f"{path} is not valid JSON ({e}); re-run edge-rt export") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ExportFolderError(
            f"{path} has version {manifest.get('version')}, this runner reads "
            f"{MANIFEST_VERSION}; re-run edge-rt export"
        )
    return dict(manifest)
