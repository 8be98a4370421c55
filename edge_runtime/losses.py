"""The one causal-LM loss every path calls (training, evaluation, profiling, simulation).

Logits are computed only at positions whose next token carries a label: with a
49,152-token vocabulary the full (B, T, V) logits tensor dominates a small model's step,
and most positions of a prompt/response row carry no loss.

With a frozen head the logits never exist whole either: `head_loss_sum` takes them in
row chunks and, when a gradient is wanted, computes the hidden states' gradient
`(softmax - onehot) @ W` chunk by chunk in the forward (the loss is a scalar, so that
gradient is known up to the upstream factor). Nothing of size (N, V) is kept for the
backward: 512 labelled tokens save three (N, V) fp32 tensors (logits, log-softmax, their
gradient: ~300 MB) and the log-softmax passes (the "fused linear cross-entropy" of
Liger-Kernel, here in plain torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.data import IGNORE
from edge_runtime.model import CausalLM

__all__ = ["IGNORE", "token_loss_sum", "count_label_tokens", "head_loss_sum",
           "head_chunk_rows"]

HEAD_CHUNK_BYTES = 16 << 20  # fp32 logits of one row chunk, at least HEAD_MIN_ROWS rows
HEAD_MIN_ROWS = 128  # MKL's sgemm of (rows, 576) x (576, 49152): ~40 GFLOP/s at 85 rows,
# ~50 at 128 (1 thread, AMD EPYC, scripts/bench_train.py); 25 MB of logits at V = 49,152


def head_chunk_rows(vocab: int) -> int:
    """Rows of one logits chunk: the byte budget, but never fewer than HEAD_MIN_ROWS."""
    return max(HEAD_MIN_ROWS, HEAD_CHUNK_BYTES // (4 * vocab), 1)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in (B, T) labels (the first position never does)."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss_sum(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                   *, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Args:
        input_ids: (B, T) token ids.
        labels: (B, T); position t is predicted from tokens < t; IGNORE carries no loss.
        prefix: the frozen prefix's output for `input_ids` when known (`PrefixCache`).
    Returns:
        (sum of per-token losses as a 0-dim tensor, number of tokens).

    Under gradient accumulation divide every micro-batch's sum by the token count of the
    WHOLE accumulated batch (not by each micro-batch's own count), so the step equals one
    big batch (the bug of torchtune #2307 and HF's early accumulation).
    """
    hidden = model.hidden_states(input_ids, prefix=prefix)  # (B, T, D)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]  # (N, D)
    return head_loss_sum(model.lm_head, h, target[keep]), n


def head_loss_sum(head: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(h)` (N, V) against `target` (N,), as a 0-dim tensor.

    A frozen bias-free `nn.Linear` head goes through the chunked fused path; any other
    head (one with trainable weights or a LoRA wrapper) through plain autograd.
    """
    fused = (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad)
    if not fused:
        return F.cross_entropy(head(h).float(), target, reduction="sum")
    assert isinstance(head, nn.Linear)
    out = _FrozenHeadCE.apply(h, head.weight, target)
    assert isinstance(out, torch.Tensor)
    return out


class _FrozenHeadCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) for a frozen W; the gradient of h made in the forward.

    One (rows, V) buffer serves every chunk: logits, then exp(logits - max) in place,
    then softmax - onehot in place, so a chunk costs one exp pass and no temporaries of
    its size (`torch.logsumexp` would allocate one and exponentiate a second time).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                target: torch.Tensor) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(h.shape, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float64)
        rows = max(1, min(n, head_chunk_rows(vocab)))
        w = weight.float()
        buf = torch.empty(rows, vocab, dtype=torch.float32)
        for i in range(0, n, rows):
            c = min(rows, n - i)
            logits = torch.mm(h[i:i + c].float(), w.t(), out=buf[:c])  # (c, V)
            t = target[i:i + c]
            picked = logits.gather(1, t[:, None])[:, 0]
            top = logits.amax(dim=1)  # (c,)
            e = logits.sub_(top[:, None]).exp_()  # exp(logits - max), in place
            z = e.sum(dim=1)  # (c,)
            lse = top + z.log()
            total += (lse - picked).sum(dtype=torch.float64)
            if grad is not None:
                probs = e.mul_(z.reciprocal()[:, None])  # softmax, in place
                probs[torch.arange(c), t] -= 1.0
                torch.mm(probs, w, out=grad[i:i + c])  # (c, D)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.h_dtype = h.dtype
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.h_dtype), None, None
