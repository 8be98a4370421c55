"""Multiple-choice scoring from a shared prompt cache against a full forward per choice."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.checkpoints import load_model
from edge_runtime.config import LoRAPlan
from edge_runtime.data import format_prompt
from edge_runtime.evaluate import choice_logprobs
from edge_runtime.lora import apply_lora


def brute_force(model, tok, prompt: str, choice: str) -> float:  # type: ignore[no-untyped-def]
    """log p(choice | prompt) from one uncached forward over prompt + choice."""
    p_ids, c_ids = tok.encode(format_prompt(tok, prompt)), tok.encode(choice)
    if not c_ids:
        return float("-inf")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + c_ids]))[0].double(), -1)
    return sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_cached_choices_equal_a_full_forward_each(quant: str) -> None:
    loaded = load_model("tiny", quant)
    model, tok = loaded.model, loaded.tokenizer
    apply_lora(model, LoRAPlan(rank=4, depth=2, targets=("q", "v"), seed=3))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # a non-zero update, so LoRA changes every score
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rows = [("Is the food good?", ["yes", "no"]),
            ("Pick a colour", ["red", "a long answer of many tokens", "", "x"]),
            ("2+2=", ["4"])]
    for prompt, choices in rows:
        got = choice_logprobs(model, tok, prompt, choices)
        want = [brute_force(model, tok, prompt, c) for c in choices]
        for g, w in zip(got, want, strict=True):
            assert (g == w == float("-inf")) or g == pytest.approx(w, abs=1e-4)
    # the cache is gone afterwards: a plain forward still works
    assert all(b.self_attn.kv_cache is None for b in model.blocks())
