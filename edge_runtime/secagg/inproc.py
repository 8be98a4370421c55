"""A round's updates through SecAgg+ between in-process parties (`fleet.secagg`).

Each device turns its update into its strategy's one-device partial sum (its weight
applied on the device) laid out over the round's global shapes (`layout`), the devices
and the server run the protocol (`protocol.run_in_process`, every message as bytes), and
the server merges the decoded sum (`AggregatorService.accept_secure_sum`). The server
sees masked vectors only, so what it checks per update on the plain path (norm bound,
NaN, ranks) and the weight cap (`fleet.weight_cap`, applied by an honest device to
itself) rest on the device (docs/PRIVACY.md).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edge_runtime.adapter import Adapter
from edge_runtime.config import capped_weight
from edge_runtime.fl.types import ClientPlan, ClientUpdate
from edge_runtime.fleet.codec import decode_adapter
from edge_runtime.rounds.server import AggregatorService, Verdict
from edge_runtime.secagg.layout import Layout, layout_for
from edge_runtime.secagg.protocol import SecAggError, SecAggParams, run_in_process

__all__ = ["device_vector", "secure_round"]

log = logging.getLogger(__name__)


def device_vector(service: AggregatorService, layout: Layout, dev: str, adapter: Adapter,
                  n: int) -> np.ndarray:
    """Device side: its update's one-device partial sum in the round's layout."""
    assert service.open is not None
    plan = ClientPlan.from_json(service.open.plans[dev])
    return layout.device_vector(service.strategy_cfg, service.round,
                                ClientUpdate(dev, adapter, n, plan=plan))


def secure_round(service: AggregatorService, trained: list[str],
                 updates: dict[str, tuple[bytes, int]]) -> tuple[Verdict, float]:
    """Run the open round's SecAgg among `trained` (devices that started the protocol);
    those without an entry in `updates` drop before masking. Returns the merge's verdict
    and the protocol's wall seconds."""
    layout = layout_for(service.strategy_cfg.name, service.global_adapter)
    vectors = {}
    for dev, (payload, n) in updates.items():
        adapter, _ = decode_adapter(payload)
        # an honest device weights itself as the server's cap would (fleet.weight_cap);
        # the server cannot check it under the masks
        n = capped_weight(service.cfg.weight_cap, n, service.devices[dev].n_samples,
                          service.recipe)
        vectors[dev] = device_vector(service, layout, dev, adapter, n)
    if len(trained) < 2:
        return service.count_rejection("secagg", "bad_manifest",
                                       "secure aggregation needs 2 devices"), 0.0
    t0 = time.perf_counter()
    params = SecAggParams.choose(service.round, trained, layout.size)
    try:
        total, survivors, wire, _ = run_in_process(
            params, vectors, drop_before_mask=frozenset(set(trained) - set(updates)))
    except SecAggError as e:
        return service.count_rejection("secagg", "bad_manifest", str(e)), 0.0
    took = time.perf_counter() - t0
    log.info("round %d: secure aggregation of %d devices (%d dropped), %.2f s, %d B up, "
             "%d B down", service.round, len(survivors), len(trained) - len(survivors), took,
             wire["up"], wire["down"])
    return service.accept_secure_sum(layout.from_vector(total, len(survivors)), survivors,
                                     wire["up"], wire["down"]), took
