import numpy as np
import pytest
import torch
from fl_helpers import make_update, rand_adapter

from edge_runtime.adapter import LoRAWeights
from edge_runtime.config import FlexLoRAConfig
from edge_runtime.fl.flexlora import FlexLoRA, FlexLoRAAccumulator, best_rank_r
from edge_runtime.fl.svd import factored_svd, orthonormal_completion, randomized_svd
from edge_runtime.fl.types import ClientPlan

SH = {"model.layers.0.mlp.up_proj": (40, 24), "model.layers.0.self_attn.v_proj": (16, 24)}
R_G = 8


def _weighted_dense(ups, name):
    n = sum(u.num_samples for u in ups)
    return sum((u.num_samples / n) * u.adapter[name].delta() for u in ups)


@pytest.mark.parametrize("case", ["generic", "duplicated", "wide_stack"])
def test_factored_svd_equals_numpy_svd(case):
    gen = torch.Generator().manual_seed(0)
    r = 60 if case == "wide_stack" else 9  # R above d_out = 50: reduced QR on one side
    b = torch.randn(50, r, generator=gen, dtype=torch.float64)
    a = torch.randn(r, 70, generator=gen, dtype=torch.float64)
    if case == "duplicated":  # two clients sent the same factors: a rank-deficient stack
        b, a = torch.cat([b, b], 1), torch.cat([a, a], 0)
    res = factored_svd(b, a)
    s_np = np.linalg.svd((b @ a).numpy(), compute_uv=False)
    k = min(res.s.shape[0], 9 if case != "wide_stack" else 50)
    np.testing.assert_allclose(res.s.numpy()[:k], s_np[:k], rtol=1e-9)
    torch.testing.assert_close((res.u * res.s) @ res.vh, b @ a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.u.t() @ res.u, torch.eye(res.u.shape[1], dtype=b.dtype),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["factored", "auto", "streaming"])
def test_aggregate_matches_full_svd_and_is_eckart_young(mode):
    gen = torch.Generator().manual_seed(1)
    g = rand_adapter(gen, {n: R_G for n in SH}, shapes=SH)
    ups = [make_update(gen, f"d{i}", {n: r for n in SH}, i + 2, shapes=SH)
           for i, r in enumerate([2, 3, 4])]  # R = 9 < min(d_out, d_in) = 16
    cfg = FlexLoRAConfig(mode=mode)
    out = FlexLoRA(cfg).aggregate(g, ups)
    full = FlexLoRA(FlexLoRAConfig(mode="full"))
    full_acc = FlexLoRAAccumulator(g, full.cfg, dtype=torch.float64)
    for u in ups:
        full_acc.add(u)
    ref = full_acc.result()
    for name in SH:
        d = _weighted_dense(ups, name).numpy()
        u_, s_, vt_ = np.linalg.svd(d)
        best = (u_[:, :R_G] * s_[:R_G]) @ vt_[:R_G]
        got = out[name].delta().numpy()
        tol = 1e-5 if mode != "streaming" else 1e-4  # streaming keeps a float32 sum
        assert np.linalg.norm(got - best) / np.linalg.norm(best) <= tol
        assert np.linalg.norm(ref[name].delta().numpy() - got) / np.linalg.norm(got) <= tol
        # every redistributed adapter is the best rank-r approximation of the aggregate
        for r in (1, 3, R_G):
            local = FlexLoRA(cfg).distribute(out, ClientPlan("c", {name: r}))[name]
            err = np.linalg.norm(d - local.delta().numpy())
            opt = np.sqrt((s_[r:] ** 2).sum())
            assert err <= opt * (1 + 1e-4) + 1e-9 * s_[0]
            assert local.rank == r and local.scale == 16.0 / r


def test_streaming_many_clients_top_singular_values():
    gen = torch.Generator().manual_seed(2)
    shapes = {"m.layers.0.x": (60, 90)}
    g = rand_adapter(gen, {"m.layers.0.x": 6}, shapes=shapes)
    ups = [make_update(gen, f"d{i}", {"m.layers.0.x": 4}, 1, shapes=shapes) for i in range(20)]
    d = _weighted_dense(ups, "m.layers.0.x").numpy()
    s_np = np.linalg.svd(d, compute_uv=False)
    opt = np.sqrt((s_np[6:] ** 2).sum() / (s_np ** 2).sum())
    for mode, path in (("auto", "gram"), ("randomized", "randomized")):
        acc = FlexLoRAAccumulator(g, FlexLoRAConfig(mode=mode, oversample=4))
        for u in ups:
            acc.add(u)
        out = acc.result()
        rep = acc.report["m.layers.0.x"]
        assert rep.path == path and rep.stacked_rank == 80
        s_got = np.linalg.svd(out["m.layers.0.x"].delta().numpy(), compute_uv=False)[:6]
        np.testing.assert_allclose(s_got, s_np[:6], rtol=1e-4)
        assert rep.residual_rel == pytest.approx(opt, rel=1e-3)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_streaming_gram_is_exactly_maintained(shape):
    gen = torch.Generator().manual_seed(5)
    shapes = {"m.layers.0.x": shape}
    g = rand_adapter(gen, {"m.layers.0.x": 4}, shapes=shapes)
    ups = [make_update(gen, f"d{i}", {"m.layers.0.x": 3}, i + 1, shapes=shapes)
           for i in range(12)]
    acc = FlexLoRAAccumulator(g, FlexLoRAConfig(mode="streaming"), dtype=torch.float64)
    for u in ups:
        acc.add(u)
    st = acc._state["m.layers.0.x"]
    d = st.dense
    ref = d.t() @ d if shape[1] <= shape[0] else d @ d.t()
    torch.testing.assert_close(st.gram, ref, rtol=1e-10, atol=1e-8)


def test_randomized_svd_converges_on_a_flat_spectrum():
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(80, 120, generator=gen, dtype=torch.float64)
    res = randomized_svd(d, 10, oversample=4, tol=1e-10, max_iters=200)
    s_np = np.linalg.svd(d.numpy(), compute_uv=False)
    np.testing.assert_allclose(res.s.numpy(), s_np[:10], rtol=1e-6)
    assert res.power_iters > 4  # a flat spectrum needs more than a fixed handful


def test_fresh_adapter_truncates_and_padding_stays_trainable():
    a = torch.randn(8, 10, dtype=torch.float64)
    w = LoRAWeights(a, torch.zeros(6, 8, dtype=torch.float64), 16.0)
    out = best_rank_r(w, 3, 16.0)
    torch.testing.assert_close(out.lora_a, a[:3])
    vh = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64))[0].t()
    full = orthonormal_completion(vh, 5)
    torch.testing.assert_close(full @ full.t(), torch.eye(5, dtype=torch.float64), atol=1e-12,
                               rtol=0)


def test_empty_and_one_client_rounds():
    gen = torch.Generator().manual_seed(4)
    g = rand_adapter(gen, {n: R_G for n in SH}, shapes=SH)
    same = FlexLoRA().aggregate(g, [])
    for n in SH:
        torch.testing.assert_close(same[n].delta(), g[n].delta())
    u = make_update(gen, "d0", {n: 3 for n in SH}, 5, shapes=SH)
    one = FlexLoRA().aggregate(g, [u])
    for n in SH:  # rank 3 <= R_G: the aggregate is the client's product exactly
        torch.testing.assert_close(one[n].delta(), u.adapter[n].delta(), rtol=1e-5, atol=1e-5)
        assert one[n].rank == R_G
