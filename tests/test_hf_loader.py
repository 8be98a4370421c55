"""HF folders: write/read round trips, sharding, strict keys, refusals, GGUF parity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.checkpoints import load_model
from edge_runtime.checkpoints.hf import save_hf_folder
from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.tokenizer import Tokenizer

TOKENS = [257, 72, 105, 33, 258, 10, 1, 2, 3, 200, 255, 256, 319]


def _logits(model: CausalLM, tokens: list[int] = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


def test_round_trip_same_logits_fingerprint_and_tokenizer(tmp_path, tiny_lm):
    folder = save_hf_folder(tiny_lm, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied
    lm = load_model(str(folder))
    assert lm.model.config.to_json() == tiny_lm.model.config.to_json()
    assert torch.equal(_logits(lm.model), _logits(tiny_lm.model))
    assert lm.fingerprint == tiny_lm.fingerprint
    text = "<|im_start|>user\nhé 12<|im_end|>\n"
    assert lm.tokenizer.encode(text) == tiny_lm.tokenizer.encode(text)
    assert lm.tokenizer.eos_ids == tiny_lm.tokenizer.eos_ids
    assert lm.tokenizer.pad_id == tiny_lm.tokenizer.pad_id
    msgs = [{"role": "user", "content": "x"}]
    assert lm.tokenizer.chat_prompt(msgs) == tiny_lm.tokenizer.chat_prompt(msgs)


def test_sharded_untied_bf16_folder(tmp_path, tiny_lm):
    cfg = ModelConfig(**{**tiny_lm.model.config.to_json(), "tie_embeddings": False})
    model = CausalLM(cfg)
    folder = tmp_path / "sharded"
    save_hf_folder(type(tiny_lm)(model, tiny_lm.tokenizer, "", "x", "x"), folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    keys = sorted(bf16)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: bf16[k] for k in ks}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    lm = load_model(str(folder))
    assert not lm.model.config.tie_embeddings
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, bf16[name].float()), name


def _folder(tmp_path, tiny_lm):
    return save_hf_folder(tiny_lm, tmp_path / "hf")


def test_extra_key_is_refused(tmp_path, tiny_lm):
    folder = _folder(tmp_path, tiny_lm)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not use.*q_norm"):
        load_model(str(folder))


def test_missing_key_is_refused(tmp_path, tiny_lm):
    folder = _folder(tmp_path, tiny_lm)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 weights.*up_proj"):
        load_model(str(folder))


def test_wrong_shape_is_refused(tmp_path, tiny_lm):
    folder = _folder(tmp_path, tiny_lm)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(str(folder))


def test_unsupported_architecture_and_corrupt_files(tmp_path, tiny_lm):
    folder = _folder(tmp_path, tiny_lm)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*not supported"):
        load_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors"):
        load_model(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="never pickle"):
        load_model(str(folder))


def test_quantized_model_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="quant none"):
        save_hf_folder(load_model("tiny", "int8"), tmp_path / "q")


@pytest.mark.real_model
def test_real_gguf_and_its_hf_folder_give_identical_logits(real_lm, real_hf_folder):
    lm = load_model(str(real_hf_folder))
    assert lm.fingerprint == real_lm.fingerprint
    ids = real_lm.tokenizer.encode(real_lm.tokenizer.chat_prompt(
        [{"role": "user", "content": "What is the capital of France?"}]))
    assert lm.tokenizer.encode(lm.tokenizer.chat_prompt(
        [{"role": "user", "content": "What is the capital of France?"}])) == ids
    assert torch.equal(_logits(lm.model, ids), _logits(real_lm.model, ids))


def test_rope_parameters_of_transformers_5_are_read():
    from edge_runtime.checkpoints.hf import hf_config_to_model_config

    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    new = hf_config_to_model_config({**base, "rope_parameters": {"rope_theta": 5e5, **llama3}})
    old = hf_config_to_model_config({**base, "rope_theta": 5e5, "rope_scaling": llama3})
    assert new.rope_theta == old.rope_theta == 5e5
    assert new.rope_scaling == old.rope_scaling == llama3
    plain = hf_config_to_model_config(
        {**base, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}})
    assert plain.rope_theta == 1e5 and plain.rope_scaling is None


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama3-rope"])
def test_random_transformers_models_match(tmp_path, arch):
    """Independent reference: small random models built and saved by transformers."""
    import transformers

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
        ref = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # make biases and norms non-trivial
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    ref.eval().save_pretrained(str(tmp_path))
    Tokenizer.tiny().save(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.model.config.attention_bias == (arch == "qwen2")
    tokens = list(range(0, 300, 2))  # 150 positions: long enough for scaled RoPE to matter
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(_logits(lm.model, tokens), theirs, atol=1e-4, rtol=0)


def test_sliding_window_is_refused(tmp_path, tiny_lm):
    folder = _folder(tmp_path, tiny_lm)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        load_model(str(folder))
