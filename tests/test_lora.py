"""LoRA against the brute-force (W + s B A) x, seeding, depth and adapter round trips."""

import copy

import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.config import LoRAPlan
from edge_runtime.errors import AdapterMismatchError, ConfigError
from edge_runtime.lora import (
    FrozenDelta,
    LoRALinear,
    add_frozen_delta,
    apply_lora,
    get_adapter,
    lora_modules,
    remove_lora,
    seeded_lora_a,
    set_adapter,
)
from edge_runtime.model import CausalLM, ModelConfig


def cfg4() -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=48)


def test_lora_linear_equals_dense_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7, bias=True)
    lora = LoRALinear(base, 12, 7, rank=3, alpha=6.0, lora_a=torch.randn(3, 12))
    with torch.no_grad():
        lora.lora_b.copy_(torch.randn(7, 3))
    x = torch.randn(5, 12)
    w = base.weight + (6.0 / 3) * lora.lora_b @ lora.lora_a
    assert torch.allclose(lora(x), x @ w.T + base.bias, atol=1e-5)


def test_seeded_lora_a_is_shared_and_rank_prefix_consistent():
    a8 = seeded_lora_a(7, "model.layers.1.self_attn.q_proj", 8, 32)
    a8_again = seeded_lora_a(7, "model.layers.1.self_attn.q_proj", 8, 32)
    a4 = seeded_lora_a(7, "model.layers.1.self_attn.q_proj", 4, 32)
    other = seeded_lora_a(7, "model.layers.1.self_attn.v_proj", 8, 32)
    assert torch.equal(a8, a8_again)
    assert torch.equal(a8[:4], a4)
    assert not torch.equal(a8, other)
    assert a8.abs().max() <= 1 / 32 ** 0.5


def test_apply_lora_depth_and_ranks():
    m = CausalLM(cfg4())
    plan = LoRAPlan(rank=4, depth=2, targets=("q", "v", "down"), layer_ranks={3: 8})
    wrapped = apply_lora(m, plan)
    assert sorted({int(n.split(".")[2]) for n in wrapped}) == [2, 3]
    assert wrapped["model.layers.3.self_attn.q_proj"].rank == 8
    assert wrapped["model.layers.2.mlp.down_proj"].rank == 4
    assert all(torch.count_nonzero(w.lora_b) == 0 for w in wrapped.values())
    assert m.frozen_prefix == 2
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in wrapped for f in ("lora_a", "lora_b")}


def test_depth_above_blocks_is_a_clear_error():
    with pytest.raises(ConfigError, match="depth 5 is above"):
        apply_lora(CausalLM(cfg4()), LoRAPlan(rank=4, depth=5))
    with pytest.raises(ConfigError, match="rank must be a positive"):
        LoRAPlan(rank=0)


def test_depth_cuts_the_backward():
    """Below the lowest LoRA block: no gradient and no autograd graph (fewer backward ops)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 9))

    def backward_nodes(depth: int) -> int:
        m = CausalLM(cfg4())
        apply_lora(m, LoRAPlan(rank=2, depth=depth, targets=("q", "v")))
        for mod in lora_modules(m).values():
            torch.nn.init.normal_(mod.lora_b)
        loss = m(tokens).sum()
        seen, stack = set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(nxt for nxt, _ in fn.next_functions)
        loss.backward()
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        return len(seen)

    shallow, deep = backward_nodes(1), backward_nodes(4)
    assert shallow < deep / 2, (shallow, deep)


def test_adapter_round_trip_and_strictness():
    base = CausalLM(cfg4())
    m, m2 = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(m, LoRAPlan(rank=4, depth=2))
    for mod in lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_b)
    adapter = get_adapter(m)
    set_adapter(m2, adapter)  # creates the LoRA modules
    tokens = torch.randint(0, 64, (1, 6))
    assert torch.allclose(m(tokens), m2(tokens))
    got = get_adapter(m2)
    assert set(got) == set(adapter)
    for k in adapter:
        assert torch.equal(got[k].lora_b, adapter[k].lora_b)
    adapter_missing = dict(adapter)
    adapter_missing.pop(next(iter(adapter_missing)))
    with pytest.raises(AdapterMismatchError, match="lacks"):
        set_adapter(m2, adapter_missing)
    bad = {"model.layers.3.self_attn.q_proj": LoRAWeights(torch.zeros(4, 99), torch.zeros(32, 4), 8.0)}
    with pytest.raises(AdapterMismatchError, match="another base"):
        set_adapter(CausalLM(cfg4()), bad)


def test_fresh_lora_over_a_frozen_delta_equals_the_merged_dense_weight():
    torch.manual_seed(3)
    model = CausalLM(cfg4()).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids)
    name = "model.layers.2.self_attn.q_proj"
    frozen = {name: LoRAWeights(torch.randn(5, 32), torch.randn(32, 5) * 0.1, 16.0)}
    merged = copy.deepcopy(model)
    with torch.no_grad():  # the reference: merge into W as the FLoRA paper does
        merged.get_submodule(name).weight += frozen[name].delta().float()
    add_frozen_delta(model, frozen)
    assert isinstance(model.get_submodule(name), FrozenDelta)
    fresh = {name: LoRAWeights(torch.randn(2, 32), torch.randn(32, 2) * 0.1, 16.0)}
    set_adapter(model, fresh)
    set_adapter(merged, fresh)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), merged(ids), rtol=1e-4, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == [f"{name}.lora_a", f"{name}.lora_b"]  # the delta is frozen
    assert set(get_adapter(model)) == {name}
    remove_lora(model)
    assert not any(isinstance(m, (FrozenDelta, LoRALinear)) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)
