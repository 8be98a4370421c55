"""Export settings: one typed config, validated on construction.

(Kept beside the exporters rather than in `edge_runtime/config.py` so the core package
does not depend on the export extras; it imports nothing from them.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge_runtime.errors import ConfigError

__all__ = ["ExportFormat", "ExportQuant", "ExportConfig", "FORMAT_QUANTS"]


class ExportFormat(str, enum.Enum):
    EXECUTORCH = "executorch"
    ONNX = "onnx"


class ExportQuant(str, enum.Enum):
    """Base-weight quantization of an export.

    `8da4w`/`8da8w`: torchao int8 dynamic activations with int4 (groups of 32, symmetric)
    or int8 (per output channel) weights, what XNNPACK runs in ExecuTorch.
    `int4`/`int8`: ONNX Runtime `MatMulNBits` weights (asymmetric, blocks of 32).
    """

    NONE = "none"
    DA8W4 = "8da4w"
    DA8W8 = "8da8w"
    INT8 = "int8"
    INT4 = "int4"


FORMAT_QUANTS: dict[ExportFormat, tuple[ExportQuant, ...]] = {
    ExportFormat.EXECUTORCH: (ExportQuant.NONE, ExportQuant.DA8W4, ExportQuant.DA8W8),
    ExportFormat.ONNX: (ExportQuant.NONE, ExportQuant.INT8, ExportQuant.INT4),
}


def _parse(enum_cls: type[enum.Enum], value: object, what: str) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        choices = "|".join(str(m.value) for m in enum_cls)
        raise ConfigError(f"unknown {what} {value!r}; choose one of {choices}") from None


@dataclass
class ExportConfig:
    """What to export and how.

    Attributes:
        format: `executorch` (.pte + adapter .ptd) or `onnx` (.onnx, adapters as inputs).
        quant: base-weight quantization; see `ExportQuant` and `FORMAT_QUANTS`.
        max_seq_len: KV-cache length (prompt + generated tokens).
        max_rank: LoRA slot rank of the ExecuTorch program (adapters of lower rank are
            zero-padded; 0 = no LoRA slots). ONNX takes any rank at run time.
        targets: LoRA slot modules per block when no adapter is given.
        depth: LoRA slots on the top `depth` blocks when no adapter is given (0 = all).
    """

    format: ExportFormat = ExportFormat.EXECUTORCH
    quant: ExportQuant = ExportQuant.NONE
    max_seq_len: int = 512
    max_rank: int = 0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    depth: int = 0

    def __post_init__(self) -> None:
        fmt = _parse(ExportFormat, self.format, "export format")
        quant = _parse(ExportQuant, self.quant, "export quantization")
        assert isinstance(fmt, ExportFormat) and isinstance(quant, ExportQuant)
        self.format, self.quant = fmt, quant
        if quant not in FORMAT_QUANTS[fmt]:
            ok = "|".join(q.value for q in FORMAT_QUANTS[fmt])
            raise ConfigError(
                f"--quant {quant.value} is not available for --format {fmt.value}; use {ok}"
            )
        if self.max_seq_len < 8:
            raise ConfigError(f"--max-seq-len must be at least 8, got {self.max_seq_len}")
        if self.max_rank < 0:
            raise ConfigError(f"--max-rank must be >= 0, got {self.max_rank}")
        if self.depth < 0:
            raise ConfigError(f"--depth must be >= 0, got {self.depth}")
