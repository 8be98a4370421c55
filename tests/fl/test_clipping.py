"""Change norms and clipping against dense brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fl_helpers import SHAPES, rand_adapter

from edge_runtime.adapter import LoRAWeights
from edge_runtime.fl.clipping import adaptive_bound, aligned_start, change_norm, clip_to


def _dense_change(u, s):  # type: ignore[no-untyped-def]
    return np.sqrt(sum(np.linalg.norm(u[n].delta().numpy() - (s[n].delta().numpy()
                                                                  if n in s else 0)) ** 2
                       for n in u))


def test_change_norm_is_the_dense_one_with_pruned_ranks_and_missing_modules() -> None:
    gen = torch.Generator().manual_seed(0)
    start = rand_adapter(gen, {n: 4 for n in SHAPES})
    upd = rand_adapter(gen, {n: 4 for n in SHAPES})
    assert change_norm(upd, start) == pytest.approx(_dense_change(upd, start), rel=1e-10)
    name = next(iter(SHAPES))
    pruned = dict(upd)
    pruned[name] = LoRAWeights(upd[name].lora_a[:2], upd[name].lora_b[:, :2], 16.0)
    aligned = aligned_start(pruned, start)  # the start's first 2 components, same product
    s2 = start[name]
    want = (s2.scale * s2.lora_b[:, :2].double() @ s2.lora_a[:2].double()).numpy()
    np.testing.assert_allclose(aligned[name].delta().numpy(), want, atol=1e-12)
    assert change_norm(pruned, start) == pytest.approx(_dense_change(pruned, aligned),
                                                       rel=1e-10)
    partial = {name: upd[name]}
    assert change_norm(partial, {}) == pytest.approx(float(np.linalg.norm(
        upd[name].delta().numpy())), rel=1e-10)


def test_clip_reaches_the_bound_and_leaves_small_updates_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    start = rand_adapter(gen, {n: 3 for n in SHAPES})
    upd = rand_adapter(gen, {n: 3 for n in SHAPES})
    norm = change_norm(upd, start)
    same, t, before = clip_to(upd, start, 2 * norm)
    assert same is upd and t == 1.0 and before == pytest.approx(norm)
    clipped, t, before = clip_to(upd, start, 0.25 * norm)
    assert 0.0 < t < 1.0 and before == pytest.approx(norm)
    assert _dense_change(clipped, start) == pytest.approx(0.25 * norm, rel=1e-6)
    assert {n: w.rank for n, w in clipped.items()} == {n: 3 for n in SHAPES}
    assert adaptive_bound([1.0, 5.0, 2.0], 3.0) == 6.0
