"""Export passes: zero-padded LoRA slots are exact, slot data validates adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.checkpoints import load_model
from edge_runtime.errors import AdapterMismatchError
from edge_runtime.lora import LoRALinear, set_adapter
from edge_runtime.quant import QuantLinear
from exporters.config import ExportConfig
from exporters.transforms import (
    LlamaOpsSDPA,
    PaddedLoRALinear,
    choose_slots,
    dequantize_base,
    insert_lora_slots,
    load_slot_tensors,
    pad_lora,
    slot_tensors,
    strip_lora,
    use_llama_ops,
)
from tests.exporters.helpers import TOKENS, eager_logits, random_adapter


def _int_tensor(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=gen).float()


def test_padded_slot_equals_unpadded_lora_exactly() -> None:
    """Rank r zero-padded to R gives LoRALinear(r)'s output bit for bit, scale alpha / r.

    Small-integer inputs and factors make every product and partial sum exact in float32,
    so the comparison is independent of BLAS summation order and any difference is a bug
    (wrong scale rank, misplaced padding, transposed factor).
    """
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        base.weight.copy_(_int_tensor(gen, 48, 64))
    x = _int_tensor(gen, 3, 7, 64)
    for r, max_rank in [(1, 8), (3, 8), (4, 8), (8, 8), (5, 32), (16, 64), (12, 16)]:
        lora = LoRALinear(base, 64, 48, r, alpha=16.0, lora_a=_int_tensor(gen, r, 64))
        with torch.no_grad():
            lora.lora_b.copy_(_int_tensor(gen, 48, r))
        slot = PaddedLoRALinear(base, 64, 48, max_rank)
        a, b, s = pad_lora(LoRAWeights(lora.lora_a.detach(), lora.lora_b.detach(), 16.0),
                           max_rank)
        slot.lora_a.copy_(a)
        slot.lora_b.copy_(b)
        slot.lora_scale.copy_(s)
        assert s.item() == torch.tensor(16.0 / r).item()  # true rank r, not R
        with torch.no_grad():
            assert torch.equal(slot(x), lora(x)), (r, max_rank)


def test_padded_slot_matches_unpadded_lora_on_random_floats() -> None:
    """With arbitrary floats BLAS may sum in another order for N = r vs N = R columns."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 7, 64)
    for r, max_rank in [(1, 8), (3, 8), (5, 32), (16, 64)]:
        lora = LoRALinear(base, 64, 48, r, alpha=16.0, lora_a=torch.randn(r, 64))
        with torch.no_grad():
            lora.lora_b.normal_()
        slot = PaddedLoRALinear(base, 64, 48, max_rank)
        a, b, s = pad_lora(LoRAWeights(lora.lora_a.detach(), lora.lora_b.detach(), 16.0),
                           max_rank)
        slot.lora_a.copy_(a)
        slot.lora_b.copy_(b)
        slot.lora_scale.copy_(s)
        with torch.no_grad():
            want, got = lora(x), slot(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_whole_model_padded_equals_eager_with_heterogeneous_ranks() -> None:
    loaded = load_model("tiny")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
             "model.layers.1.mlp.down_proj"]
    adapter = random_adapter(loaded.model, dict(zip(names, [2, 5, 7], strict=True)), seed=3)
    eager = copy.deepcopy(loaded.model)
    set_adapter(eager, adapter)
    ref = eager_logits(eager, TOKENS)
    base = eager_logits(loaded.model, TOKENS)
    assert (ref - base).abs().max() > 1e-3  # the adapter matters

    export = copy.deepcopy(eager)
    strip_lora(export)
    dequantize_base(export)
    slots = choose_slots(export, adapter, (), 0)
    insert_lora_slots(export, slots, 16)
    load_slot_tensors(export, slot_tensors(adapter, slots, 16))
    got = eager_logits(export, TOKENS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_dequantize_base_keeps_the_quantized_function() -> None:
    loaded = load_model("tiny", "int8")
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    ref = eager_logits(loaded.model, TOKENS)
    dequantize_base(loaded.model)
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    torch.testing.assert_close(eager_logits(loaded.model, TOKENS), ref, atol=1e-5, rtol=1e-5)


def test_slot_tensors_reject_wrong_adapters() -> None:
    loaded = load_model("tiny")
    model = loaded.model
    slots = choose_slots(model, None, ("q_proj", "v_proj"), 1)
    assert list(slots) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    too_big = random_adapter(model, {"model.layers.1.self_attn.q_proj": 9})
    with pytest.raises(AdapterMismatchError, match="--max-rank 9"):
        slot_tensors(too_big, slots, 8)
    outside = random_adapter(model, {"model.layers.0.self_attn.q_proj": 2})
    with pytest.raises(AdapterMismatchError, match="no LoRA slot"):
        slot_tensors(outside, slots, 8)
    # a missing module gets zeros and a zero scale
    partial = random_adapter(model, {"model.layers.1.self_attn.q_proj": 2})
    data = slot_tensors(partial, slots, 8)
    assert data["model.layers.1.self_attn.v_proj.lora_scale"].item() == 0.0
    assert data["model.layers.1.self_attn.q_proj.lora_a"].shape == (8, 64)
    # unpadded (ONNX): own rank
    assert slot_tensors(partial, slots, None)["model.layers.1.self_attn.q_proj.lora_b"].shape \
        == (64, 2)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        choose_slots(model, {"model.layers.7.self_attn.q_proj": partial[
            "model.layers.1.self_attn.q_proj"]}, (), 0)


def test_export_config_rejects_bad_combinations() -> None:
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="not available for --format executorch"):
        ExportConfig(format="executorch", quant="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not available for --format onnx"):
        ExportConfig(format="onnx", quant="8da4w")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown export format"):
        ExportConfig(format="tflite")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max-seq-len"):
        ExportConfig(max_seq_len=2)


def test_llama_ops_attention_matches_eager_cache() -> None:
    """`use_llama_ops` (update_cache + custom_sdpa, GQA 4/2 heads) equals the eager KVCache.

    Prefill then decode steps, with a LoRA adapter on q/v, against one eager forward over
    the whole sequence; the projections keep their names (LoRA slots are found by name).
    """
    loaded = load_model("tiny")
    model = loaded.model.eval()
    set_adapter(model, random_adapter(model, {"model.layers.1.self_attn.q_proj": 4,
                                              "model.layers.0.self_attn.v_proj": 2}))
    ref = eager_logits(model, TOKENS)
    names = {n for n, _ in model.named_modules()}
    fused = use_llama_ops(copy.deepcopy(model), 1, 32)
    assert names <= {n for n, _ in fused.named_modules()}
    assert all(b.self_attn.kv_cache is None and isinstance(b.self_attn.sdpa, LlamaOpsSDPA)
               for b in fused.blocks())
    with torch.no_grad():
        rows = [fused(torch.tensor([TOKENS[:5]]), torch.arange(5))[0]]
        for i in range(5, len(TOKENS)):
            rows.append(fused(torch.tensor([TOKENS[i:i + 1]]), torch.tensor([i]))[0])
    got = torch.cat(rows)
    assert (got - ref).abs().max().item() <= 1e-5
    fused.clear_cache()
    assert all(b.self_attn.sdpa is None for b in fused.blocks())
