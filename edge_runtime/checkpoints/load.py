"""One front door for model checkpoints: `load_model(spec, quant)`.

`spec` is a GGUF file, a Hugging Face folder, a pulled name (`smollm2-135m`, see
`edge-rt pull`) or `tiny` (a small random model of the same architecture with a
byte-level tokenizer, seeded, for tests and dry runs). The base is frozen, its
fingerprint taken on the full-precision weights, then its linears are quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edge_runtime.checkpoints.fingerprint import FingerprintBuilder, base_fingerprint
from edge_runtime.checkpoints.loaded import LoadedModel
from edge_runtime.checkpoints.weights import TensorHook
from edge_runtime.config import QuantMode
from edge_runtime.errors import CheckpointError
from edge_runtime.memory import after_loading, fix_mmap_threshold
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.quant import quantize_linears
from edge_runtime.tokenizer import Tokenizer

__all__ = ["LoadedModel", "load_model", "tiny_config", "tiny_model", "TINY_SEED"]

log = logging.getLogger(__name__)

TINY_SEED = 0
GGUF_MAGIC = b"GGUF"


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       hidden_dim=128, max_seq_len=512)


def tiny_model(seed: int = TINY_SEED) -> CausalLM:
    """The `tiny` model: weights uniform with std 0.02 from a seeded generator, norms at 1.

    Drawn tensor by tensor in sorted name order from one explicit `torch.Generator`,
    so it does not depend on nn.Linear's init. `torch.rand` (not `randn`, whose
    vectorised kernel gives different bits on x86_64 and arm64) keeps it bit-identical
    across architectures, so an x86 aggregator and an arm64 device agree on its
    fingerprint.
    """
    model = CausalLM(tiny_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                half_width = 0.02 * 3**0.5  # U(-a, a) has std a / sqrt(3)
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * half_width)
    return model


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _resolve(spec: str) -> tuple[Path, str]:
    """(path, display name) of a checkpoint spec other than `tiny`."""
    from edge_runtime.checkpoints import pull

    if spec in pull.KNOWN_MODELS:
        return pull.ensure(spec), spec
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(["tiny", *pull.KNOWN_MODELS])
        raise CheckpointError(
            f"model {spec!r} not found: give a GGUF file, a HF folder, or one of: {known}"
        )
    return path, path.stem if path.is_file() else path.name


def _load_path(path: Path, quant: QuantMode, on_tensor: TensorHook) -> tuple[CausalLM, Tokenizer]:
    if path.is_dir():
        from edge_runtime.checkpoints.hf import load_hf_folder

        return load_hf_folder(path, quant=quant, on_tensor=on_tensor)
    if _is_gguf(path):
        from edge_runtime.checkpoints.gguf.loader import load_gguf

        return load_gguf(path, quant=quant, on_tensor=on_tensor)
    raise CheckpointError(
        f"{path} is neither a GGUF file (no GGUF magic) nor a HF folder; "
        "pass a .gguf file or a folder with config.json"
    )


def load_model(spec: str, quant: QuantMode | str = QuantMode.NONE) -> LoadedModel:
    """Load a frozen base model and its tokenizer; quantize its linears if asked.

    Checkpoints stream in tensor by tensor: the fingerprint is taken on each fp32 tensor
    and, with `quant`, each linear is quantized as soon as it is loaded (same result as
    `quantize_linears` on the fp32 model, without ever holding the fp32 model).

    Raises:
        CheckpointError: missing/corrupt file, unsupported architecture or tensor type.
        ConfigError: unknown quantization mode.
    """
    mode = QuantMode.parse(quant)
    fix_mmap_threshold()
    if spec == "tiny":
        model, tok, name, source = tiny_model(), Tokenizer.tiny(), "tiny", "tiny"
        fingerprint = base_fingerprint(model)
        quantize_linears(model, mode)
    else:
        path, name = _resolve(spec)
        source = str(path)
        builder = FingerprintBuilder()
        model, tok = _load_path(path, mode, builder.add)
        fingerprint = builder.hexdigest(model.config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    after_loading()
    log.debug("loaded %s from %s (fingerprint %s, quant %s)", name, source, fingerprint,
              mode.value)
    return LoadedModel(model=model, tokenizer=tok, fingerprint=fingerprint, name=name,
                       source=source)
