"""Shared helpers for the profiler tests: a synthetic, hand-checkable cost model."""

from __future__ import annotations

from edge_runtime.model import ModelConfig
from edge_runtime.profiler.cost_model import CostModel, ModelShape
from edge_runtime.profiler.fit import LinearFit

CFG = ModelConfig(vocab_size=320, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=128)
SHAPE = ModelShape.from_config(CFG)


def lin(features: tuple[str, ...], coef: tuple[float, ...], unit: str = "s") -> LinearFit:
    return LinearFit(features, coef, 4, 0.0, 0.0, None, unit)


def model(time_scale: float = 1.0, slack: float = 0.0) -> CostModel:
    fits = {
        "block_forward_s": lin(("1", "tokens", "attn"), (0.001, 1e-5, 1e-8)),
        "block_train_s": lin(("1", "tokens", "attn", "rank_tokens"), (0.002, 3e-5, 3e-8, 1e-9)),
        "head_s": lin(("1", "label_tokens"), (0.0005, 2e-5)),
        "optimizer_s": lin(("1", "params"), (1e-4, 1e-8)),
        "block_act_mb": lin(("tokens", "attn", "rank_tokens"), (0.01, 1e-5, 1e-7), "MB"),
        "block_transient_mb": lin(("1", "tokens", "attn"), (0.5, 0.001, 0.0), "MB"),
        "head_mb": lin(("1", "label_tokens"), (1.0, 0.002), "MB"),
    }
    return CostModel(SHAPE, "none", fits, base_rss_mb=300.0, load_peak_rss_mb=400.0,
                     time_scale=time_scale, mem_slack_mb=slack, gemm_gflops=20.0)
