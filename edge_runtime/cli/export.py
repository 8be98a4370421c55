"""`edge-rt export`: write an ExecuTorch or ONNX export folder for `edge-rt generate --backend`."""

from __future__ import annotations

import argparse
import logging
import sys

from edge_runtime.cli.common import positive_int
from edge_runtime.config import parse_targets

log = logging.getLogger("edge_runtime.export")

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export MODEL (+ adapter) to ExecuTorch (.pte + lora.ptd), ONNX, or the "
        "adapter as a llama.cpp LoRA GGUF",
        description="Export a base model and a LoRA adapter. ExecuTorch: LoRA slots of rank "
                    "--max-rank (lower ranks zero-padded) with the adapter in lora.ptd; ONNX: "
                    "adapters of any rank as graph inputs. A new adapter needs no re-export. "
                    "gguf-lora: the adapter alone as DIR/lora.gguf, which llama.cpp loads "
                    "beside the base GGUF (llama-cli -m BASE.gguf --lora DIR/lora.gguf).")
    p.add_argument("model", metavar="MODEL",
                   help="GGUF file, Hugging Face folder, pulled name (smollm2-135m) or 'tiny'")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder to export with")
    p.add_argument("--format", required=True, choices=["executorch", "onnx", "gguf-lora"])
    p.add_argument("--quant", default="none", choices=["none", "8da4w", "8da8w", "int8", "int4"],
                   help="base weights: 8da4w|8da8w (executorch), int8|int4 (onnx MatMulNBits)")
    p.add_argument("--max-seq-len", type=positive_int, default=512,
                   help="KV-cache length: prompt + generated tokens (default 512)")
    p.add_argument("--max-rank", type=int, default=0,
                   help="LoRA slot rank (executorch; default: the adapter's largest rank). "
                        "Without --adapter, >0 adds empty slots for adapters to come")
    p.add_argument("--targets", default="q,v",
                   help="slot modules per block when no --adapter is given (default q,v)")
    p.add_argument("--depth", type=int, default=0,
                   help="slots on the top N blocks when no --adapter is given (0 = all)")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.adapter_io import load_adapter
    from edge_runtime.checkpoints import load_model
    from exporters.config import ExportConfig, ExportFormat, ExportQuant
    from exporters.export import export_model

    if args.format == "gguf-lora":
        return _gguf_lora(args)
    cfg = ExportConfig(format=ExportFormat(args.format), quant=ExportQuant(args.quant),
                       max_seq_len=args.max_seq_len, max_rank=args.max_rank,
                       targets=parse_targets(args.targets), depth=args.depth)
    loaded = load_model(args.model)
    adapter = None
    if args.adapter:
        adapter, _meta = load_adapter(args.adapter, expect_fingerprint=loaded.fingerprint)
    manifest = export_model(loaded, cfg, args.out, adapter=adapter, adapter_source=args.adapter)
    log.info("wrote %s: %s, %d LoRA slots, %.1fs", args.out, manifest["program"],
             len(manifest["slots"]), manifest["export_seconds"])
    sys.stdout.write(f"{args.out}\n")
    return 0


def _gguf_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_runtime.adapter_io import load_adapter
    from edge_runtime.checkpoints import load_model
    from edge_runtime.errors import ConfigError
    from exporters.gguf_lora import write_lora_gguf

    if not args.adapter:
        raise ConfigError("--format gguf-lora exports an adapter: pass --adapter DIR")
    loaded = load_model(args.model)
    adapter, _meta = load_adapter(args.adapter, expect_fingerprint=loaded.fingerprint)
    path = write_lora_gguf(adapter, loaded.model.config, Path(args.out) / "lora.gguf",
                           name=f"{loaded.name} + {Path(args.adapter).name}")
    log.info("wrote %s (%d modules) for base %s", path, len(adapter), loaded.name)
    sys.stdout.write(f"{path}\n")
    return 0
