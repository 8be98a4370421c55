"""Local LoRA training on one device: AdamW, gradient accumulation, a step limit and a
wall-clock deadline (federated rounds need a clean stop), checkpoint and resume.

Short and linear on purpose: set up, loop, clean up. The loss maths is in `losses.py`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edge_runtime.config import TrainConfig
from edge_runtime.data import (
    Example,
    TokenizedExample,
    TokenizerLike,
    batch_iterator,
    collate,
    pack,
    tokenize,
)
from edge_runtime.errors import UserError
from edge_runtime.lora import lora_modules
from edge_runtime.losses import count_label_tokens, token_loss_sum
from edge_runtime.memory import hwm_mb
from edge_runtime.model import CausalLM
from edge_runtime.prefix_cache import PrefixCache

__all__ = ["TrainResult", "train", "train_tokenized", "peak_rss_mb", "trainable_parameters"]

log = logging.getLogger(__name__)

Regularizer = Callable[[CausalLM], torch.Tensor]


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_early: bool = False
    num_samples: int = 0
    peak_rss_mb: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    prefix_hits: int = 0  # example rows whose frozen-prefix states came from the cache
    prefix_misses: int = 0

    def to_json(self) -> dict:
        return {
            "steps": self.steps, "tokens": self.tokens, "losses": self.losses,
            "elapsed_s": round(self.elapsed_s, 3), "stopped_early": self.stopped_early,
            "num_samples": self.num_samples, "peak_rss_mb": round(self.peak_rss_mb, 1),
            "step_times_s": [round(t, 4) for t in self.step_times_s],
            "prefix_hits": self.prefix_hits, "prefix_misses": self.prefix_misses,
        }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM where Linux has it (ru_maxrss,
    in KiB, would include the parent's peak for a process started by one)."""
    hwm = hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def trainable_parameters(model: CausalLM) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_checkpoint(ckpt_dir: Path, model: CausalLM, opt: torch.optim.Optimizer, step: int
                     ) -> None:
    """Trainable weights and AdamW moments as safetensors, the step as JSON (no pickle)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in trainable_parameters(model):
        tensors[f"param/{name}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"{key}/{name}"] = st[key].contiguous()
        if "step" in st:
            tensors[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tmp = ckpt_dir / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt_dir / "state.safetensors")
    (ckpt_dir / "progress.json").write_text(json.dumps({"step": step}))


def _load_checkpoint(ckpt_dir: Path, model: CausalLM, opt: torch.optim.Optimizer) -> int:
    path = ckpt_dir / "state.safetensors"
    if not path.is_file():
        raise UserError(f"no checkpoint in {ckpt_dir}; train without --resume first")
    tensors = load_file(str(path))
    params = dict(trainable_parameters(model))
    expected = {f"param/{n}" for n in params}
    got = {k for k in tensors if k.startswith("param/")}
    if expected != got:
        raise UserError(f"checkpoint {path} was made with another LoRA plan "
                        f"({len(got)} tensors vs {len(expected)} expected); start a new --out")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
            st = opt.state[p]
            if f"exp_avg/{name}" in tensors:
                st["exp_avg"] = tensors[f"exp_avg/{name}"].clone()
                st["exp_avg_sq"] = tensors[f"exp_avg_sq/{name}"].clone()
                st["step"] = tensors[f"step/{name}"].reshape(()).clone()
    return int(json.loads((ckpt_dir / "progress.json").read_text())["step"])


def train(model: CausalLM, tokenizer: TokenizerLike, examples: list[Example], cfg: TrainConfig,
          *, regularizer: Regularizer | None = None, deadline: float | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False,
          checkpoint_every: int = 0, prefix_cache: PrefixCache | None = None) -> TrainResult:
    """Tokenize `examples` and run `train_tokenized`."""
    data = tokenize(tokenizer, examples, cfg.seq_len)
    if cfg.packing:
        data = pack(data, cfg.seq_len)
    result = train_tokenized(model, data, tokenizer.pad_id, cfg, regularizer=regularizer,
                             deadline=deadline, checkpoint_dir=checkpoint_dir, resume=resume,
                             checkpoint_every=checkpoint_every, prefix_cache=prefix_cache)
    result.num_samples = len(examples)
    return result


def train_tokenized(model: CausalLM, data: list[TokenizedExample], pad_id: int,
                    cfg: TrainConfig, *, regularizer: Regularizer | None = None,
                    deadline: float | None = None, checkpoint_dir: Path | None = None,
                    resume: bool = False, checkpoint_every: int = 0,
                    prefix_cache: PrefixCache | None = None) -> TrainResult:
    """Train the model's trainable (LoRA) parameters for `cfg.steps` optimizer steps.

    `prefix_cache`: a cache the caller keeps across calls (rebound to the model's current
    frozen prefix and `cfg.prefix_cache_mb` here); None builds one for this call.

    Stops early, between steps, when the next step would end past `deadline`
    (a `time.monotonic()` value) or past `cfg.time_budget_s` from the start.
    """
    if not lora_modules(model):
        raise UserError("the model has no LoRA modules to train; apply a LoRA plan first")
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)
    start_step = 0
    if resume and checkpoint_dir is not None:
        start_step = _load_checkpoint(checkpoint_dir, model, opt)
        log.info("resumed from %s at step %d", checkpoint_dir, start_step)
    batches = batch_iterator(data, cfg.batch_size, cfg.seed)
    cache: PrefixCache | None = None
    if cfg.prefix_cache_mb > 0 and model.frozen_prefix > 0:
        cache = prefix_cache if prefix_cache is not None else PrefixCache.of_mb(
            cfg.prefix_cache_mb)
        cache.bind(model, cfg.prefix_cache_mb)
    hits0, misses0 = (cache.hits, cache.misses) if cache is not None else (0, 0)
    # Skip what a resumed run already consumed, so the data order is the same.
    for _ in range(start_step * cfg.grad_accum):
        next(batches)

    t0 = time.monotonic()
    if cfg.time_budget_s is not None:
        budget_end = t0 + cfg.time_budget_s
        deadline = budget_end if deadline is None else min(deadline, budget_end)
    result = TrainResult(steps=start_step)
    model.train()
    for step in range(start_step, cfg.steps):
        if deadline is not None:
            typical = max(result.step_times_s[-3:]) if result.step_times_s else 0.0
            if time.monotonic() + typical > deadline:
                result.stopped_early = True
                log.info("stopping before step %d: the next step would pass the deadline", step)
                break
        ts = time.monotonic()
        examples = [next(batches) for _ in range(cfg.grad_accum)]
        micro = [collate(batch, pad_id) for batch in examples]
        n_total = sum(count_label_tokens(lab) for _, lab in micro)
        loss_value = 0.0
        for batch, (ids, labels) in zip(examples, micro, strict=True):
            prefix = (cache.states(model, [ex.input_ids for ex in batch], ids)
                      if cache is not None else None)
            loss_sum, _ = token_loss_sum(model, ids, labels, prefix=prefix)
            loss = loss_sum / max(n_total, 1)
            loss.backward()
            loss_value += float(loss.detach())
        if regularizer is not None:
            reg = regularizer(model)
            reg.backward()
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {step}; lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.monotonic() - ts
        result.step_times_s.append(dt)
        result.losses.append(loss_value)
        result.tokens += sum(int(ids.numel()) for ids, _ in micro)
        result.steps = step + 1
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            tps = sum(int(ids.numel()) for ids, _ in micro) / dt
            log.info("step %d/%d loss %.4f  %.0f tok/s  %.2f s/step", step + 1, cfg.steps,
                     loss_value, tps, dt)
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save_checkpoint(checkpoint_dir, model, opt, step + 1)
    if checkpoint_dir is not None:
        _save_checkpoint(checkpoint_dir, model, opt, result.steps)
    model.eval()
    result.elapsed_s = time.monotonic() - t0
    result.peak_rss_mb = peak_rss_mb()
    if cache is not None:
        result.prefix_hits, result.prefix_misses = cache.hits - hits0, cache.misses - misses0
    return result
