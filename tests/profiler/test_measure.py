"""Measurements: peak RSS sees a known allocation, saved-tensor accounting matches a hand
count, every microbenchmark leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_runtime.config import LoRAPlan
from edge_runtime.lora import lora_modules
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.profiler.measure import (
    PeakRSS,
    _SavedBytes,
    device_info,
    measure_block_forward,
    measure_block_train,
    measure_head,
    measure_optimizer,
    measure_step,
    random_batch,
)

TINY = ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=128)


@pytest.fixture
def tiny() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(TINY).eval()


def test_peak_rss_sees_a_short_lived_allocation() -> None:
    with PeakRSS() as mem:
        t = torch.ones(64 << 18)  # 64 MiB of fp32, every page written
        del t
    assert mem.method in ("vmhwm", "psutil-sampler")
    assert 60.0 <= mem.delta_mb <= 90.0


def test_saved_bytes_match_a_hand_count() -> None:
    lin1, lin2 = nn.Linear(16, 32), nn.Linear(32, 8)
    holder = nn.Sequential(lin1, nn.ReLU(), lin2)
    for p in holder.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    saved = _SavedBytes(holder)  # type: ignore[arg-type]
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        holder(x).sum().backward()
    # A frozen linear needs only its weight (the model's own, not counted) for the input
    # gradient; relu keeps its output (5x32).
    assert saved.total == 5 * 32 * 4
    lin2.weight.requires_grad_(True)  # now lin2 also keeps its input for the weight gradient
    saved = _SavedBytes(holder)  # type: ignore[arg-type]
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        holder(x * 2).sum().backward()
    # relu's output is also lin2's input: saved twice, one storage, counted once.
    assert saved.total == 5 * 32 * 4


def test_microbenchmarks_report_sane_numbers_and_restore_the_model(tiny: CausalLM) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    f = measure_block_forward(tiny, 2, 16, 1, 2)
    assert f["time_s"] > 0 and len(f["times_s"]) == 2 and f["cpu_s"] >= 0
    t = measure_block_train(tiny, ("q_proj", "v_proj"), 4, 2, 16, 1, 2)
    assert t["rank_width"] == 4 * ((64 + 64) + (64 + 32))
    # Inputs of the two norms, q/k/v/attention/MLP activations: at least a few (B,T,dim).
    assert t["saved_mb"] * 2**20 >= 4 * (2 * 16 * 64 * 4)
    assert t["retained_mb"] >= 0.0 and t["stack"] == 3
    h = measure_head(tiny, 10, 1, 2)
    assert h["label_tokens"] == 10 and h["time_s"] > 0
    o = measure_optimizer([(4, 64), (64, 4)], 1, 2)
    assert o["params"] == 512 and o["tensors"] == 2
    s = measure_step(tiny, LoRAPlan(rank=4, depth=2), 2, 16, 0.5, 1, 1)
    assert s["peak_rss_mb"] >= s["start_rss_mb"] > 0
    assert not lora_modules(tiny) and tiny.frozen_prefix == 0
    after = tiny.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_random_batch_labels_only_the_response_part() -> None:
    ids, labels = random_batch(320, 2, 11, 0.5)
    assert ids.shape == labels.shape == (2, 11)
    assert (labels[:, :6] == -100).all() and (labels[:, 6:] == ids[:, 6:]).all()
    _, all_lab = random_batch(320, 1, 9, 1.0)
    assert (all_lab[:, 0] == -100).all() and (all_lab[:, 1:] != -100).all()


def test_device_info_has_the_basics() -> None:
    info = device_info()
    assert info["cores_logical"] >= 1 and info["total_ram_mb"] > 0
    assert 0 < info["available_ram_mb"] <= info["total_ram_mb"]
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
