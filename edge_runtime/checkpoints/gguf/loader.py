"""Load a Llama-family GGUF file (llama.cpp's format) into `CausalLM` + `Tokenizer`.

Architectures: `llama` (SmolLM2, Llama 2/3) and `qwen2` (q/k/v biases). The header is
parsed by `gguf_file.read_gguf`; tensors are dequantized to fp32 one at a time with
`gguf.quants.dequantize` and streamed into the model (`state_io.load_weights`). GGUF lists shapes fastest-dim first
(`token_embd` is [dim, vocab] in the file), so arrays come back as (vocab, dim) rows.

llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows
of `attn_q`/`attn_k` within each head from HF's rotate-half layout (first half, second
half) to llama.cpp's interleaved pairs: view (n_head, 2, head_dim/2, d), swap axes 1 and
2. We undo it, (n_head, head_dim/2, 2, d) -> (n_head, 2, head_dim/2, d), because our RoPE
is HF's rotate-half. Qwen2 is converted without that permutation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.checkpoints.gguf.file import GGUFFile, GGUFTensor, read_gguf
from edge_runtime.checkpoints.gguf.rope import llama3_scaling_from_freq_factors
from edge_runtime.checkpoints.gguf.tokenizer import gguf_field, tokenizer_from_gguf
from edge_runtime.checkpoints.weights import TensorHook, empty_model, load_weights
from edge_runtime.config import QuantMode
from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.tokenizer import Tokenizer

__all__ = ["load_gguf", "open_gguf", "gguf_config", "dequantize_tensor", "unpermute_qk",
           "permute_qk", "gguf_name",
           "SUPPORTED_TYPES", "SUPPORTED_ARCHS"]

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2")
DEQUANT_CHUNK_BYTES = 4 << 20  # raw GGUF bytes dequantized at a time
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> HF name (`{i}` = block index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed header of a GGUF file (tensor data memory-mapped), or a CheckpointError."""
    try:
        return read_gguf(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; re-download it (edge-rt pull) or convert the model again"
        ) from None


def _required(reader: Any, key: str) -> Any:
    value = gguf_field(reader, key)
    if value is None:
        raise CheckpointError(f"GGUF metadata key {key!r} is missing; the file is incomplete")
    return value


def _f32(value: Any) -> float:
    """GGUF stores floats as f32: take the shortest decimal that round-trips (1e-05, not
    9.99999974e-06) so configs, and fingerprints, match the HF config of the same model."""
    return float(str(np.float32(value)))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: (n_head*hd, d) interleaved -> HF rotate-half order."""
    rows, d = w.shape
    hd = rows // n_head
    return (w.reshape(n_head, hd // 2, 2, d)  # (H, hd/2, 2, d): llama.cpp pairs
             .transpose(1, 2)  # (H, 2, hd/2, d): halves
             .reshape(rows, d))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `unpermute_qk`: HF rotate-half rows -> llama.cpp's interleaved pairs,
    (H, 2, hd/2, d) -> (H, hd/2, 2, d)."""
    rows, d = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, d).transpose(1, 2).reshape(rows, d)


def _check_type(t: Any) -> Any:
    from gguf import GGMLQuantizationType

    qtype = GGMLQuantizationType(int(t.tensor_type))
    if qtype.name not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"GGUF tensor {t.name} has type {qtype.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the model to one of them"
        )
    return qtype


def _shape(t: GGUFTensor) -> tuple[int, ...]:
    return t.shape  # numpy order (GGUF lists dims fastest first; read_gguf reversed them)


def dequantize_tensor(t: Any) -> np.ndarray:
    """One GGUF tensor (a `ReaderTensor`) as a writable fp32 array in numpy order."""
    from gguf.quants import dequantize

    qtype = _check_type(t)
    shape = _shape(t)
    rows = t.data  # uint8 (rows, bytes per row)
    n = int(np.prod(shape))
    if rows.shape[0] == 0 or n % rows.shape[0] != 0:
        raise CheckpointError(f"GGUF tensor {t.name}: {rows.shape[0]} rows for shape {shape}")
    # Row chunks into one fp32 array: dequantizing a large tensor (the 49,152-row
    # embedding) whole makes several full-size temporaries, which set the loading peak.
    out = np.empty((rows.shape[0], n // rows.shape[0]), dtype=np.float32)
    step = max(1, DEQUANT_CHUNK_BYTES // max(rows.shape[1], 1))
    for i in range(0, rows.shape[0], step):
        part = dequantize(rows[i:i + step], qtype)
        if part.size != out[i:i + step].size:
            raise CheckpointError(f"GGUF tensor {t.name}: {part.size} values in rows "
                                  f"{i}..{i + step}, expected {out[i:i + step].size}")
        out[i:i + step] = part.reshape(out[i:i + step].shape)
    return out.reshape(shape)


def _hf_tensors(reader: Any, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) pairs, dequantized one at a time, Q/K rows un-permuted."""
    permute = cfg.arch == "llama"
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = _hf_name(t.name)
        w = torch.from_numpy(dequantize_tensor(t))
        if permute and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif permute and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        yield name, w


def gguf_config(reader: Any, shapes: dict[str, tuple[int, ...]],
                rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """The `ModelConfig` described by the GGUF metadata and tensor shapes (numpy order)."""
    arch = str(_required(reader, "general.architecture"))
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHS)})"
        )

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        return _required(reader, full) if default is None else gguf_field(reader, full, default)

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if "token_embd.weight" not in shapes:
        raise CheckpointError("GGUF file has no token_embd.weight tensor")
    vocab = shapes["token_embd.weight"][0]
    theta = _f32(key("rope.freq_base", 10000.0))
    scaling_type = str(key("rope.scaling.type", "none"))
    rope_scaling: dict[str, Any] | None = None
    if rope_freqs is not None:
        orig = int(key("rope.scaling.original_context_length", 8192))
        rope_scaling = llama3_scaling_from_freq_factors(rope_freqs, theta, head_dim, orig)
    elif scaling_type not in ("none", ""):
        raise CheckpointError(
            f"GGUF rope scaling type {scaling_type!r} is not supported (only Llama-3 scaling, "
            "stored as rope_freqs)"
        )
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in shapes,
        head_dim=head_dim,
        attention_bias="blk.0.attn_q.bias" in shapes,
        arch=arch,
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise CheckpointError(
        f"GGUF tensor {gguf_name!r} is not part of a supported Llama-family model"
    )


_HF_BLOCK_NAMES = {hf: g for g, hf in _BLOCK_NAMES.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str:
    """The inverse of `_hf_name`: `model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight` (the names llama.cpp gives the same tensors)."""
    for g, hf in _GLOBAL_NAMES.items():
        if hf == hf_name:
            return g
    m = _HF_BLOCK_RE.match(hf_name)
    if m and m.group(2) in _HF_BLOCK_NAMES:
        return f"blk.{m.group(1)}.{_HF_BLOCK_NAMES[m.group(2)]}"
    raise CheckpointError(f"{hf_name!r} has no GGUF tensor name in a Llama-family model")


def load_gguf(path: str | Path, *, quant: QuantMode = QuantMode.NONE,
              on_tensor: TensorHook | None = None) -> tuple[CausalLM, Tokenizer]:
    """Model (HF layout; fp32, or its linears quantized as they load) and tokenizer.

    `on_tensor(name, fp32 tensor)` sees each weight before quantization.

    Raises:
        CheckpointError: unreadable file, unsupported architecture, tensor type or
            tokenizer, a tensor the model does not have, or one it lacks.
    """
    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    for t in reader.tensors:  # fail fast, before anything big is allocated
        _check_type(t)
        if t.name != ROPE_FREQS:
            _hf_name(t.name)
    rope_freqs = dequantize_tensor(by_name[ROPE_FREQS]) if ROPE_FREQS in by_name else None
    shapes = {name: _shape(t) for name, t in by_name.items() if name != ROPE_FREQS}
    cfg = gguf_config(reader, shapes, rope_freqs)
    tok = tokenizer_from_gguf(reader)
    model = empty_model(cfg)
    load_weights(model, _hf_tensors(reader, cfg), where=str(path), quant=quant,
                 on_tensor=on_tensor)
    log.debug("GGUF %s: %s, %d blocks, dim %d", path, cfg.arch, cfg.n_layers, cfg.dim)
    return model, tok
