from pathlib import Path

import pytest
import torch

from edge_runtime.checkpoints import load_model
from edge_runtime.config import LoRAPlan, TrainConfig
from edge_runtime.data import TokenizedExample, collate, load_jsonl
from edge_runtime.lora import apply_lora, get_adapter
from edge_runtime.prefix_cache import PrefixCache
from edge_runtime.trainer import train

FIX = Path(__file__).parent / "fixtures"


def tiny_top_block():
    loaded = load_model("tiny")
    apply_lora(loaded.model, LoRAPlan(rank=4, depth=1, targets=("q", "v")))
    assert loaded.model.frozen_prefix == 1
    return loaded


@pytest.mark.parametrize("budget_mb", [64.0, 0.04])  # all rows; 3 rows of 48 x 64 fp32
def test_cached_training_equals_uncached(budget_mb):
    data = load_jsonl(FIX / "qa.jsonl")
    cfg = dict(steps=3 * len(data) // 4, lr=1e-2, batch_size=4, seq_len=48, log_every=0)
    plain, cached = tiny_top_block(), tiny_top_block()
    r0 = train(plain.model, plain.tokenizer, data, TrainConfig(prefix_cache_mb=0, **cfg))
    r1 = train(cached.model, cached.tokenizer, data, TrainConfig(prefix_cache_mb=budget_mb, **cfg))
    assert r0.prefix_hits == r0.prefix_misses == 0
    rows = 4 * cfg["steps"]
    assert r1.prefix_hits + r1.prefix_misses == rows
    if budget_mb > 1:  # everything fits: only each example's first visit computes
        assert r1.prefix_misses == len(data)
    else:  # a few rows fit: the rest is recomputed every time
        assert 0 < r1.prefix_hits < rows - len(data)
    assert r1.losses == pytest.approx(r0.losses, rel=1e-5)
    a, b = get_adapter(plain.model), get_adapter(cached.model)
    for k in a:
        torch.testing.assert_close(a[k].lora_b, b[k].lora_b, atol=1e-6, rtol=1e-5)


def test_a_row_states_do_not_depend_on_padding_or_batch_partners():
    loaded = tiny_top_block()
    g = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    short = TokenizedExample(torch.randint(0, vocab, (11,), generator=g).tolist(), [0] * 11)
    longer = [TokenizedExample(torch.randint(0, vocab, (n,), generator=g).tolist(), [0] * n)
              for n in (40, 23, 31)]
    pad = loaded.tokenizer.pad_id
    alone_ids, _ = collate([short], pad)
    mixed_ids, _ = collate([*longer, short], pad)
    model = loaded.model
    n = len(short.input_ids)
    fresh_alone = model.prefix_states(alone_ids)[0, :n]
    fresh_mixed = model.prefix_states(mixed_ids)[-1, :n]
    torch.testing.assert_close(fresh_alone, fresh_mixed, atol=1e-6, rtol=1e-5)
    cache = PrefixCache.of_mb(1)
    first = cache.states(model, [t.input_ids for t in [*longer, short]], mixed_ids)
    again = cache.states(model, [short.input_ids], alone_ids)  # served from the cache
    assert cache.hits == 1 and cache.misses == 4
    torch.testing.assert_close(again[0, :n], fresh_alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first, model.prefix_states(mixed_ids))


def test_no_frozen_prefix_is_refused():
    loaded = load_model("tiny")
    apply_lora(loaded.model, LoRAPlan(rank=4, depth=2, targets=("q",)))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="frozen prefix"):
        PrefixCache.of_mb(1).states(loaded.model, [[0, 0, 0, 0]], ids)


def test_a_kept_cache_serves_the_next_round_and_drops_rows_when_the_prefix_changes():
    """Across calls (rounds) a kept cache is exact: a second call on the same prefix
    computes nothing and trains as a fresh cache does; a frozen delta inside the prefix
    (FLoRA's global) or a new depth makes it recompute everything."""
    from edge_runtime.adapter import LoRAWeights
    from edge_runtime.lora import add_frozen_delta, remove_lora, set_adapter

    data = load_jsonl(FIX / "qa.jsonl")
    cfg = TrainConfig(steps=len(data) // 4, lr=1e-2, batch_size=4, seq_len=48, log_every=0)
    kept = PrefixCache.of_mb(64)
    a, b = tiny_top_block(), tiny_top_block()
    start = get_adapter(a.model)
    r1 = train(a.model, a.tokenizer, data, cfg, prefix_cache=kept)
    assert r1.prefix_misses == len(data) and r1.prefix_hits == 0
    set_adapter(a.model, start)  # round 2 starts from the same adapter
    r2 = train(a.model, a.tokenizer, data, cfg, prefix_cache=kept)
    assert r2.prefix_misses == 0 and r2.prefix_hits == len(data)
    r_fresh = train(b.model, b.tokenizer, data, cfg)  # a cache of its own call only
    assert r2.losses == pytest.approx(r_fresh.losses, rel=1e-5)
    for k, w in get_adapter(a.model).items():
        torch.testing.assert_close(w.lora_b, get_adapter(b.model)[k].lora_b,
                                   atol=1e-6, rtol=1e-5)

    # a frozen delta on block 0 (inside the prefix): every row recomputed, and exactly
    name = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(1)
    q = a.model.get_submodule(name)
    d_out, d_in = q.out_features, q.in_features
    delta = {name: LoRAWeights(torch.randn(2, d_in, generator=g),
                               torch.randn(d_out, 2, generator=g) * 0.1, 2.0)}
    for m in (a, b):
        remove_lora(m.model)
        add_frozen_delta(m.model, delta)
        apply_lora(m.model, LoRAPlan(rank=4, depth=1, targets=("q", "v")))
        set_adapter(m.model, start)
    r3 = train(a.model, a.tokenizer, data, cfg, prefix_cache=kept)
    assert r3.prefix_misses == len(data) and r3.prefix_hits == 0
    r3_fresh = train(b.model, b.tokenizer, data, cfg)
    assert r3.losses == pytest.approx(r3_fresh.losses, rel=1e-5)
    assert r3.losses != pytest.approx(r2.losses, rel=1e-5)  # the delta changed the prefix
    # the same delta again: kept; another prefix depth: dropped
    set_adapter(a.model, start)
    assert train(a.model, a.tokenizer, data, cfg, prefix_cache=kept).prefix_misses == 0
    assert kept.bind(a.model) and kept.stored_bytes > 0
    a.model.frozen_prefix = 2
    assert not kept.bind(a.model) and kept.stored_bytes == 0
