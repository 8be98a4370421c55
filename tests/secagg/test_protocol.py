"""SecAgg+: what the server sees is masked, what it decodes is the plain sum, with and
without dropouts; bad messages drop their sender; the strategies' partial sums survive
the trip (fixed point)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.config import FlexLoRAConfig, HetLoRAConfig, StrategyConfig, StrategyName
from edge_runtime.errors import ConfigError
from edge_runtime.fl.registry import make_strategy
from edge_runtime.secagg import fixed_point
from edge_runtime.secagg.layout import layout_for
from edge_runtime.secagg.primitives import combine_shares, share_secret
from edge_runtime.secagg.protocol import (
    DeviceSession,
    SecAggError,
    SecAggParams,
    ServerSession,
    neighbours,
    run_in_process,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fl"))
from fl_helpers import SHAPES, make_update, rand_adapter  # noqa: E402


def _chi2_uniform_bytes(words: np.ndarray) -> float:
    """Chi-square statistic of the top byte of uint64 words against uniform (255 df)."""
    top = (words >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _vectors(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev{i:02d}": rng.normal(0, 3, size) for i in range(n)}


@pytest.mark.parametrize("n,degree", [(10, 0), (20, 14)])  # complete graph, SecAgg+ graph
def test_masked_inputs_look_uniform_and_the_sum_is_exact_with_30pct_dropped(
        n: int, degree: int) -> None:
    size = 20_000
    xs = _vectors(n, size)
    p = SecAggParams.choose(3, list(xs), size, degree=degree)
    devs = sorted(xs)
    dropped = frozenset(devs[: int(0.3 * n)])  # 30% vanish after sending their masked input
    total, survivors, wire, server = run_in_process(p, xs, drop_after_mask=dropped)
    assert survivors == devs  # their masked inputs count; their self masks were rebuilt
    plain = sum(xs.values())
    assert np.abs(total - plain).max() <= n * 2.0 ** -fixed_point.FRAC_BITS
    crit = _chi2_critical(255)
    for d, y in server.masked.items():
        assert _chi2_uniform_bytes(y) < crit, d  # indistinguishable from uniform noise
        x = fixed_point.encode(xs[d])
        assert abs(np.corrcoef(y.astype(np.float64), x.view(np.int64))[0, 1]) < 0.05
    # the test has power: the unmasked encodings are far from uniform
    assert _chi2_uniform_bytes(fixed_point.encode(xs[devs[0]])) > 10 * crit
    assert wire["up"] > n * 8 * size  # every device sent its whole masked vector


@pytest.mark.parametrize("n,degree", [(10, 0), (20, 14)])
def test_devices_that_drop_before_masking_leave_the_sum_of_the_others(n: int,
                                                                      degree: int) -> None:
    size = 3000
    xs = _vectors(n, size, seed=1)
    p = SecAggParams.choose(0, list(xs), size, degree=degree)
    devs = sorted(xs)
    gone = frozenset(devs[1: int(0.3 * n)])  # shared keys, never sent a masked input
    late = frozenset(devs[-1:])  # sent its masked input, then vanished: 30% gone in all
    total, survivors, _, _ = run_in_process(p, xs, drop_before_mask=gone,
                                            drop_after_mask=late)
    assert set(survivors) == set(devs) - gone
    plain = sum(xs[d] for d in survivors)
    assert np.abs(total - plain).max() <= n * 2.0 ** -fixed_point.FRAC_BITS


def test_a_device_never_opens_both_secrets_and_bad_messages_drop_the_sender() -> None:
    xs = _vectors(5, 100, seed=2)
    p = SecAggParams.choose(1, list(xs), 100)
    server = ServerSession(p)
    devs = {d: DeviceSession(p, d) for d in p.devices}
    for d, s in devs.items():
        server.on_advertise(d, s.advertise())
    for d, s in devs.items():
        server.on_share(d, s.share(server.roster_for(d)))
    a, b = sorted(devs)[:2]
    y = devs[a].mask(server.inbox_for(a), xs[a])
    with pytest.raises(SecAggError):  # a forged sender
        server.on_masked(b, y)
    with pytest.raises(SecAggError):  # a wrong length
        server.on_masked(a, y.replace(b'"y": "', b'"y": "AAAA'))
    with pytest.raises(SecAggError):
        server.on_masked(a, b"\xff garbage")
    server.on_masked(a, y)
    # a server asking to open a survivor's self mask and its key: refused
    with pytest.raises(SecAggError):
        devs[a].unmask(b'{"survivors": ["%s", "%s"], "dropped": ["%s"]}'
                       % (a.encode(), b.encode(), b.encode()))


def test_shamir_rebuilds_from_any_threshold_and_not_from_fewer() -> None:
    secret = bytes(range(32))
    shares = share_secret(secret, 3, 6)
    assert combine_shares(shares[:3]) == secret and combine_shares(shares[3:]) == secret
    assert combine_shares(shares[:2]) != secret


def test_neighbour_graph_is_symmetric_and_of_the_degree() -> None:
    devs = [f"d{i}" for i in range(30)]
    p = SecAggParams.choose(4, devs, 1, degree=8)
    graph = {d: set(neighbours(p, d)) for d in devs}
    for d, nb in graph.items():
        assert len(nb) == 8 and d not in nb
        assert all(d in graph[v] for v in nb)


@pytest.mark.parametrize("cfg", [StrategyConfig(StrategyName.HETLORA, HetLoRAConfig()),
                                 StrategyConfig(StrategyName.FLEXLORA, FlexLoRAConfig()),
                                 StrategyConfig(StrategyName.LEGEND, None)],
                         ids=lambda c: c.name.value)
def test_strategy_partials_summed_securely_give_the_plain_aggregate(cfg: StrategyConfig
                                                                   ) -> None:
    """Each device lays out its own one-update partial sum (weights applied on the
    device); the securely summed vector merges into the root to the plain aggregate."""
    gen = torch.Generator().manual_seed(3)
    strategy = make_strategy(StrategyConfig(cfg.name, cfg.settings) if cfg.settings
                             else StrategyConfig(cfg.name))
    g = rand_adapter(gen, {n: 4 for n in SHAPES}, dtype=torch.float32)
    top = [n for n in SHAPES if ".1." in n]
    ups = [make_update(gen, f"d{i}", {n: 1 + i % 4 for n in (top if i % 3 == 2 else SHAPES)},
                       3 + i) for i in range(6)]
    layout = layout_for(cfg.name, g)
    vecs = {}
    for u in ups:
        acc = strategy.accumulator(g, 1)
        acc.add(u)
        vecs[u.device_id] = layout.to_vector(acc.partial())
    p = SecAggParams.choose(1, list(vecs), layout.size)
    total, survivors, _, _ = run_in_process(p, vecs)
    root = strategy.accumulator(g, 1)
    root.merge(layout.from_vector(total, len(survivors)))
    got = root.result()
    want = strategy.aggregate(g, ups, 1)
    for name in SHAPES:
        w = want[name].delta().double()
        assert (got[name].delta().double() - w).norm() <= 1e-5 * w.norm()


def test_flora_cannot_be_summed_securely() -> None:
    gen = torch.Generator().manual_seed(4)
    with pytest.raises(ConfigError):
        layout_for(StrategyName.FLORA, rand_adapter(gen, {n: 2 for n in SHAPES}))
