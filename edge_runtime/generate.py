"""Text generation with the eager model: prefill into the static KV cache, then decode."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from edge_runtime.config import GenerateConfig
from edge_runtime.data import TokenizerLike, format_prompt
from edge_runtime.model import CausalLM

__all__ = ["GenerationResult", "generate_ids", "generate", "sample_next"]


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


@torch.no_grad()
def generate_ids(model: CausalLM, prompt_ids: list[int], cfg: GenerateConfig,
                 stop_ids: set[int]) -> tuple[list[int], float, float]:
    """New token ids after `prompt_ids` (stop token excluded), prefill and decode seconds."""
    model.eval()
    total = len(prompt_ids) + cfg.max_new_tokens
    model.setup_cache(1, total)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids])
        logits = model(ids, torch.arange(len(prompt_ids)))[0, -1]
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
            logits = model(torch.tensor([[nxt]]), torch.tensor([pos]))[0, -1]
            pos += 1
        t2 = time.perf_counter()
    finally:
        model.clear_cache()
    return out, t1 - t0, t2 - t1


def generate(model: CausalLM, tokenizer: TokenizerLike, prompt: str, cfg: GenerateConfig
             ) -> GenerationResult:
    """Complete `prompt` (wrapped in the chat template unless `cfg.raw`)."""
    text = format_prompt(tokenizer, prompt, raw=cfg.raw)
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        prompt_ids = [min(tokenizer.eos_ids)] if tokenizer.eos_ids else [0]
    ids, prefill_s, decode_s = generate_ids(model, prompt_ids, cfg, tokenizer.eos_ids)
    return GenerationResult(tokenizer.decode(ids), ids, len(prompt_ids), prefill_s, decode_s)
