"""Trainer: learns, stops at a deadline, and a resumed run equals an uninterrupted one."""

import time
from pathlib import Path

import pytest
import torch

from edge_runtime.checkpoints import load_model
from edge_runtime.config import LoRAPlan, TrainConfig
from edge_runtime.data import load_jsonl
from edge_runtime.errors import UserError
from edge_runtime.evaluate import choice_accuracy, eval_loss
from edge_runtime.lora import apply_lora, get_adapter
from edge_runtime.trainer import train

FIX = Path(__file__).parent / "fixtures"


def tiny_with_lora(rank: int = 4):
    loaded = load_model("tiny")
    apply_lora(loaded.model, LoRAPlan(rank=rank, depth=2, targets=("q", "v", "up", "down")))
    return loaded


def test_training_lowers_held_out_loss():
    loaded = tiny_with_lora()
    data = load_jsonl(FIX / "qa.jsonl")
    before = eval_loss(loaded.model, loaded.tokenizer, data, seq_len=64)
    res = train(loaded.model, loaded.tokenizer, data,
                TrainConfig(steps=30, lr=3e-3, batch_size=8, seq_len=64, log_every=0))
    after = eval_loss(loaded.model, loaded.tokenizer, data, seq_len=64)
    assert res.steps == 30 and not res.stopped_early
    assert after < before - 0.5, (before, after)
    assert res.num_samples == len(data) and res.tokens > 0 and res.peak_rss_mb > 0


def test_deadline_stops_cleanly_between_steps():
    loaded = tiny_with_lora()
    data = load_jsonl(FIX / "qa.jsonl")
    res = train(loaded.model, loaded.tokenizer, data,
                TrainConfig(steps=100000, batch_size=2, seq_len=32, log_every=0),
                deadline=time.monotonic() + 1.0)
    assert res.stopped_early
    assert 0 < res.steps < 100000
    assert res.elapsed_s < 3.0


def test_resume_equals_uninterrupted_run(tmp_path):
    data = load_jsonl(FIX / "qa.jsonl")
    cfg6 = TrainConfig(steps=6, lr=1e-2, batch_size=4, seq_len=48, grad_accum=2, log_every=0)
    straight = tiny_with_lora()
    train(straight.model, straight.tokenizer, data, cfg6)

    first = tiny_with_lora()
    cfg3 = TrainConfig(steps=3, lr=1e-2, batch_size=4, seq_len=48, grad_accum=2, log_every=0)
    train(first.model, first.tokenizer, data, cfg3, checkpoint_dir=tmp_path)
    resumed = tiny_with_lora()
    res = train(resumed.model, resumed.tokenizer, data, cfg6, checkpoint_dir=tmp_path, resume=True)
    assert res.steps == 6 and len(res.losses) == 3
    a, b = get_adapter(straight.model), get_adapter(resumed.model)
    for k in a:
        assert torch.allclose(a[k].lora_b, b[k].lora_b, atol=1e-6), k


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    loaded = tiny_with_lora()
    with pytest.raises(UserError, match="no checkpoint"):
        train(loaded.model, loaded.tokenizer, load_jsonl(FIX / "qa.jsonl"),
              TrainConfig(steps=1, log_every=0), checkpoint_dir=tmp_path, resume=True)


def test_choice_accuracy_scores_by_log_likelihood():
    loaded = load_model("tiny")
    data = load_jsonl(FIX / "choice.jsonl")
    acc = choice_accuracy(loaded.model, loaded.tokenizer, data)
    assert 0.0 <= acc <= 1.0
    # Brute force for one row: the higher summed log-prob wins.
    from edge_runtime.evaluate import choice_logprobs
    ex = data[0]
    scores = choice_logprobs(loaded.model, loaded.tokenizer, ex.prompt, ex.choices)
    p_ids = loaded.tokenizer.encode(loaded.tokenizer.chat_prompt(
        [{"role": "user", "content": ex.prompt}]))
    c_ids = loaded.tokenizer.encode(ex.choices[0])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([p_ids + c_ids]))[0], -1)
    manual = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids))
    assert abs(manual - scores[0]) < 1e-4
