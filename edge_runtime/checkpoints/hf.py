"""Hugging Face model folders: read (`config.json`, safetensors, `tokenizer.json`) and write.

Supported: `LlamaForCausalLM` (SmolLM2, Llama 2/3) and `Qwen2ForCausalLM`. Every tensor
in the files is consumed or refused: nothing is dropped silently. The writer produces a
folder that `transformers` and PEFT load as-is (fp32 weights), which is how adapters
made here are checked against PEFT.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edge_runtime.checkpoints.weights import TensorHook, base_state_dict, empty_model, load_weights
from edge_runtime.config import QuantMode
from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.tokenizer import Tokenizer, read_json_object

if TYPE_CHECKING:
    from edge_runtime.checkpoints.loaded import LoadedModel

__all__ = ["load_hf_folder", "hf_config_to_model_config", "save_hf_folder", "SUPPORTED"]

# HF architecture -> (our arch name, model_type)
SUPPORTED = {"LlamaForCausalLM": ("llama", "llama"), "Qwen2ForCausalLM": ("qwen2", "qwen2")}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


def hf_config_to_model_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` from a HF `config.json` dict."""
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise CheckpointError(
            f"{where}: architecture {archs or cfg.get('model_type')} is not supported "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported")
    try:
        n_heads = int(cfg["num_attention_heads"])
        # transformers >= 5 writes `rope_parameters` {rope_theta, rope_type, ...}; older
        # versions `rope_theta` and `rope_scaling` at the top level.
        rope_params: dict[str, Any] = dict(cfg.get("rope_parameters") or {})
        theta_default: Any = rope_params.pop("rope_theta", 10000.0)
        rope_theta = float(cfg.get("rope_theta", theta_default))
        rope_scaling = cfg.get("rope_scaling") or rope_params or None
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            attention_bias=arch[0] == "qwen2" or bool(cfg.get("attention_bias", False)),
            arch=arch[0],
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks the key {e.args[0]!r}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder} has no model.safetensors or model.safetensors.index.json; "
        "only safetensors checkpoints are read (never pickle .bin files)"
    )


def _stream_tensors(files: list[Path], cfg: ModelConfig, head: list[torch.Tensor]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) pairs read one at a time; a tied model's stray `lm_head.weight`
    is set aside in `head` for a check against the embedding."""
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} (listed in the shard index) is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    if cfg.tie_embeddings and key == "lm_head.weight":
                        head.append(f.get_tensor(key).to(torch.float32))
                        continue
                    yield key, f.get_tensor(key).to(torch.float32)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def load_hf_folder(folder: str | Path, *, quant: QuantMode = QuantMode.NONE,
                   on_tensor: TensorHook | None = None) -> tuple[CausalLM, Tokenizer]:
    """Model (fp32, or its linears quantized as they load) and tokenizer from a HF folder.

    `on_tensor(name, fp32 tensor)` sees each weight before quantization.
    """
    folder = Path(folder)
    cfg = hf_config_to_model_config(read_json_object(folder / "config.json", required=True),
                                    str(folder / "config.json"))
    files = _weight_files(folder)
    tok = Tokenizer.from_tokenizer_json(folder)
    model = empty_model(cfg)
    head: list[torch.Tensor] = []
    load_weights(model, _stream_tensors(files, cfg, head), where=str(folder), quant=quant,
                 on_tensor=on_tensor)
    if head and not torch.equal(head[0], model.model.embed_tokens.weight):
        raise CheckpointError(
            f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
            "the embedding; fix config.json"
        )
    return model, tok


def _hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    arch = next(a for a, (ours, _) in SUPPORTED.items() if ours == cfg.arch)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": SUPPORTED[arch][1],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.hidden_dim,
        "head_dim": cfg.hd,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    }
    if cfg.arch == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    return out


def save_hf_folder(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write a loaded model (fp32 base, LoRA ignored) and its tokenizer as a HF folder.

    Raises:
        ValueError: the model is quantized (load it with quant none to write it).
    """
    model, tok = loaded.model, loaded.tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in base_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_hf_config(model.config, tok), indent=2))
    tok.save(out, model_max_length=model.config.max_seq_len)
    return out
