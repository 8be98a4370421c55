"""What loading a checkpoint gives: the frozen base model, its tokenizer, its fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.model import CausalLM
from edge_runtime.tokenizer import Tokenizer

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer.

    Attributes:
        model: the decoder (eval mode, every parameter frozen, linears maybe quantized).
        tokenizer: its tokenizer and chat template.
        fingerprint: `base_fingerprint` of the full-precision base weights.
        name: short display name (`smollm2-135m`, `tiny`, the file stem).
        source: where it came from (a path, or `tiny`).
    """

    model: CausalLM
    tokenizer: Tokenizer
    fingerprint: str
    name: str
    source: str
