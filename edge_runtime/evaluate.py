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
    """Sum of log p(choice tokens | prompt) for each choice."""
    p_ids = tokenizer.encode(format_prompt(tokenizer, prompt, raw=raw))
    scores = []
    for choice in choices:
        c_ids = tokenizer.encode(choice)
        if not c_ids:
            scores.append(float("-inf"))
            continue
        ids = torch.tensor([p_ids + c_ids])
        logits = model(ids)[0, len(p_ids) - 1: -1].float()  # (len(c), V)
        logp = F.log_softmax(logits, dim=-1)
        scores.append(float(logp.gather(1, torch.tensor(c_ids)[:, None]).sum()))
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
