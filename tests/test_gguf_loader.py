"""GGUF loading: hand-decoded blocks, Q/K un-permutation, round trips, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.checkpoints import load_model, tiny_config, tiny_model
from edge_runtime.checkpoints.gguf.loader import dequantize_tensor, open_gguf, unpermute_qk
from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.tokenizer import Tokenizer

PROMPT = [257, 72, 105, 33, 258, 10, 1, 2, 3, 200, 255, 256]


def _logits(model: CausalLM, tokens: list[int] = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


# --- hand decoding of the real file's blocks ------------------------------------------
def _f16(raw: np.ndarray, offset: int) -> float:
    return float(np.frombuffer(raw[offset:offset + 2].tobytes(), dtype="<f2")[0])


def _q4_1_block_by_hand(raw: np.ndarray) -> np.ndarray:
    """20 bytes: scale d (f16), min m (f16), 16 bytes of nibbles.

    Value j (0..15) is low nibble of byte j, value j+16 the high nibble; x = q * d + m.
    """
    d, m = _f16(raw, 0), _f16(raw, 2)
    out = np.empty(32)
    for j in range(16):
        byte = int(raw[4 + j])
        out[j] = (byte & 0x0F) * d + m
        out[j + 16] = (byte >> 4) * d + m
    return out


def _q8_0_block_by_hand(raw: np.ndarray) -> np.ndarray:
    """34 bytes: scale d (f16), 32 signed bytes; x = q * d."""
    d = _f16(raw, 0)
    return np.array([int(np.int8(np.uint8(b))) * d for b in raw[2:34]])


@pytest.mark.real_model
def test_real_blocks_match_hand_decoding(real_gguf):
    from gguf import GGMLQuantizationType

    reader = open_gguf(real_gguf)
    by_name = {t.name: t for t in reader.tensors}
    ours = {name: dequantize_tensor(by_name[name])
            for name in ("blk.0.ffn_down.weight", "token_embd.weight")}
    cases = [("blk.0.ffn_down.weight", "Q4_1", 20, _q4_1_block_by_hand),
             ("token_embd.weight", "Q8_0", 34, _q8_0_block_by_hand)]
    for name, qtype, block_bytes, by_hand in cases:
        t = by_name[name]
        assert GGMLQuantizationType(t.tensor_type).name == qtype
        raw = np.asarray(t.data)  # (rows, bytes per row)
        rows, cols = ours[name].shape
        assert raw.shape == (rows, cols // 32 * block_bytes)
        for row, blk in [(0, 0), (1, 3), (rows // 2, 7), (rows - 1, cols // 32 - 1)]:
            want = by_hand(raw[row, blk * block_bytes:(blk + 1) * block_bytes])
            got = ours[name][row, blk * 32:(blk + 1) * 32]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            assert np.abs(want).max() > 0


@pytest.mark.real_model
def test_real_model_config_and_weights(real_lm):
    cfg = real_lm.model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.hidden_dim) == (49152, 576, 30, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_seq_len == 8192
    assert real_lm.model.lm_head.weight is real_lm.model.model.embed_tokens.weight
    tok = real_lm.tokenizer
    assert tok.vocab_size == 49152 and tok.token_to_id("<|im_start|>") == 1
    assert {0, 2} <= tok.eos_ids and not tok.add_bos
    assert len(tok.encode("2024")) == 4  # smollm pre-tokenizer: one token per digit


# --- permutation -------------------------------------------------------------------
@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    hd, d = 8, 5
    w = torch.randn(n_head * hd, d)
    # convert_hf_to_gguf: per head, rows (half, i) -> (i, half), written out by index.
    permuted = torch.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(hd // 2):
                permuted[h * hd + 2 * i + half] = w[h * hd + half * hd // 2 + i]
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


# --- synthetic files ---------------------------------------------------------------
def test_f32_round_trip_is_exact_and_keeps_the_fingerprint(tmp_path, write_gguf, tiny_lm):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), Tokenizer.tiny())
    lm = load_model(str(path))
    assert lm.model.config.to_json() == {**tiny_config().to_json()}
    assert torch.equal(_logits(lm.model), _logits(tiny_lm.model))
    assert lm.fingerprint == tiny_lm.fingerprint  # same weights, another container
    text = "<|im_start|>user\nhé 12<|im_end|>\n"
    assert lm.tokenizer.encode(text) == tiny_lm.tokenizer.encode(text)
    assert lm.tokenizer.eos_ids == tiny_lm.tokenizer.eos_ids
    assert lm.tokenizer.chat_prompt([{"role": "user", "content": "x"}]) == \
        tiny_lm.tokenizer.chat_prompt([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4), ("F16", 11),
                                        ("BF16", 8)])
def test_quantized_weights_within_their_step(tmp_path, write_gguf, qtype, bits):
    model = tiny_model()
    lm = load_model(str(write_gguf(tmp_path / "q.gguf", model, Tokenizer.tiny(), qtype=qtype)))
    ref = dict(model.named_parameters())
    for name, p in lm.model.named_parameters():
        if p.dim() != 2:
            assert torch.equal(p, ref[name])
            continue
        err = (p - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert 0 < err <= scale * 2.0 ** (1 - bits) + 1e-7, (name, err)


def _q4_k_block_by_hand(raw: np.ndarray) -> np.ndarray:
    """144 bytes: d, dmin (f16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.

    Eight sub-blocks of 32 values: x = d * scale_j * q - dmin * min_j (ggml's Q4_K).
    """
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc = [int(b) for b in raw[4:16]]
    qs = [int(b) for b in raw[16:144]]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = []
    for chunk in range(4):  # 64 values each: low nibbles then high nibbles of 32 bytes
        q = qs[chunk * 32:(chunk + 1) * 32]
        s1, m1 = scale_min(2 * chunk)
        s2, m2 = scale_min(2 * chunk + 1)
        out += [d * s1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * s2 * (b >> 4) - dmin * m2 for b in q]
    return np.array(out)


_K_BLOCK = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}


def _random_k_bytes(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant rows with finite, small f16 scales at the block's scale offsets."""
    size, scale_offsets = _K_BLOCK[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        scales = rng.uniform(0.001, 0.01, size=(rows, cols // 256)).astype("<f2")
        raw[..., off:off + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
    return raw.reshape(rows, -1)


def test_k_quants_load_and_q4_k_matches_hand_decoding(tmp_path, write_gguf):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    cfg = ModelConfig(vocab_size=16, dim=256, n_layers=1, n_heads=4, n_kv_heads=2,
                      hidden_dim=256, max_seq_len=64)
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    raw = {name: (_random_k_bytes(256, 256, qtype, rng), qtype) for name, qtype in [
        ("blk.0.ffn_down.weight", "Q4_K"), ("blk.0.ffn_up.weight", "Q5_K"),
        ("blk.0.ffn_gate.weight", "Q6_K")]}
    lm = load_model(str(write_gguf(tmp_path / "k.gguf", model, Tokenizer.tiny(), raw=raw)))
    mlp = lm.model.model.layers[0].mlp
    loaded = {"blk.0.ffn_down.weight": mlp.down_proj.weight,
              "blk.0.ffn_up.weight": mlp.up_proj.weight,
              "blk.0.ffn_gate.weight": mlp.gate_proj.weight}
    for name, (data, qtype) in raw.items():
        ref = dequantize(data, GGMLQuantizationType[qtype])
        np.testing.assert_array_equal(loaded[name].numpy(), ref)
        assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    down = loaded["blk.0.ffn_down.weight"].numpy()
    for row in (0, 100, 255):
        np.testing.assert_allclose(down[row], _q4_k_block_by_hand(raw["blk.0.ffn_down.weight"][0][row]),
                                   rtol=1e-6, atol=1e-6)


def test_unsupported_tensor_type_is_named(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "q5.gguf", tiny_model(), Tokenizer.tiny(), qtype="Q5_0")
    with pytest.raises(CheckpointError, match=r"token_embd.weight has type Q5_0.*re-quantize"):
        load_model(str(path))


def test_unsupported_architecture(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "phi.gguf", tiny_model(), Tokenizer.tiny(), arch="phi3",
                      permute=True)
    with pytest.raises(CheckpointError, match="architecture 'phi3' is not supported"):
        load_model(str(path))


def test_unknown_pre_tokenizer(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "pre.gguf", tiny_model(), Tokenizer.tiny(), pre="mystery")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'mystery'"):
        load_model(str(path))


def test_truncated_file(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "t.gguf", tiny_model(), Tokenizer.tiny())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.gguf"):
        load_model(str(path))


def test_qwen2_biases_and_no_permutation(tmp_path, write_gguf):
    cfg = ModelConfig(**{**tiny_config().to_json(), "attention_bias": True, "arch": "qwen2",
                         "rope_theta": 1e6})
    model = CausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    lm = load_model(str(write_gguf(tmp_path / "qwen.gguf", model, Tokenizer.tiny())))
    assert lm.model.config.attention_bias and lm.model.config.arch == "qwen2"
    assert torch.equal(_logits(lm.model), _logits(model))


def _llama3_divisors(theta: float, hd: int, factor: float, low: float, high: float,
                     orig: int) -> np.ndarray:
    """Llama-3 RoPE divisors per frequency, as llama.cpp's converter stores them."""
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * theta ** (i / hd)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, write_gguf):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 8.0, "original_max_position_embeddings": 128}
    cfg = ModelConfig(**{**tiny_config().to_json(), "rope_scaling": scaling})
    model = CausalLM(cfg)
    divisors = _llama3_divisors(cfg.rope_theta, cfg.hd, 8.0, 1.0, 8.0, 128)
    assert ((divisors > 1) & (divisors < 8)).sum() >= 2
    path = write_gguf(tmp_path / "l3.gguf", model, Tokenizer.tiny(),
                      extra_tensors={"rope_freqs.weight": divisors},
                      extra_meta=lambda w: w.add_rope_scaling_orig_ctx_len(128))
    lm = load_model(str(path))
    got = lm.model.config.rope_scaling
    assert got is not None and got["rope_type"] == "llama3" and got["factor"] == 8.0
    assert got["low_freq_factor"] == pytest.approx(1.0, abs=1e-3)
    assert got["high_freq_factor"] == pytest.approx(8.0, abs=1e-3)
    tokens = list(range(200))  # long enough for the scaled frequencies to matter
    torch.testing.assert_close(_logits(lm.model, tokens), _logits(model, tokens),
                               atol=1e-5, rtol=0)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path, write_gguf):
    rng = np.random.default_rng(1)
    divisors = rng.uniform(1, 3, size=tiny_config().hd // 2).astype(np.float32)
    path = write_gguf(tmp_path / "odd.gguf", tiny_model(), Tokenizer.tiny(),
                      extra_tensors={"rope_freqs.weight": divisors})
    with pytest.raises(CheckpointError, match="Llama-3 RoPE scaling"):
        load_model(str(path))


# --- our header reader against gguf.GGUFReader -----------------------------------------
def _compare_with_gguf_reader(path):
    from gguf import GGUFReader

    from edge_runtime.checkpoints.gguf.file import read_gguf

    ours, ref = read_gguf(path), GGUFReader(str(path))
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        assert ours.metadata[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == int(b.tensor_type)
        assert a.shape == tuple(reversed(b.shape.tolist()))
        assert np.array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1))
    return ours


def test_reader_matches_gguf_reader_on_a_written_file(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "m.gguf", tiny_model(), Tokenizer.tiny(), qtype="Q8_0",
                      extra_meta=lambda w: (w.add_array("test.floats", [1.5, -2.0]),
                                            w.add_bool("test.flag", True)))
    ours = _compare_with_gguf_reader(path)
    assert ours.metadata["test.floats"] == [1.5, -2.0] and ours.metadata["test.flag"] is True


@pytest.mark.real_model
def test_reader_matches_gguf_reader_on_the_real_file(real_gguf):
    ours = _compare_with_gguf_reader(real_gguf)
    assert len(ours.tensors) == 272 and len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_reader_refuses_garbage(tmp_path):
    from edge_runtime.checkpoints.gguf.file import read_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(CheckpointError, match="version 7"):
        read_gguf(bad)
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                    + (5).to_bytes(8, "little") + b"\x03")
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(bad)


@pytest.mark.parametrize("pre,pieces", [
    ("smollm", ["Hello", "Ġ", "Ġworld", "'s", "Ġ", "1", "2", "3", "4", "5", "!", "ĊĊ"]),
    ("llama-bpe", ["Hello", "Ġ", "Ġworld", "'s", "Ġ", "123", "45", "!ĊĊ"]),
    ("qwen2", ["Hello", "Ġ", "Ġworld", "'s", "Ġ", "1", "2", "3", "4", "5", "!ĊĊ"]),
])
def test_pre_tokenizers_split_as_their_models_do(tmp_path, write_gguf, pre, pieces):
    lm = load_model(str(write_gguf(tmp_path / "p.gguf", tiny_model(), Tokenizer.tiny(),
                                   pre=pre)))
    split = lm.tokenizer.backend.pre_tokenizer.pre_tokenize_str("Hello  world's 12345!\n\n")
    assert [p for p, _ in split] == pieces


@pytest.mark.parametrize("theta,hd,factor,low,high,orig", [
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
])
def test_llama3_parameters_of_released_models_are_recovered(theta, hd, factor, low, high, orig):
    from edge_runtime.checkpoints.gguf.rope import llama3_scaling_from_freq_factors

    got = llama3_scaling_from_freq_factors(
        _llama3_divisors(theta, hd, factor, low, high, orig), theta, hd, orig)
    assert got["factor"] == factor
    assert got["low_freq_factor"] == pytest.approx(low, abs=1e-3)
    assert got["high_freq_factor"] == pytest.approx(high, abs=1e-3)
