import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.fl.fedavg import FedAvg, FedAvgAccumulator
from edge_runtime.fl.types import ClientPlan, UpdateMismatchError

RANKS = {n: 4 for n in SHAPES}


def test_weights_are_sample_counts():
    gen = torch.Generator().manual_seed(0)
    g = rand_adapter(gen, RANKS)
    ups = [make_update(gen, f"d{i}", RANKS, n) for i, n in enumerate([1, 3, 6])]
    out = FedAvg().aggregate(g, ups)
    for name in SHAPES:
        # brute force: explicit weights 0.1, 0.3, 0.6
        ref_a = 0.1 * ups[0].adapter[name].lora_a + 0.3 * ups[1].adapter[name].lora_a \
            + 0.6 * ups[2].adapter[name].lora_a
        ref_b = 0.1 * ups[0].adapter[name].lora_b + 0.3 * ups[1].adapter[name].lora_b \
            + 0.6 * ups[2].adapter[name].lora_b
        torch.testing.assert_close(out[name].lora_a.double(), ref_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[name].lora_b.double(), ref_b, rtol=1e-6, atol=1e-6)
        # the product of averages is not the average of products
        avg_prod = sum(p * u.adapter[name].delta() for p, u in zip([.1, .3, .6], ups, strict=False))
        assert (out[name].delta() - avg_prod).abs().max() > 1e-3


def test_empty_round_keeps_global_and_one_client_round_is_that_client():
    gen = torch.Generator().manual_seed(1)
    g = rand_adapter(gen, RANKS)
    out = FedAvg().aggregate(g, [])
    for name in g:
        assert torch.equal(out[name].lora_a, g[name].lora_a.to(out[name].lora_a.dtype))
    u = make_update(gen, "d0", RANKS, 7)
    out = FedAvg().aggregate(g, [u])
    for name in g:
        torch.testing.assert_close(out[name].lora_b.double(), u.adapter[name].lora_b)


def test_accumulator_matches_batch_in_any_order():
    gen = torch.Generator().manual_seed(2)
    g = rand_adapter(gen, RANKS)
    ups = [make_update(gen, f"d{i}", RANKS, i + 1) for i in range(4)]
    batch = FedAvg().aggregate(g, ups)
    acc = FedAvgAccumulator(g)
    for u in reversed(ups):
        acc.add(u)
    inc = acc.result()
    assert acc.count == 4
    for name in g:
        torch.testing.assert_close(inc[name].lora_a, batch[name].lora_a, rtol=1e-12, atol=1e-12)


def test_mismatches_raise():
    gen = torch.Generator().manual_seed(3)
    g = rand_adapter(gen, RANKS)
    bad_rank = make_update(gen, "d0", {n: 2 for n in SHAPES}, 1)
    with pytest.raises(UpdateMismatchError, match="homogeneous"):
        FedAvg().aggregate(g, [bad_rank])
    missing = make_update(gen, "d1", RANKS, 1)
    del missing.adapter["model.layers.0.self_attn.q_proj"]
    with pytest.raises(UpdateMismatchError, match="lacks"):
        FedAvg().aggregate(g, [missing])
    wrong_shape = make_update(gen, "d2", RANKS, 1, shapes={n: (5, 5) for n in SHAPES})
    with pytest.raises(UpdateMismatchError, match="wrong base"):
        FedAvg().aggregate(g, [wrong_shape])
    with pytest.raises(UpdateMismatchError, match="differs"):
        FedAvg().distribute(g, ClientPlan("d3", {n: 2 for n in SHAPES}))
    nan = make_update(gen, "d4", RANKS, 1)
    nan.adapter["model.layers.1.mlp.down_proj"].lora_a[0, 0] = float("nan")
    with pytest.raises(UpdateMismatchError, match="non-finite"):
        FedAvg().aggregate(g, [nan])
