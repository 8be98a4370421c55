"""The one causal-LM loss every path calls (training, evaluation, profiling, simulation).

Logits are computed only at positions whose next token carries a label: with a
49,152-token vocabulary the full (B, T, V) logits tensor dominates a small model's step,
and most positions of a prompt/response row carry no loss.

With a frozen head the logits never exist whole either: `head_loss_sum` takes them in
vocabulary blocks with an online softmax and, when a gradient is wanted, computes the
hidden states' gradient `(softmax - onehot) @ W` in the same pass, in the forward (the
loss is a scalar, so that gradient is known up to the upstream factor). Nothing of size (N, V) is kept for the
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
           "head_block"]

HEAD_CHUNK_BYTES = 8 << 20  # fp32 logits of one (rows, vocabulary block) slice
HEAD_MAX_ROWS = 1024  # rows per pass over W (a pass holds `rows x block` logits)
HEAD_MIN_BLOCK = 256  # vocabulary columns per GEMM at the least


def head_block(vocab: int, rows: int) -> int:
    """Vocabulary columns of one logits slice: the byte budget over `rows`, at least
    HEAD_MIN_BLOCK, at most the vocabulary. At 508 rows and 8 MiB: 4128 columns (MKL's
    sgemm reaches ~55/65 GFLOP/s on the logits/gradient GEMMs at 4096 columns against
    ~40/55 with 85-row chunks over the whole vocabulary, 1 thread, AMD EPYC)."""
    return max(1, min(vocab, max(HEAD_MIN_BLOCK, HEAD_CHUNK_BYTES // (4 * rows))))


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

    One pass over W in vocabulary blocks with an online softmax (the running max, sum of
    exponentials and exp-weighted sum of W's rows of every row, rescaled when the max
    grows: flash attention's recurrence with W as keys and values), so each row's
    normaliser and its gradient `softmax @ W - W[t]` come out of the same two GEMMs per
    block and only a (rows, block) slice of logits ever exists.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                target: torch.Tensor) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        want_grad = ctx.needs_input_grad[0]
        w = weight.float()
        grad = torch.empty(h.shape, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float64)
        rows = max(1, min(n, HEAD_MAX_ROWS))
        block = head_block(vocab, rows)
        buf = torch.empty(rows, block, dtype=torch.float32)
        for i in range(0, n, rows):
            hi = h[i:i + rows].float()
            r = hi.shape[0]
            top = torch.full((r,), float("-inf"))
            z = torch.zeros(r)
            acc = torch.zeros(r, w.shape[1]) if grad is not None else None
            for j in range(0, vocab, block):
                wb = w[j:j + block]
                c = wb.shape[0]
                lb = (torch.mm(hi, wb.t(), out=buf[:r]) if c == block and r == rows
                      else hi @ wb.t())  # (r, c) logits of this block
                new_top = torch.maximum(top, lb.amax(dim=1))
                rescale = (top - new_top).exp_()  # 0 at the first block (exp(-inf))
                e = lb.sub_(new_top[:, None]).exp_()  # in place
                z.mul_(rescale).add_(e.sum(dim=1))
                if acc is not None:
                    acc.mul_(rescale[:, None]).addmm_(e, wb)
                top = new_top
            t = target[i:i + rows]
            wt = w[t]  # (r, D) the targets' rows
            picked = (hi * wt).sum(dim=1)
            total += (top + z.log() - picked).sum(dtype=torch.float64)
            if grad is not None and acc is not None:
                torch.sub(acc.div_(z[:, None]), wt, out=grad[i:i + rows])
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.h_dtype = h.dtype
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.h_dtype), None, None
