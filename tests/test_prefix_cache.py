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
