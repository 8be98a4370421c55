"""Shared fixtures: the real SmolLM2-135M GGUF (pulled once, cached) and a GGUF writer.

`real_gguf` never skips: if the model cannot be pulled the test errors with the reason.
`write_gguf` writes a model in llama.cpp's layout (reversed shapes, Q/K rows permuted as
`convert_hf_to_gguf.py` does, quantized with `gguf.quants`) so the loader can be tested
on files whose contents the test controls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.model import CausalLM
from edge_runtime.tokenizer import Tokenizer

REAL_MODEL = "smollm2-135m"

_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


SENTIMENT_FIX = Path(__file__).parent / "datasets" / "fixtures" / "sentiment"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vendored sentiment slices split over 3 clients (no download): the simulated
    fleets' data in the simulator, transport, Flower and compare tests."""
    from edge_runtime.datasets.build import pull_dataset

    out = tmp_path_factory.mktemp("sent")
    pull_dataset("sentiment", out, n_clients=3, raw=SENTIMENT_FIX)
    return out


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the cache once."""
    from edge_runtime.checkpoints.pull import pull

    return pull(REAL_MODEL)


@pytest.fixture(scope="session")
def real_lm(real_gguf: Path) -> LoadedModel:
    """The real model in fp32, loaded once per session. Do not modify it in tests."""
    return load_model(str(real_gguf))


@pytest.fixture(scope="session")
def real_hf_folder(real_lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's weights (as loaded from the GGUF) written as a HF folder, once."""
    from edge_runtime.checkpoints.hf import save_hf_folder

    return save_hf_folder(real_lm, tmp_path_factory.mktemp("smol_hf"))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row order: per head, (2, hd/2) halves -> (hd/2, 2) pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[hf]
    _, _, idx, rest = hf.split(".", 3)
    return f"blk.{idx}.{_TO_GGUF_BLOCK[rest]}"


def write_gguf_file(path: Path, model: CausalLM, tok: Tokenizer, *, qtype: str = "F32",
                    arch: str | None = None, permute: bool | None = None, pre: str = "smollm",
                    extra_tensors: dict[str, np.ndarray] | None = None,
                    extra_meta: Callable[[object], None] | None = None,
                    raw: dict[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """Write `model` + `tok` as a GGUF file; 2-D weights in `qtype`, norms/biases in F32.

    `raw` replaces named GGUF tensors by given bytes of a given type (rows, bytes per row).
    """
    import gguf

    cfg = model.config
    arch = arch or cfg.arch
    permute = (arch == "llama") if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    backend = tok.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a.content for a in backend.get_added_tokens_decoder().values() if a.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([])
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    if extra_meta is not None:
        extra_meta(w)
    qt = gguf.GGMLQuantizationType[qtype]
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    for name, t in state.items():
        arr = t.detach().float().numpy().copy()
        if permute and name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.n_heads)
        elif permute and name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.n_kv_heads)
        if raw and _gguf_name(name) in raw:
            data, raw_type = raw[_gguf_name(name)]
            w.add_tensor(_gguf_name(name), data,
                         raw_dtype=gguf.GGMLQuantizationType[raw_type])
        elif arr.ndim == 2 and qt is not gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(name), arr)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def write_gguf() -> Callable[..., Path]:
    """The `write_gguf_file` function (see its docstring)."""
    return write_gguf_file


@pytest.fixture
def tiny_lm() -> LoadedModel:
    return load_model("tiny")

