"""In-process fleet simulation: real local training, simulated clock, no MQTT.

Every selected client trains the real model (the lead's `trainer.train`) on its own
JSONL split with the plan its device class allows; the strategy distributes and
aggregates exactly as the MQTT aggregator does (same `Strategy` objects). Wall-clock is
*simulated* from the device classes (`edge_runtime.fl.devices`): a client's round time
is download + predicted compute (x slowdown if it straggles) + upload; a round lasts
until its slowest accepted client, or the deadline when one is set (later updates are
dropped). Dropouts never report. Bytes are fp32 payloads (4 bytes a parameter).

Plans per strategy:
- fedavg: every client at rank `rank` (default r_max): homogeneous LoRA.
- hetlora / flexlora / sa-fedlora: rank by device class, from r_min (slowest) to r_max
  (fastest), geometric in between; hetlora clients keep their self-pruned ranks.
- legend: `legend.plan_device` against the deadline (default: the smallest deadline that
  keeps every client, i.e. the slowest one at depth 1 and rank r_min) and each class's
  memory budget; faster classes get deeper plans.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.adapter import Adapter, LoRAWeights, adapter_num_params
from edge_runtime.config import (
    HetLoRAConfig,
    LegendConfig,
    SAFedLoRAConfig,
    SimulateConfig,
    TrainConfig,
)
from edge_runtime.data import Example
from edge_runtime.errors import ConfigError
from edge_runtime.fl.devices import DeviceClass, analytic_cost
from edge_runtime.fl.legend import DeviceCost, plan_device, predict_time
from edge_runtime.fl.registry import make_strategy
from edge_runtime.fl.types import ClientPlan, ClientUpdate, StrategyBase

__all__ = ["SimClient", "build_fleet", "init_global", "run_simulation"]

log = logging.getLogger(__name__)


@dataclass
class SimClient:
    device_id: str
    device_class: DeviceClass
    cost: DeviceCost
    train: list[Example]
    plan: ClientPlan | None = None
    history: list[dict] = field(default_factory=list)


def _module_name(layer: int, target: str) -> str:
    parent = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{target}"


def _class_ranks(classes: list[DeviceClass], r_min: int, r_max: int) -> dict[str, int]:
    """Geometric ranks from r_min (lowest fp32_gflops) to r_max (highest)."""
    speeds = sorted({c.fp32_gflops for c in classes})
    out = {}
    for c in classes:
        i = speeds.index(c.fp32_gflops)
        frac = i / (len(speeds) - 1) if len(speeds) > 1 else 1.0
        out[c.name] = int(round(r_min * (r_max / r_min) ** frac))
    return out


def init_global(model_shapes: dict[str, tuple[int, int]], rank: int, alpha: float,
                seed: int) -> Adapter:
    """Round-0 global adapter: seeded A (as `apply_lora` draws it), zero B, rank r_max."""
    import torch

    from edge_runtime.lora import seeded_lora_a

    return {n: LoRAWeights(seeded_lora_a(seed, n, rank, d_in), torch.zeros(d_out, rank), alpha)
            for n, (d_out, d_in) in model_shapes.items()}


def build_fleet(cfg: SimulateConfig, model_cfg, classes: list[DeviceClass],  # noqa: ANN001
                data: list[list[Example]]) -> list[SimClient]:
    """Clients cycle through the device classes; each gets its data split and its plan."""
    if len(data) < cfg.clients:
        raise ConfigError(f"the data has {len(data)} client splits, fewer than --clients "
                          f"{cfg.clients}; pull it again with --clients {cfg.clients}")
    n_layers = model_cfg.n_layers
    depth = cfg.depth or n_layers
    if depth > n_layers:
        raise ConfigError(f"--depth {depth} is above the model's {n_layers} blocks")
    ranks = _class_ranks(classes, cfg.r_min, cfg.r_max)
    clients = []
    for i in range(cfg.clients):
        dc = classes[i % len(classes)]
        cost = analytic_cost(model_cfg, dc, batch=cfg.batch_size, seq_len=cfg.seq_len,
                             targets=cfg.targets)
        clients.append(SimClient(f"sim-{i:03d}", dc, cost, data[i]))
    name = cfg.strategy
    if name == "legend":
        deadline = cfg.deadline_s or _default_legend_deadline(cfg, clients, n_layers)
        lcfg = LegendConfig(deadline_s=deadline, r_min=cfg.r_min, r_max=cfg.r_max)
        for c in clients:
            c.plan = plan_device(c.device_id, c.cost, n_layers, cfg.targets, lcfg,
                                 steps=cfg.local_steps, alpha=cfg.alpha,
                                 device_class=c.device_class.name)
        return clients
    for c in clients:
        r = (cfg.rank or cfg.r_max) if name == "fedavg" else ranks[c.device_class.name]
        plan = {_module_name(layer, t): r for layer in range(n_layers - depth, n_layers)
                for t in cfg.targets}
        c.plan = ClientPlan(c.device_id, plan, cfg.alpha, c.device_class.name)
    return clients


def _default_legend_deadline(cfg: SimulateConfig, clients: list[SimClient],
                             n_layers: int) -> float:
    """The smallest deadline that keeps every client: the slowest one at depth 1, rank r_min."""
    return max(predict_time(c.cost, n_layers, [cfg.r_min], cfg.local_steps) for c in clients)


def _plan_time(c: SimClient, n_layers: int, steps: int) -> float:
    assert c.plan is not None
    per_layer: dict[int, int] = {}
    for name, r in c.plan.ranks.items():
        layer = int(name.split(".")[2])
        per_layer[layer] = max(per_layer.get(layer, 0), r)
    return predict_time(c.cost, n_layers, list(per_layer.values()), steps)


def _strategy(cfg: SimulateConfig) -> StrategyBase:
    return make_strategy(
        cfg.strategy,
        hetlora=HetLoRAConfig(r_min=cfg.r_min),
        sa_fedlora=SAFedLoRAConfig(rounds=cfg.rounds, init_rounds=max(1, cfg.rounds // 5),
                                   heat_rounds=max(1, cfg.rounds // 5),
                                   cool_rounds=max(1, cfg.rounds // 5)),
        legend=LegendConfig(r_min=cfg.r_min, r_max=cfg.r_max),
    )


def _eval(model, tokenizer, adapter: Adapter, test: list[Example], cfg: SimulateConfig  # noqa: ANN001
          ) -> float:
    from edge_runtime.evaluate import eval_loss
    from edge_runtime.lora import remove_lora, set_adapter

    remove_lora(model)
    set_adapter(model, adapter)
    return eval_loss(model, tokenizer, test, seq_len=cfg.seq_len, batch_size=8)


def run_simulation(model, tokenizer, client_data: list[list[Example]],  # noqa: ANN001
                   test: list[Example], cfg: SimulateConfig,
                   classes: list[DeviceClass]) -> dict:
    """Run `cfg.rounds` rounds; returns the metrics dict written to metrics.json."""
    from edge_runtime.lora import get_adapter, remove_lora, set_adapter
    from edge_runtime.trainer import train

    model_cfg = model.config
    n_layers = model_cfg.n_layers
    clients = build_fleet(cfg, model_cfg, classes, client_data)
    strategy = _strategy(cfg)
    shapes = {}
    for layer in range(n_layers):
        for tg in cfg.targets:
            name = _module_name(layer, tg)
            lin = model.get_submodule(name)
            lin = getattr(lin, "base", lin)
            shapes[name] = (int(lin.out_features), int(lin.in_features))
    r_global = (cfg.rank or cfg.r_max) if cfg.strategy == "fedavg" else cfg.r_max
    glob = init_global(shapes, r_global, cfg.alpha, cfg.seed)
    rng = random.Random(cfg.seed)
    test_rows = test if len(test) <= cfg.eval_max else random.Random(cfg.seed).sample(
        test, cfg.eval_max)
    rounds: list[dict[str, Any]] = [{"round": 0, "eval_loss": _eval(model, tokenizer, glob, test_rows, cfg),
               "bytes_up": 0, "bytes_down": 0, "sim_time_s": 0.0, "participants": 0}]
    log.info("round 0 (base): eval loss %.4f", rounds[0]["eval_loss"])
    skipped = [c.device_id for c in clients if c.plan is None]
    sim_clock = 0.0
    for t in range(1, cfg.rounds + 1):
        eligible = [c for c in clients if c.plan is not None]
        k = max(1, math.ceil(cfg.fraction * len(eligible)))
        selected = rng.sample(eligible, min(k, len(eligible)))
        acc = strategy.accumulator(glob, round_index=t - 1)
        bytes_up = bytes_down = 0
        times: list[float] = []
        late = dropped = 0
        for c in selected:
            assert c.plan is not None
            local = strategy.distribute(glob, c.plan)
            down = 4 * adapter_num_params(local)
            bytes_down += down
            if rng.random() < cfg.dropout:
                dropped += 1
                continue
            slow = cfg.straggler_slowdown if rng.random() < cfg.straggler else 1.0
            compute = _plan_time(c, n_layers, cfg.local_steps) * slow
            t_down = down * 8 / (cfg.downlink_mbps * 1e6)
            if cfg.deadline_s is not None and t_down + compute > cfg.deadline_s:
                late += 1  # known from the prediction: skip the (wasted) training
                continue
            remove_lora(model)
            set_adapter(model, local)
            tc = TrainConfig(steps=cfg.local_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                             seq_len=cfg.seq_len, seed=cfg.seed * 1000 + t * 97 + len(times),
                             log_every=0)
            res = train(model, tokenizer, c.train, tc,
                        regularizer=strategy.regularizer(local, c.plan, t - 1))
            up_adapter = strategy.finish_local(local, get_adapter(model), c.plan)
            up = 4 * adapter_num_params(up_adapter)
            total = t_down + compute + up * 8 / (cfg.uplink_mbps * 1e6)
            if cfg.deadline_s is not None and total > cfg.deadline_s:
                late += 1
                continue
            acc.add(ClientUpdate(c.device_id, up_adapter, len(c.train), c.plan))
            if cfg.strategy == "hetlora":  # self-pruned ranks stick (HetLoRA sec. 3.2)
                c.plan = ClientPlan(c.device_id, {n: w.rank for n, w in up_adapter.items()},
                                    c.plan.alpha, c.plan.device_class)
            bytes_up += up
            times.append(total)
            c.history.append({"round": t, "loss": res.losses[-1] if res.losses else None})
        glob = acc.result()
        round_time = max(times) if times else 0.0
        if cfg.deadline_s is not None and (late or dropped):
            round_time = cfg.deadline_s  # the server waited for them until the deadline
        sim_clock += round_time
        loss = _eval(model, tokenizer, glob, test_rows, cfg)
        rounds.append({"round": t, "eval_loss": loss, "bytes_up": bytes_up,
                       "bytes_down": bytes_down, "sim_time_s": sim_clock,
                       "participants": acc.count})
        log.info("round %d: eval loss %.4f, %d/%d updates (%d late, %d dropped), "
                 "up %.2f MB, sim %.1f s", t, loss, acc.count, len(selected), late, dropped,
                 bytes_up / 1e6, sim_clock)
    return {
        "strategy": cfg.strategy,
        "config": {**{k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in vars(cfg).items()},
                   "plans": {c.device_id: {"class": c.device_class.name,
                                           "modules": len(c.plan.ranks) if c.plan else 0,
                                           "rank_sum": sum(c.plan.ranks.values()) if c.plan
                                           else 0} for c in clients},
                   "not_selectable": skipped},
        "rounds": rounds,
    }
