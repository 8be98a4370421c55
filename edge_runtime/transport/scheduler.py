"""The simulated clock, dropouts and stragglers of a simulated fleet.

A `SimScheduler` is the only thing that makes a simulated fleet differ from a real one:
it answers, for each selected device, whether it trains (dropouts never do; a device
whose predicted download + compute already misses the deadline does not start) and
whether its finished update is sent (not when download + compute + upload misses the
deadline), and it keeps the simulated round time. Its answers depend on the seed, the
round and the device only, so every transport (in-process, MQTT) sees the same fleet.

Time of a device in a round: download bytes / downlink + predicted compute of its plan
(`fl.legend.predict_time` on the class's costs, x `straggler_slowdown` when it straggles)
+ upload bytes / uplink. A round lasts until its slowest sent update, or the whole
deadline when one is set and some device dropped out or was late.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from typing import Any

from edge_runtime.adapter import layer_index
from edge_runtime.config import SimConfig
from edge_runtime.data import Example
from edge_runtime.fl.legend import DeviceCost, predict_time
from edge_runtime.rounds.device import RoundTask

__all__ = ["SimScheduler", "SimDevice", "Outcome"]


@dataclass
class SimDevice:
    """One simulated device: its class's costs, its data, the profile it registers with."""

    device_id: str
    device_class: str
    cost: DeviceCost
    examples: list[Example]
    profile: dict[str, Any]


@dataclass
class Outcome:
    status: str  # "training" | "sent" | "dropped" | "late"
    time_s: float = 0.0


class SimScheduler:
    """Implements `fleet.agent.RoundGate` for simulated devices (thread-safe)."""

    def __init__(self, sim: SimConfig, seed: int, costs: dict[str, DeviceCost],
                 n_layers: int) -> None:
        self.sim = sim
        self.seed = seed
        self.costs = costs
        self.n_layers = n_layers
        self.outcomes: dict[int, dict[str, Outcome]] = {}
        self._lock = threading.Lock()

    def _rng(self, device_id: str, round_index: int) -> random.Random:
        digest = hashlib.sha256(f"sim:{self.seed}:{round_index}:{device_id}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def _set(self, round_index: int, device_id: str, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.setdefault(round_index, {})[device_id] = outcome

    def will_train(self, device_id: str, round_index: int, download_bytes: int,
                   task: RoundTask) -> bool:
        rng = self._rng(device_id, round_index)
        dropped = rng.random() < self.sim.dropout
        slow = self.sim.straggler_slowdown if rng.random() < self.sim.straggler else 1.0
        if dropped:
            self._set(round_index, device_id, Outcome("dropped"))
            return False
        per_layer: dict[int, int] = {}
        for name, r in task.plan.ranks.items():
            layer = layer_index(name)
            per_layer[layer] = max(per_layer.get(layer, 0), r)
        compute = predict_time(self.costs[device_id], self.n_layers, list(per_layer.values()),
                               task.recipe.steps) * slow
        t = download_bytes * 8 / (self.sim.downlink_mbps * 1e6) + compute
        late = self.sim.deadline_s is not None and t > self.sim.deadline_s
        self._set(round_index, device_id, Outcome("late" if late else "training", t))
        return not late

    def will_send(self, device_id: str, round_index: int, upload_bytes: int) -> bool:
        with self._lock:
            o = self.outcomes[round_index][device_id]
            o.time_s += upload_bytes * 8 / (self.sim.uplink_mbps * 1e6)
            late = self.sim.deadline_s is not None and o.time_s > self.sim.deadline_s
            o.status = "late" if late else "sent"
            return not late

    def settled(self, round_index: int, selected: list[str]) -> bool:
        """Every selected device has decided (dropped, late, or sent)."""
        with self._lock:
            got = self.outcomes.get(round_index, {})
            return all(d in got and got[d].status != "training" for d in selected)

    def sent(self, round_index: int) -> set[str]:
        with self._lock:
            return {d for d, o in self.outcomes.get(round_index, {}).items() if o.status == "sent"}

    def duration(self, round_index: int) -> float:
        """The round's simulated length (module docstring)."""
        with self._lock:
            got = list(self.outcomes.get(round_index, {}).values())
        times = [o.time_s for o in got if o.status == "sent"]
        missed = any(o.status in ("dropped", "late") for o in got)
        if self.sim.deadline_s is not None and missed:
            return self.sim.deadline_s
        return max(times, default=0.0)
