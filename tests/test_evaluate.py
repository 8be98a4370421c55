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


def test_batched_rows_equal_one_row_at_a_time() -> None:
    from edge_runtime.data import Example
    from edge_runtime.evaluate import choice_scores

    loaded = load_model("tiny")
    model, tok = loaded.model, loaded.tokenizer
    rows = [Example(prompt="Q: short?", choices=["a", "b"], answer=0),
            Example(prompt="Q: a much longer prompt than the others, to pad the batch",
                    choices=["c", "d", "e"], answer=1),
            Example(prompt="Q: multi-token choices go the cached way", choices=["yes", "no"],
                    answer=0),
            Example(prompt="Q: mid length prompt", choices=["f", ""], answer=0),
            Example(prompt="R: no shared prefix with the others", choices=["g", "h"],
                    answer=1)]
    got = choice_scores(model, tok, rows, batch_size=3)
    for ex, scores in zip(rows, got, strict=True):
        want = [brute_force(model, tok, ex.prompt, c) for c in ex.choices]  # type: ignore[arg-type,union-attr]
        for g, w in zip(scores, want, strict=True):
            assert (g == w == float("-inf")) or g == pytest.approx(w, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_eval_loss_equals_the_plain_token_loss(batch_size: int) -> None:
    """Against `losses.token_loss_sum` over one row at a time (no cache, no sorting)."""
    from pathlib import Path

    from edge_runtime.data import Example, collate, load_jsonl, tokenize
    from edge_runtime.evaluate import eval_loss
    from edge_runtime.losses import token_loss_sum

    loaded = load_model("tiny")
    model, tok = loaded.model, loaded.tokenizer
    rows = load_jsonl(Path(__file__).parent / "fixtures" / "qa.jsonl")
    rows += [Example(text="plain text rows carry a label on every token"),
             Example(prompt="Q: same start", response="one"),
             Example(prompt="Q: same start, longer", response="two words")]
    total, count = 0.0, 0
    with torch.no_grad():
        for t in tokenize(tok, rows, 64):
            loss, n = token_loss_sum(model, *collate([t], tok.pad_id))
            total, count = total + float(loss), count + n
    assert eval_loss(model, tok, rows, seq_len=64, batch_size=batch_size) == pytest.approx(
        total / count, rel=1e-5)


def test_one_pass_accuracy_equals_brute_force_scores() -> None:
    """Choice rows scored from the loss pass (one-token choices, with a response), from the
    cached path (longer choices) and rows without choices, against full forwards."""
    from edge_runtime.data import Example
    from edge_runtime.evaluate import evaluate

    loaded = load_model("tiny")
    model, tok = loaded.model, loaded.tokenizer
    rows = [Example(prompt=f"Q: item {i} is", response=r, choices=["a", "b", "c"],
                    answer=ans) for i, (r, ans) in enumerate([("a", 0), ("b", 1), ("c", 2),
                                                               ("a", 0), ("b", 1)])]
    rows += [Example(prompt="Q: longer choices", response="yes", choices=["yes", "no"],
                     answer=0),
             Example(prompt="Q: plain", response="no choices here")]
    res = evaluate(model, tok, rows, seq_len=64, batch_size=3)
    want = 0
    for ex in rows:
        if ex.choices is None:
            continue
        sc = [brute_force(model, tok, ex.prompt, c) for c in ex.choices]  # type: ignore[arg-type]
        want += int(max(range(len(sc)), key=sc.__getitem__) == ex.answer)
    assert res.choice_rows == 6 and res.accuracy == pytest.approx(want / 6)
