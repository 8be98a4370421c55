"""LEGEND: per-device LoRA depth and rank distribution, per-layer aggregation.

Liu et al., "Adaptive Parameter-Efficient Federated Fine-Tuning on Heterogeneous
Devices", arXiv 2412.20004. Each device gets a LoRA *depth* L (LoRA on the top L
blocks, counted from the output) and a rank per block that grows toward the output,
chosen from its measured cost per block so the predicted local round time fits a common
deadline and its memory fits the device (sec. 4); the server aggregates each layer
over only the devices that trained it (sec. 3, per-layer denominators).

Our cost model (the paper's exact fitting procedure was not available to us) is linear
in what depth and rank change:
  time(L, r) = steps * (n_layers * fwd_s + L * bwd_s + sum_j r_j * rank_s)
  mem(L, r)  = base_mb + L * act_mb + sum_j r_j * rank_mb
with fwd_s / bwd_s the forward / backward time of one block for one step, act_mb the
activations kept per trained block, rank_s / rank_mb the cost of one rank unit of all
of a block's targets (parameters, gradients, Adam moments). Planning takes the deepest L
(then the largest rank ramp) that fits; ranks ramp linearly from r_min at the lowest
LoRA block to r_max at the top one.

Aggregation: per module m, a sample-weighted zero-padded average of s_k B_k and A_k over
K_m = {devices that trained m}: weights n_k / sum_{j in K_m} n_j. Modules nobody trained
keep their global factors. Distribution: truncation to the plan, as HetLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.adapter import Adapter
from edge_runtime.config import LegendConfig, lora_module_name
from edge_runtime.errors import ConfigError
from edge_runtime.fl.common import PaddedAccumulator, truncate_to_plan
from edge_runtime.fl.types import ClientPlan, StrategyBase

__all__ = ["DeviceCost", "Legend", "LegendAccumulator", "rank_ramp", "plan_device",
           "predict_time", "predict_memory"]


@dataclass
class DeviceCost:
    """Per-step costs of one device class for one model (see module docstring)."""

    fwd_s: float  # forward of one block, one step
    bwd_s: float  # backward of one trained block, one step
    rank_s: float  # one rank unit over a block's targets, one step
    base_mb: float  # frozen base + runtime
    act_mb: float  # activations kept per trained block
    rank_mb: float  # one rank unit over a block's targets (params + grads + Adam)
    mem_budget_mb: float


def rank_ramp(depth: int, r_lo: int, r_hi: int) -> list[int]:
    """Ranks of the top `depth` blocks from the lowest to the top: linear r_lo -> r_hi."""
    if depth == 1:
        return [r_hi]
    return [int(round(r_lo + (r_hi - r_lo) * j / (depth - 1))) for j in range(depth)]


def predict_time(cost: DeviceCost, n_layers: int, ranks: list[int], steps: int) -> float:
    return steps * (n_layers * cost.fwd_s + len(ranks) * cost.bwd_s + sum(ranks) * cost.rank_s)


def predict_memory(cost: DeviceCost, ranks: list[int]) -> float:
    return cost.base_mb + len(ranks) * cost.act_mb + sum(ranks) * cost.rank_mb


def plan_device(device_id: str, cost: DeviceCost, n_layers: int, targets: tuple[str, ...],
                cfg: LegendConfig, *, steps: int, alpha: float = 16.0,
                device_class: str = "", deadline_s: float | None = None) -> ClientPlan | None:
    """The deepest, then widest, LoRA plan whose predicted time and memory fit.

    Tries depth L = n_layers .. cfg.min_depth and, for each, ramps whose top rank shrinks
    from r_max toward r_min. Returns None when even (min_depth, r_min) does not fit.
    """
    deadline = cfg.deadline_s if cfg.deadline_s is not None else deadline_s
    if deadline is None:
        raise ConfigError("LEGEND needs a round deadline to plan against; set "
                          "strategy.deadline_s or the fleet's round_timeout_s")
    for depth in range(n_layers, cfg.min_depth - 1, -1):
        for r_hi in range(cfg.r_max, cfg.r_min - 1, -1):
            ranks = rank_ramp(depth, cfg.r_min, r_hi)
            if (predict_time(cost, n_layers, ranks, steps) <= deadline
                    and predict_memory(cost, ranks) <= cost.mem_budget_mb):
                layers = range(n_layers - depth, n_layers)
                plan = {lora_module_name(i, t): r
                        for i, r in zip(layers, ranks, strict=True) for t in targets}
                return ClientPlan(device_id, plan, alpha, device_class)
    return None


class LegendAccumulator(PaddedAccumulator):
    """Weights n_k, per-module denominators (sum n over the devices that trained it)."""

    def __init__(self, global_adapter: Adapter) -> None:
        super().__init__(global_adapter, lambda u: float(u.num_samples), allow_subset=True)


class Legend(StrategyBase):
    """LEGEND strategy: plans come from `plan_device`; truncation out, per-layer mean in."""

    name = "legend"

    def __init__(self, cfg: LegendConfig | None = None) -> None:
        self.cfg = cfg or LegendConfig()

    def distribute(self, global_adapter: Adapter, plan: ClientPlan) -> Adapter:
        return truncate_to_plan(global_adapter, plan)

    def accumulator(self, global_adapter: Adapter, round_index: int = 0) -> LegendAccumulator:
        return LegendAccumulator(global_adapter)
