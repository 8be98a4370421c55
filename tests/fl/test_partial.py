"""Hierarchical aggregation: sites' partial sums merged at a root give the flat aggregate.

For every strategy (and FlexLoRA's state modes), updates of mixed ranks and depths are
split over sites; each site folds its own into an accumulator, its `partial()` crosses
the wire codec, and the root merges the partials into a fresh accumulator. The root's
result must equal one accumulator fed every update (products within 1e-5; factors of an
SVD are only defined up to sign, products are not).
"""

from __future__ import annotations

import pytest
import torch
from fl_helpers import SHAPES, make_update, rand_adapter

from edge_runtime.config import (
    FlexLoRAConfig,
    FlexMode,
    FLoRAConfig,
    HetLoRAConfig,
    LegendConfig,
    SAFedLoRAConfig,
    StrategyConfig,
    StrategyName,
)
from edge_runtime.errors import ConfigError
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.robust import robust_accumulator
from edge_runtime.fl.types import PartialSum, UpdateMismatchError
from edge_runtime.fleet.codec import CodecError, decode_partial, encode_partial

TOP = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]

CASES = [
    StrategyConfig(StrategyName.FEDAVG, None),
    StrategyConfig(StrategyName.HETLORA, HetLoRAConfig()),
    StrategyConfig(StrategyName.HETLORA, HetLoRAConfig(rankwise=True)),
    StrategyConfig(StrategyName.LEGEND, LegendConfig()),
    StrategyConfig(StrategyName.FLORA, FLoRAConfig()),
    StrategyConfig(StrategyName.SA_FEDLORA, SAFedLoRAConfig(b0=24)),
    *(StrategyConfig(StrategyName.FLEXLORA, FlexLoRAConfig(mode=m))
      for m in (FlexMode.FACTORED, FlexMode.AUTO, FlexMode.STREAMING, FlexMode.FULL)),
]


def _updates(gen: torch.Generator, homogeneous: bool) -> list:  # type: ignore[type-arg]
    if homogeneous:
        return [make_update(gen, f"d{i}", {n: 4 for n in SHAPES}, 3 + i) for i in range(7)]
    ranks = [1, 4, 2, 3, 4, 1, 2]
    ups = [make_update(gen, f"d{i}", {n: r for n in (TOP if i % 3 == 2 else SHAPES)}, 3 + i)
           for i, r in enumerate(ranks)]
    return ups


def _fold(strategy, g, ups, rnd):  # type: ignore[no-untyped-def]
    acc = strategy.accumulator(g, rnd)
    for u in ups:
        acc.add(u)
    return acc


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name.value}-{getattr(c.settings, 'mode', '')}"
                         f"{'-rankwise' if getattr(c.settings, 'rankwise', False) else ''}")
@pytest.mark.parametrize("split", [(3, 4), (0, 7), (1, 2, 4)])
def test_root_merge_of_site_partials_equals_flat_aggregation(cfg: StrategyConfig,
                                                             split: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    strategy = make_strategy(cfg)
    g = rand_adapter(gen, {n: 4 for n in SHAPES}, dtype=torch.float32)
    ups = _updates(gen, homogeneous=cfg.name is StrategyName.FEDAVG)
    flat = _fold(strategy, g, ups, 1).result()
    root = strategy.accumulator(g, 1)
    start = 0
    for size in split:
        site = _fold(strategy, g, ups[start:start + size], 1)
        start += size
        wire, meta = decode_partial(encode_partial(site.partial(), {"site": "s"}))
        assert meta == {"site": "s"}
        root.merge(wire)
    assert root.count == len(ups)
    got = root.result()
    for name in SHAPES:
        want = flat[name].delta().double()
        err = (got[name].delta().double() - want).norm() / want.norm()
        assert err < 1e-5, (name, float(err))
        assert got[name].rank == flat[name].rank


def test_partials_refuse_another_kind_another_global_and_non_finite() -> None:
    gen = torch.Generator().manual_seed(8)
    g = rand_adapter(gen, {n: 4 for n in SHAPES}, dtype=torch.float32)
    ups = _updates(gen, homogeneous=False)
    het = make_strategy(StrategyConfig(StrategyName.HETLORA, HetLoRAConfig()))
    flex = make_strategy(StrategyConfig(StrategyName.FLEXLORA, FlexLoRAConfig()))
    p = _fold(het, g, ups[:3], 0).partial()
    with pytest.raises(UpdateMismatchError):
        flex.accumulator(g, 0).merge(p)
    g8 = rand_adapter(gen, {n: 8 for n in SHAPES}, dtype=torch.float32)
    with pytest.raises(UpdateMismatchError):  # folded against a rank-4 global
        het.accumulator(g8, 0).merge(p)
    bad = PartialSum(p.kind, {k: t.clone() for k, t in p.tensors.items()}, p.count)
    next(iter(bad.tensors.values()))[0] = float("nan")
    acc = het.accumulator(g, 0)
    with pytest.raises(UpdateMismatchError):
        acc.merge(bad)
    with pytest.raises(ConfigError):  # a median is not a sum: no partials
        rob = robust_accumulator(StrategyName.HETLORA, g, "median")
        assert rob is not None
        rob.partial()


def test_partial_codec_refuses_garbage_and_adapters() -> None:
    from edge_runtime.fleet.codec import encode_adapter

    gen = torch.Generator().manual_seed(9)
    g = rand_adapter(gen, {n: 2 for n in SHAPES}, dtype=torch.float32)
    for data in (b"", b"\x00" * 64, encode_adapter(g)):
        with pytest.raises(CodecError):
            decode_partial(data)
