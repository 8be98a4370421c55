"""Flags and steps shared by several subcommands (model loading, adapters)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from edge_runtime.config import QuantMode

if TYPE_CHECKING:
    from edge_runtime.checkpoints import LoadedModel

__all__ = ["add_model_args", "load_from_args", "apply_adapter_dir", "positive_int",
           "positive_float"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="GGUF file, Hugging Face folder, pulled name (smollm2-135m) or 'tiny'")
    p.add_argument("--quant", default="none", choices=[m.value for m in QuantMode],
                   help="weight-only quantization of the frozen base (default: none)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    from edge_runtime.checkpoints import load_model

    return load_model(args.model, QuantMode.parse(args.quant))


def apply_adapter_dir(loaded: LoadedModel, adapter_dir: str) -> None:
    """Load a PEFT adapter folder into the model, refusing one made for another base."""
    from edge_runtime.adapter_io import load_adapter
    from edge_runtime.lora import set_adapter

    adapter, _meta = load_adapter(adapter_dir, expect_fingerprint=loaded.fingerprint)
    set_adapter(loaded.model, adapter)
