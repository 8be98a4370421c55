"""The one causal-LM loss every path calls (training, evaluation, profiling, simulation).

Logits are computed only at positions whose next token carries a label: with a
49,152-token vocabulary the full (B, T, V) logits tensor dominates a small model's step,
and most positions of a prompt/response row carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_runtime.data import IGNORE
from edge_runtime.model import CausalLM

__all__ = ["IGNORE", "token_loss_sum", "count_label_tokens"]


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in (B, T) labels (the first position never does)."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss_sum(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Args:
        input_ids: (B, T) token ids.
        labels: (B, T); position t is predicted from tokens < t; IGNORE carries no loss.
    Returns:
        (sum of per-token losses as a 0-dim tensor, number of tokens).

    Under gradient accumulation divide every micro-batch's sum by the token count of the
    WHOLE accumulated batch (not by each micro-batch's own count), so the step equals one
    big batch (the bug of torchtune #2307 and HF's early accumulation).
    """
    hidden = model.hidden_states(input_ids)  # (B, T, D)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]  # (N, D)
    logits = model.lm_head(h).float()  # (N, V)
    return F.cross_entropy(logits, target[keep], reduction="sum"), n
