"""The decoder against brute-force references: attention, RoPE, KV cache, tied weights."""

import math

import torch

from edge_runtime.model import Block, CausalLM, ModelConfig, apply_rope, rope_inv_freq, rope_tables


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=80)
    base.update(kw)
    return ModelConfig(**base)


def reference_forward(m: CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """Loop-and-einsum Llama forward written from the equations, sharing only the weights."""
    cfg = m.config
    hd = cfg.hd
    T = tokens.shape[1]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)

    def rope(x):  # x: (T, heads, hd), rotate pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2].double(), x[..., hd // 2:].double()
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1).float()

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = m.model.embed_tokens.weight[tokens[0]]  # (T, D)
    for layer in m.model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q = (h @ a.q_proj.weight.T).view(T, cfg.n_heads, hd)
        k = (h @ a.k_proj.weight.T).view(T, cfg.n_kv_heads, hd)
        v = (h @ a.v_proj.weight.T).view(T, cfg.n_kv_heads, hd)
        q, k = rope(q), rope(k)
        out = torch.zeros(T, cfg.n_heads, hd)
        group = cfg.n_heads // cfg.n_kv_heads
        for head in range(cfg.n_heads):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / math.sqrt(hd)  # (T, T)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -1e9)
            out[:, head] = torch.softmax(scores, -1) @ v[:, kv]
        x = x + out.reshape(T, -1) @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        g = h @ mlp.gate_proj.weight.T
        x = x + (torch.nn.functional.silu(g) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    x = rms(x, m.model.norm.weight)
    return x @ m.lm_head.weight.T


def test_forward_matches_brute_force_reference():
    torch.manual_seed(0)
    m = CausalLM(tiny_cfg())
    tokens = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        ours = m(tokens)[0]
        ref = reference_forward(m, tokens)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_kv_cache_prefill_plus_decode_equals_full_forward():
    torch.manual_seed(1)
    m = CausalLM(tiny_cfg(tie_embeddings=False))
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = m(tokens)
        m.setup_cache(2, 20)
        parts = [m(tokens[:, :7], torch.arange(7))]
        for t in range(7, 13):
            parts.append(m(tokens[:, t: t + 1], torch.tensor([t])))
        m.clear_cache()
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = CausalLM(tiny_cfg(tie_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = CausalLM(tiny_cfg(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_llama3_rope_scaling_matches_formula():
    cfg = tiny_cfg(dim=64, n_heads=2, n_kv_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    got = rope_inv_freq(cfg).double()
    hd = 32
    base = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    expect = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expect.append(f)
        elif wavelen > 8192 / 1.0:
            expect.append(f / 32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expect.append((1 - smooth) * f / 32.0 + smooth * f)
    assert torch.allclose(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-6)
    assert not torch.allclose(got, base.float().double())


def test_attention_bias_for_qwen2_style_models():
    m = CausalLM(tiny_cfg(attention_bias=True))
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    assert m.model.layers[0].self_attn.o_proj.bias is None


def test_swiglu_and_gqa_training_paths_match_plain_autograd():
    """The training-only kernels (SwiGLU keeping g and u; SDPA reading grouped KV heads)
    give the same output and gradients as the plain formulas, in float64."""
    import torch.nn.functional as F

    from edge_runtime.model import _SwiGLU

    g0 = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 5, 7, generator=g0, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, 7, generator=g0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 7, generator=g0, dtype=torch.float64)
    (_SwiGLU.apply(gate, up) * w).sum().backward()
    ga, ua = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    (F.silu(gate) * up * w).sum().backward()
    torch.testing.assert_close(ga, gate.grad)
    torch.testing.assert_close(ua, up.grad)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate, up))

    cfg = ModelConfig(vocab_size=50, dim=24, n_layers=1, n_heads=6, n_kv_heads=2,
                      hidden_dim=40)
    torch.manual_seed(0)
    attn = Block(cfg).double().self_attn
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(cfg, 9))
    attn(x, cos, sin, None).pow(2).sum().backward()
    grad_gqa = x.grad.clone()
    x.grad = None
    # reference: repeat the KV heads by hand and attend with an explicit causal mask
    q = attn.q_proj(x).view(2, 9, 6, 4).transpose(1, 2)
    k = attn.k_proj(x).view(2, 9, 2, 4).transpose(1, 2)
    v = attn.v_proj(x).view(2, 9, 2, 4).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    att = (q @ k.transpose(-1, -2)) / 2.0
    att = att.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    y = (att.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 24)
    ref = attn.o_proj(y)
    torch.testing.assert_close(attn(x, cos, sin, None), ref)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(grad_gqa, x.grad)
