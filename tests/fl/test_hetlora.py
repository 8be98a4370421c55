import math

import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.adapter import LoRAWeights, frobenius_norm_ba
from edge_runtime.config import HetLoRAConfig
from edge_runtime.fl.hetlora import (
    HetLoRA,
    HetLoRAAccumulator,
    prune_adapter,
    prune_ranks,
    sparsity_score,
    tail_norms,
    tail_penalty,
    tail_start,
)
from edge_runtime.fl.types import ClientPlan, UpdateMismatchError

R_MAX = 8


def test_frobenius_without_forming_ba():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    a = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    assert float(frobenius_norm_ba(b, a)) == pytest.approx(float(torch.linalg.norm(b @ a)),
                                                           rel=1e-12)


def test_padding_and_sparsity_weights_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    g = rand_adapter(gen, {n: R_MAX for n in SHAPES})
    client_ranks = [2, 4, 8]
    ups = [make_update(gen, f"d{i}", {n: r for n in SHAPES}, 10 * (i + 1))
           for i, r in enumerate(client_ranks)]
    out = HetLoRA().aggregate(g, ups)
    # brute force: dense norms of every module's s B A, then explicit zero-padded averages
    scores = [math.sqrt(sum(float(torch.linalg.norm(w.delta())) ** 2
                            for w in u.adapter.values())) for u in ups]
    for u, s in zip(ups, scores, strict=False):
        assert sparsity_score(u.adapter) == pytest.approx(s, rel=1e-10)
    p = [s / sum(scores) for s in scores]
    s_g = 16.0 / R_MAX
    for name, (d_out, d_in) in SHAPES.items():
        ref_sb = torch.zeros(d_out, R_MAX, dtype=torch.float64)
        ref_a = torch.zeros(R_MAX, d_in, dtype=torch.float64)
        for pk, u in zip(p, ups, strict=False):
            w = u.adapter[name]
            padded_b = torch.zeros(d_out, R_MAX, dtype=torch.float64)
            padded_a = torch.zeros(R_MAX, d_in, dtype=torch.float64)
            for j in range(w.rank):
                padded_b[:, j] = w.lora_b[:, j] * (16.0 / w.rank)
                padded_a[j] = w.lora_a[j]
            ref_sb += pk * padded_b
            ref_a += pk * padded_a
        torch.testing.assert_close(out[name].lora_a.double(), ref_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[name].lora_b.double() * s_g, ref_sb, rtol=1e-6, atol=1e-6)
        assert out[name].rank == R_MAX


def test_distribute_truncates_and_keeps_the_product():
    gen = torch.Generator().manual_seed(2)
    g = rand_adapter(gen, {n: R_MAX for n in SHAPES})
    plan = ClientPlan("d0", {n: 3 for n in SHAPES}, 16.0)
    local = HetLoRA().distribute(g, plan)
    for name, w in g.items():
        ref = (16.0 / R_MAX) * w.lora_b[:, :3] @ w.lora_a[:3]
        torch.testing.assert_close(local[name].delta(), ref, rtol=1e-6, atol=1e-6)
        assert local[name].rank == 3
    with pytest.raises(UpdateMismatchError, match="above the global rank"):
        HetLoRA().distribute(g, ClientPlan("d1", {n: R_MAX + 1 for n in SHAPES}))


def test_tail_penalty_has_gradient_and_matches_manual():
    from edge_runtime.lora import LoRALinear

    torch.manual_seed(0)
    mods = {"m": LoRALinear(torch.nn.Linear(6, 5), 6, 5, 4, 8.0)}
    with torch.no_grad():
        mods["m"].lora_b.normal_()
        mods["m"].lora_a.normal_()
    pen = tail_penalty(mods, gamma=0.5, lam=0.1)
    a, b = mods["m"].lora_a, mods["m"].lora_b
    manual = 0.1 * torch.linalg.norm(b[:, 2:]) * torch.linalg.norm(a[2:])
    assert float(pen.detach()) == pytest.approx(float(manual.detach()), rel=1e-6)
    pen.backward()
    assert a.grad is not None and float(a.grad[2:].abs().sum()) > 0
    assert float(a.grad[:2].abs().sum()) == 0.0  # the head is not penalised
    assert tail_start(4, 0.9) == 3 and tail_start(10, 0.9) == 9 and tail_start(1, 0.9) == 1


def test_prune_rule_and_truncation():
    cfg = HetLoRAConfig(gamma=0.75, lam=1e-3, r_min=3)
    ranks = {"a": 8, "b": 8, "c": 3}
    before = {"a": 1.0, "b": 1.0, "c": 1.0}
    after = {"a": 0.5, "b": 1.5, "c": 0.1}
    # a: tail fell -> floor(0.75 * 8) = 6; b: grew -> stays; c: at r_min -> stays
    assert prune_ranks(before, after, ranks, cfg) == {"a": 6, "b": 8, "c": 3}
    assert prune_ranks(before, after, ranks, HetLoRAConfig(prune=False)) == ranks
    gen = torch.Generator().manual_seed(3)
    w = LoRAWeights(torch.randn(8, 7, generator=gen, dtype=torch.float64),
                    torch.randn(5, 8, generator=gen, dtype=torch.float64), 16.0)
    cut = prune_adapter({"a": w}, {"a": 6})["a"]
    ref = (16.0 / 8) * w.lora_b[:, :6] @ w.lora_a[:6]
    torch.testing.assert_close(cut.delta(), ref)
    assert cut.rank == 6


def test_finish_local_prunes_only_when_tail_shrinks():
    gen = torch.Generator().manual_seed(4)
    name = "model.layers.0.self_attn.q_proj"
    start = rand_adapter(gen, {name: 8})
    trained = {name: start[name].clone()}
    trained[name].lora_b[:, 7:] *= 0.1  # the tail shrank during training
    out = HetLoRA(HetLoRAConfig(gamma=0.9, r_min=4)).finish_local(
        start, trained, ClientPlan("d", {name: 8}))
    assert out[name].rank == 7
    assert tail_norms(trained, 0.9)[name] < tail_norms(start, 0.9)[name]
    grown = {name: start[name].clone()}
    grown[name].lora_b[:, 7:] *= 2.0
    out = HetLoRA().finish_local(start, grown, ClientPlan("d", {name: 8}))
    assert out[name].rank == 8


def test_pruned_update_is_accepted_and_empty_round_is_identity():
    gen = torch.Generator().manual_seed(5)
    g = rand_adapter(gen, {n: R_MAX for n in SHAPES})
    u = make_update(gen, "d0", {n: 6 for n in SHAPES}, 3)
    u.plan = ClientPlan("d0", {n: 8 for n in SHAPES})  # planned 8, pruned to 6
    acc = HetLoRAAccumulator(g)
    acc.add(u)
    out = acc.result()
    for name in SHAPES:  # one client: its padded factors exactly
        torch.testing.assert_close(out[name].delta(), u.adapter[name].delta())
    same = HetLoRA().aggregate(g, [])
    for name in SHAPES:
        torch.testing.assert_close(same[name].delta(), g[name].delta())


@pytest.mark.parametrize("weighting", ["uniform", "samples", "sparsity"])
@pytest.mark.parametrize("rankwise", [False, True])
def test_weighting_and_rankwise_against_numpy(weighting: str, rankwise: bool) -> None:
    """Brute force in numpy: pad every client's s B / A to r_max, weigh, divide by the
    total weight (zero-padded) or by the weight of the clients holding each component."""
    import numpy as np

    from edge_runtime.config import HetLoRAConfig

    gen = torch.Generator().manual_seed(11)
    g = rand_adapter(gen, {n: R_MAX for n in SHAPES})
    ranks = [2, 5, R_MAX]
    ups = [make_update(gen, f"d{i}", {n: r for n in SHAPES}, 3 + 4 * i)
           for i, r in enumerate(ranks)]
    cfg = HetLoRAConfig(weighting=weighting, rankwise=rankwise, prune=False)
    out = HetLoRA(cfg).aggregate(g, ups)
    w = {"uniform": [1.0] * 3, "samples": [float(u.num_samples) for u in ups],
         "sparsity": [float(np.sqrt(sum(np.linalg.norm(x.delta().numpy()) ** 2
                                        for x in u.adapter.values()))) for u in ups]}[weighting]
    for name in SHAPES:
        d_out, d_in = SHAPES[name]
        sb = np.zeros((d_out, R_MAX))
        a = np.zeros((R_MAX, d_in))
        cw = np.zeros(R_MAX)
        for wk, u in zip(w, ups, strict=True):
            f = u.adapter[name]
            r = f.rank
            sb[:, :r] += wk * f.scale * f.lora_b.numpy()
            a[:r] += wk * f.lora_a.numpy()
            cw[:r] += wk
        if rankwise:
            want = (sb / cw[None, :]) @ (a / cw[:, None])
        else:
            want = (sb / sum(w)) @ (a / sum(w))
        np.testing.assert_allclose(out[name].delta().numpy(), want, rtol=1e-6, atol=1e-9)
    if rankwise:  # the top components only the rank-8 client has are not diluted
        top = ups[2].adapter[next(iter(SHAPES))]
        torch.testing.assert_close(out[next(iter(SHAPES))].lora_a[5:], top.lora_a[5:])
