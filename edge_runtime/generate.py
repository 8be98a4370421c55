"""Text generation with the eager model: prefill into the static KV cache, then decode."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edge_runtime.config import GenerateConfig
from edge_runtime.data import TokenizerLike, format_prompt
from edge_runtime.model import CausalLM

__all__ = ["GenerationResult", "decode_loop", "generate_ids", "generate", "sample_next"]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                gen: torch.Generator) -> int:
    """One token id from (V,) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


StepFn = Callable[[list[int], int], torch.Tensor]


def decode_loop(step: StepFn, prompt_ids: list[int], cfg: GenerateConfig, stop_ids: set[int]
                ) -> tuple[list[int], float, float]:
    """Prefill then sample until a stop token or `cfg.max_new_tokens`, with any backend.

    `step(ids, start_pos)` feeds `ids` at positions start_pos.. and returns the (V,)
    logits after the last one (the eager model, or an exported program's runner).
    Returns the new token ids (stop token excluded), prefill and decode seconds.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    logits = step(prompt_ids, 0)
    t1 = time.perf_counter()
    out: list[int] = []
    pos = len(prompt_ids)
    for _ in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg.temperature, cfg.top_k, gen)
        if nxt in stop_ids:
            break
        out.append(nxt)
        if len(out) == cfg.max_new_tokens:
            break
        logits = step([nxt], pos)
        pos += 1
    return out, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def generate_ids(model: CausalLM, prompt_ids: list[int], cfg: GenerateConfig,
                 stop_ids: set[int]) -> tuple[list[int], float, float]:
    """New token ids after `prompt_ids` with the eager model and its static KV cache."""
    model.eval()
    model.setup_cache(1, len(prompt_ids) + cfg.max_new_tokens)

    def step(ids: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids))
        return model(torch.tensor([ids]), positions)[0, -1]

    try:
        return decode_loop(step, prompt_ids, cfg, stop_ids)
    finally:
        model.clear_cache()


def generate(model: CausalLM, tokenizer: TokenizerLike, prompt: str, cfg: GenerateConfig
             ) -> GenerationResult:
    """Complete `prompt` (wrapped in the chat template unless `cfg.raw`)."""
    text = format_prompt(tokenizer, prompt, raw=cfg.raw)
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        prompt_ids = [min(tokenizer.eos_ids)] if tokenizer.eos_ids else [0]
    ids, prefill_s, decode_s = generate_ids(model, prompt_ids, cfg, tokenizer.eos_ids)
    return GenerationResult(tokenizer.decode(ids), ids, len(prompt_ids), prefill_s, decode_s)
