"""A LoRA adapter as a LoRA GGUF that llama.cpp loads beside its base GGUF (`--lora`).

llama.cpp's adapter format (what its `convert_lora_to_gguf.py` writes and
`llama_adapter_lora_init` reads): metadata `general.type = "adapter"`,
`adapter.type = "lora"`, `adapter.lora.alpha`, the base's `general.architecture`; for
each adapted weight `W` of the base (GGUF name, e.g. `blk.29.attn_q.weight`) two tensors
`W.lora_a` with GGUF shape [d_in, r] and `W.lora_b` with [r, d_out] (numpy (r, d_in) and
(d_out, r): our `lora_a` and `lora_b` as they are). llama.cpp scales each pair by
alpha / r (r from the tensor), the rule of `lora.lora_scale`, so any rank and depth
works. The base GGUF of a `llama`-architecture model stores `attn_q` / `attn_k` rows in
llama.cpp's interleaved RoPE order (`checkpoints/gguf/loader.py` undoes it on load);
`lora_b` of q_proj / k_proj gets the same row permutation so the product lands on the
same rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edge_runtime.adapter import Adapter
from edge_runtime.checkpoints.gguf.loader import gguf_name, permute_qk
from edge_runtime.errors import AdapterMismatchError, CheckpointError
from edge_runtime.model import ModelConfig

__all__ = ["gguf_tensor_name", "write_lora_gguf"]

def gguf_tensor_name(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight` (the loader's name map)."""
    if not module.startswith("model.layers."):
        raise AdapterMismatchError(f"adapter module {module!r} is not a decoder linear")
    try:
        return gguf_name(f"{module}.weight")
    except CheckpointError:
        raise AdapterMismatchError(f"adapter module {module!r} has no llama.cpp tensor") from None


def write_lora_gguf(adapter: Adapter, cfg: ModelConfig, path: str | Path,
                    name: str = "edge-rt adapter") -> Path:
    """Write `adapter` (for a base of config `cfg`) as a llama.cpp LoRA GGUF at `path`.

    Raises:
        CheckpointError: the base's architecture has no llama.cpp LoRA mapping here.
        AdapterMismatchError: modules of different alpha (one alpha per file), or a module
            llama.cpp has no tensor for.
    """
    from gguf import GGUFWriter

    if cfg.arch not in ("llama", "qwen2"):
        raise CheckpointError(f"LoRA GGUF export supports llama and qwen2 bases, not "
                              f"{cfg.arch!r}")
    if not adapter:
        raise AdapterMismatchError("the adapter is empty; nothing to export")
    alphas = {float(w.alpha) for w in adapter.values()}
    if len(alphas) != 1:
        raise AdapterMismatchError(f"a LoRA GGUF holds one alpha; the adapter has {sorted(alphas)}")
    alpha = alphas.pop()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), cfg.arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for module, w in sorted(adapter.items()):
        base = gguf_tensor_name(module)
        b = w.lora_b.detach().float().cpu()
        if cfg.arch == "llama" and base.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.n_heads if "attn_q" in base else cfg.n_kv_heads
            b = permute_qk(b, heads)
        a_np = np.ascontiguousarray(w.lora_a.detach().float().cpu().numpy())  # (r, d_in)
        b_np = np.ascontiguousarray(b.numpy())  # (d_out, r)
        if not (math.isfinite(float(np.abs(a_np).sum())) and
                math.isfinite(float(np.abs(b_np).sum()))):
            raise AdapterMismatchError(f"{module} has non-finite values")
        writer.add_tensor(f"{base}.lora_a", a_np)
        writer.add_tensor(f"{base}.lora_b", b_np)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
