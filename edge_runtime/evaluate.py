"""Evaluation: held-out loss on response tokens, and multiple choice by log-likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_runtime.data import Example, TokenizerLike, collate, format_prompt, tokenize
from edge_runtime.errors import DataError
from edge_runtime.losses import token_loss_sum
from edge_runtime.model import CausalLM

__all__ = ["eval_loss", "choice_logprobs", "choice_accuracy"]


@torch.no_grad()
def eval_loss(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example],
              seq_len: int = 256, batch_size: int = 8) -> float:
    """Mean next-token loss over every labelled token of `examples` (token-weighted)."""
    data = tokenize(tokenizer, examples, seq_len)
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data), batch_size):
        ids, labels = collate(data[s: s + batch_size], tokenizer.pad_id)
        loss_sum, n = token_loss_sum(model, ids, labels)
        total += float(loss_sum)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def choice_logprobs(model: CausalLM, tokenizer: TokenizerLike, prompt: str, choices: list[str],
                    *, raw: bool = False) -> list[float]:
    """Sum of log p(choice tokens | prompt) for each choice (-inf for an empty choice).

    The prompt runs once, into a KV cache that every choice then continues from in one
    batch, and the vocabulary head runs only where a choice token is predicted (the last
    prompt position and the choices' own positions): for a 2-choice row with a prompt of
    P tokens that is P + 2 L tokens through the blocks instead of 2 (P + L), and 2 L + 1
    head rows instead of 2 (P + L).
    """
    p_ids = tokenizer.encode(format_prompt(tokenizer, prompt, raw=raw))
    c_ids = [tokenizer.encode(c) for c in choices]
    scores = [float("-inf")] * len(choices)
    valid = [i for i, c in enumerate(c_ids) if c]
    if not valid:
        return scores
    if not p_ids:
        raise DataError(f"prompt {prompt[:40]!r} has no tokens to condition the choices on")
    n_p, n_c = len(p_ids), max(len(c_ids[i]) for i in valid)
    model.eval()
    model.setup_cache(1, n_p + n_c)
    try:
        h_p = model.hidden_states(torch.tensor([p_ids]), torch.arange(n_p))  # (1, P, dim)
        first = F.log_softmax(model.lm_head(h_p[0, -1]).float(), dim=-1)  # (V,)
        if n_c > 1:  # every choice continues the cached prompt, one batch row each
            for layer in model.blocks():
                kv = layer.self_attn.kv_cache
                assert kv is not None
                kv.k_cache = kv.k_cache.expand(len(valid), -1, -1, -1).clone()
                kv.v_cache = kv.v_cache.expand(len(valid), -1, -1, -1).clone()
            rest = torch.full((len(valid), n_c - 1), tokenizer.pad_id, dtype=torch.long)
            for row, i in enumerate(valid):
                rest[row, : len(c_ids[i]) - 1] = torch.tensor(c_ids[i][:-1])
            h_c = model.hidden_states(rest, torch.arange(n_p, n_p + n_c - 1))  # (C, L-1, dim)
        for row, i in enumerate(valid):
            c = c_ids[i]
            total = first[c[0]]
            if len(c) > 1:  # padding after a short choice never reaches its own positions
                logp = F.log_softmax(model.lm_head(h_c[row, : len(c) - 1]).float(), dim=-1)
                total = total + logp.gather(1, torch.tensor(c[1:])[:, None]).sum()
            scores[i] = float(total)
    finally:
        model.clear_cache()
    return scores


def choice_accuracy(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example]
                    ) -> float:
    """Share of multiple-choice rows whose answer has the highest log-likelihood."""
    rows = [e for e in examples if e.choices is not None and e.answer is not None]
    if not rows:
        raise DataError("no multiple-choice rows (with 'choices' and 'answer') to score")
    correct = 0
    for ex in rows:
        assert ex.prompt is not None and ex.choices is not None
        scores = choice_logprobs(model, tokenizer, ex.prompt, ex.choices)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex.answer)
    return correct / len(rows)
