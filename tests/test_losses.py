"""The one loss: equals full-logit cross-entropy, and accumulation equals one big batch."""

import pytest
import torch
import torch.nn.functional as F

from edge_runtime.config import LoRAPlan
from edge_runtime.data import IGNORE
from edge_runtime.lora import apply_lora, lora_modules
from edge_runtime.losses import count_label_tokens, head_loss_sum, token_loss_sum
from edge_runtime.model import CausalLM, ModelConfig


def model() -> CausalLM:
    torch.manual_seed(0)
    m = CausalLM(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             hidden_dim=48))
    apply_lora(m, LoRAPlan(rank=2, depth=2))
    for mod in lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_b)
    return m


def batch(seed: int, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = IGNORE  # prompt part
    labels[0, -2:] = IGNORE  # padding in one row
    return ids, labels


def test_selected_logits_equal_full_cross_entropy():
    m = model()
    ids, labels = batch(0, 3, 12)
    loss_sum, n = token_loss_sum(m, ids, labels)
    logits = m(ids)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    assert n == count_label_tokens(labels) == int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(loss_sum, full, atol=1e-4)


def test_accumulated_gradient_equals_one_big_batch():
    """Micro-batches with different token counts: divide by the whole batch's count."""
    ids1, lab1 = batch(1, 2, 10)
    ids2, lab2 = batch(2, 2, 10)
    lab2[1, 5:] = IGNORE  # fewer tokens in the second micro-batch
    m_big, m_acc = model(), model()
    s, n = token_loss_sum(m_big, torch.cat([ids1, ids2]), torch.cat([lab1, lab2]))
    (s / n).backward()
    n_total = count_label_tokens(lab1) + count_label_tokens(lab2)
    for ids, lab in ((ids1, lab1), (ids2, lab2)):
        s_i, _ = token_loss_sum(m_acc, ids, lab)
        (s_i / n_total).backward()
    for (name, p1), (_, p2) in zip(m_big.named_parameters(), m_acc.named_parameters(), strict=True):
        if p1.requires_grad:
            assert torch.allclose(p1.grad, p2.grad, atol=1e-6), name


@pytest.mark.parametrize("scale", [0.3, 40.0])  # 40: logits in the hundreds, a max that
# moves between blocks and exponentials that overflow without the running max
def test_fused_head_loss_and_gradient_equal_autograd_in_float64(monkeypatch, scale):
    """The chunked head computes h's gradient in its forward; check value and gradient
    against plain autograd on the whole (N, V) logits in float64, across chunk edges."""
    from edge_runtime import losses

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(24, 700, bias=False)
    head.weight.data = torch.randn(700, 24, generator=g) * scale
    head.weight.requires_grad_(False)
    h = torch.randn(53, 24, generator=g, requires_grad=True)
    target = torch.randint(0, 700, (53,), generator=g)
    # passes of 20 rows (the last one 13) over vocabulary blocks of 64 (the last one 60)
    monkeypatch.setattr(losses, "HEAD_MAX_ROWS", 20)
    monkeypatch.setattr(losses, "HEAD_MIN_BLOCK", 1)
    monkeypatch.setattr(losses, "HEAD_CHUNK_BYTES", 4 * 20 * 64)
    assert losses.head_block(700, 20) == 64
    out = head_loss_sum(head, h, target)
    (2.5 * out).backward()
    h64 = h.detach().double().requires_grad_(True)
    ref = F.cross_entropy(h64 @ head.weight.double().t(), target, reduction="sum")
    (2.5 * ref).backward()
    assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
    # float32 bar: plain fp32 autograd's own distance from float64 (logits in the
    # hundreds at scale 40 round at ~1e-5 relative, whatever the algorithm)
    h32 = h.detach().clone().requires_grad_(True)
    (2.5 * F.cross_entropy(h32 @ head.weight.t(), target, reduction="sum")).backward()
    err = (h.grad.double() - h64.grad).abs().max().item()
    err32 = (h32.grad.double() - h64.grad).abs().max().item()
    assert err <= 2 * err32 + 1e-6 * h64.grad.abs().max().item(), (err, err32)
    if scale < 1:
        torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: same value, no gradient work
        assert abs(head_loss_sum(head, h, target).item() - ref.item()) < 1e-5 * ref.item()


def test_trainable_head_takes_plain_autograd():
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(5, 8)
    target = torch.randint(0, 30, (5,))
    head_loss_sum(head, h, target).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
