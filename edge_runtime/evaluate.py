"""Evaluation: held-out loss on response tokens, and multiple choice by log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_runtime.data import (
    IGNORE,
    Example,
    TokenizerLike,
    collate,
    format_prompt,
    tokenize_one,
)
from edge_runtime.errors import DataError
from edge_runtime.model import CausalLM

__all__ = ["EvalResult", "evaluate", "eval_loss", "choice_logprobs", "choice_scores",
           "choice_accuracy"]


@dataclass
class EvalResult:
    """Held-out loss (token-weighted) and multiple-choice accuracy (None: no choice rows)."""

    loss: float
    accuracy: float | None
    choice_rows: int


@torch.no_grad()
def evaluate(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example],
             seq_len: int = 256, batch_size: int = 16) -> EvalResult:
    """Loss and accuracy in one pass over the rows.

    Rows go in batches of similar length; the prefix a batch shares and that carries no
    label (a chat template's system prompt) runs once, and the head runs only where a
    label is predicted (`losses.token_loss_sum` is the same sum without the cache). A
    choice row with a response and one-token choices is scored from the same forward (its
    last prompt position is in the loss sequence); other choice rows take
    `choice_scores`.
    """
    model.eval()
    data = [(k, tokenize_one(tokenizer, ex, seq_len)) for k, ex in enumerate(examples)
            if ex.text is not None or ex.response is not None]
    data = [(k, t) for k, t in data if t.num_label_tokens > 0 and len(t.input_ids) >= 2]
    if not data:
        raise DataError("no example has a token to learn from after tokenization; "
                        "raise --seq-len or check the data")
    choice = [k for k, ex in enumerate(examples) if ex.choices is not None
              and ex.answer is not None and ex.prompt is not None]
    shared: dict[int, tuple[int, list[list[int]]]] = {}  # row -> (last prompt index, choices)
    by_row = dict(data)
    for k in choice:
        ex = examples[k]
        c_ids = [tokenizer.encode(c) for c in ex.choices or []]
        p_ids = tokenizer.encode(format_prompt(tokenizer, ex.prompt or ""))
        t = by_row.get(k)
        if (t is not None and p_ids and all(len(c) <= 1 for c in c_ids)
                and t.input_ids[: len(p_ids)] == p_ids and len(t.input_ids) > len(p_ids)):
            shared[k] = (len(p_ids) - 1, c_ids)
    scores: dict[int, list[float]] = {}
    data.sort(key=lambda kt: len(kt[1].input_ids))
    total, count = 0.0, 0
    for s in range(0, len(data), batch_size):
        chunk = data[s: s + batch_size]
        ids, labels = collate([t for _, t in chunk], tokenizer.pad_id)
        first_label = int((labels != IGNORE).long().argmax(dim=1).min())
        n_pre = _common_prefix(ids, first_label - 1)
        h = _hidden_after_prefix(model, ids, n_pre)  # positions n_pre.. (B, T - n_pre, D)
        target = labels[:, n_pre + 1:]  # what positions n_pre.. predict
        keep = target != IGNORE
        logits = model.lm_head(h[:, :-1][keep]).float()  # (N, V)
        total += float(F.cross_entropy(logits, target[keep], reduction="sum"))
        count += int(keep.sum())
        rows = [(row, k) for row, (k, _) in enumerate(chunk) if k in shared]
        if rows:
            last = torch.stack([h[row, shared[k][0] - n_pre] for row, k in rows])  # (R, D)
            logp = F.log_softmax(model.lm_head(last).float(), dim=-1)  # (R, V)
            for r, (_, k) in enumerate(rows):
                scores[k] = [float(logp[r, c[0]]) if c else float("-inf")
                             for c in shared[k][1]]
    rest = [k for k in choice if k not in scores]
    for k, sc in zip(rest, choice_scores(model, tokenizer, [examples[k] for k in rest],
                                         batch_size=batch_size), strict=True):
        scores[k] = sc
    correct = sum(int(max(range(len(scores[k])), key=scores[k].__getitem__)
                      == examples[k].answer) for k in choice)
    return EvalResult(total / max(count, 1), correct / len(choice) if choice else None,
                      len(choice))


def eval_loss(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example],
              seq_len: int = 256, batch_size: int = 16) -> float:
    """Mean next-token loss over every labelled token of `examples` (token-weighted)."""
    rows = [e for e in examples if e.text is not None or e.response is not None]
    return evaluate(model, tokenizer, rows, seq_len, batch_size).loss


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
            _share_cache(model, len(valid))
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


@torch.no_grad()
def choice_scores(model: CausalLM, tokenizer: TokenizerLike, rows: list[Example], *,
                  batch_size: int = 16, raw: bool = False) -> list[list[float]]:
    """`choice_logprobs` of every row, each prompt computed once.

    Rows whose choices are all one token long (labels such as positive/negative) need only
    the logits at the prompt's last position: their prompts run in right-padded batches
    (causal attention: padding after a row never reaches its own positions) and the head
    runs on one position a row. Other rows take `choice_logprobs` (cached prompt).
    """
    out: list[list[float] | None] = [None] * len(rows)
    single: list[tuple[int, list[int], list[list[int]]]] = []
    for k, ex in enumerate(rows):
        assert ex.prompt is not None and ex.choices is not None
        c_ids = [tokenizer.encode(c) for c in ex.choices]
        p_ids = tokenizer.encode(format_prompt(tokenizer, ex.prompt, raw=raw))
        if p_ids and all(len(c) <= 1 for c in c_ids):
            single.append((k, p_ids, c_ids))
        else:
            out[k] = choice_logprobs(model, tokenizer, ex.prompt, ex.choices, raw=raw)
    model.eval()
    single.sort(key=lambda r: len(r[1]))  # similar lengths share a batch: less padding
    for s in range(0, len(single), batch_size):
        chunk = single[s: s + batch_size]
        last = _last_prompt_states(model, [p for _, p, _ in chunk], tokenizer.pad_id)
        logp = F.log_softmax(model.lm_head(last).float(), dim=-1)  # (B, V)
        for row, (k, _, c_ids) in enumerate(chunk):
            out[k] = [float(logp[row, c[0]]) if c else float("-inf") for c in c_ids]
    return [o if o is not None else [] for o in out]


def _share_cache(model: CausalLM, batch: int) -> None:
    """Copy a batch-1 KV cache (a prefix computed once) to `batch` rows that continue it."""
    for layer in model.blocks():
        kv = layer.self_attn.kv_cache
        assert kv is not None
        kv.k_cache = kv.k_cache.expand(batch, -1, -1, -1).clone()
        kv.v_cache = kv.v_cache.expand(batch, -1, -1, -1).clone()


def _common_prefix(rows: torch.Tensor, limit: int) -> int:
    """Length of the token prefix all rows (B, T) share, at most `limit`."""
    same = (rows == rows[:1]).all(dim=0)  # (T,)
    n = int(same[:limit].long().cumprod(0).sum()) if limit > 0 else 0
    return n


def _hidden_after_prefix(model: CausalLM, ids: torch.Tensor, n_pre: int) -> torch.Tensor:
    """Final hidden states (B, T - n_pre, dim) of positions n_pre.. of right-padded `ids`.

    The first `n_pre` tokens, the same in every row (a chat template's system prompt and
    user header), run once into a KV cache that the batch then shares.
    """
    if n_pre == 0:
        return model.hidden_states(ids)
    b, t = ids.shape
    model.setup_cache(1, t)
    try:
        model.hidden_states(ids[:1, :n_pre], torch.arange(n_pre))
        _share_cache(model, b)
        return model.hidden_states(ids[:, n_pre:], torch.arange(n_pre, t))
    finally:
        model.clear_cache()


def _last_prompt_states(model: CausalLM, prompts: list[list[int]], pad_id: int
                        ) -> torch.Tensor:
    """Final hidden state at each prompt's last token, (B, dim): a right-padded batch
    (causal: padding after a row never reaches its own positions) after the shared prefix."""
    ids = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p)
    n_pre = _common_prefix(ids, min(len(p) for p in prompts) - 1)
    h = _hidden_after_prefix(model, ids, n_pre)
    ends = torch.tensor([len(p) - 1 - n_pre for p in prompts])
    return h[torch.arange(len(prompts)), ends]


def choice_accuracy(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example]
                    ) -> float:
    """Share of multiple-choice rows whose answer has the highest log-likelihood."""
    rows = [e for e in examples if e.choices is not None and e.answer is not None]
    if not rows:
        raise DataError("no multiple-choice rows (with 'choices' and 'answer') to score")
    correct = 0
    for ex, scores in zip(rows, choice_scores(model, tokenizer, rows), strict=True):
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex.answer)
    return correct / len(rows)
