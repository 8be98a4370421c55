"""A simulated fleet through Flower's simulation engine (`edge-rt simulate --transport
flower`): the round engine's service behind `LoRARoundStrategy` in a `ServerApp`, one
`ClientApp` per simulated device (Ray actors, each loading the model itself).

What Flower adds is its own runtime; the plans, the strategy's maths, the validation and
the devices' training are the round engine's, so the rounds match the in-process
transport (tested within 1e-5). The simulated clock, dropouts and stragglers of
`SimScheduler` are not applied here: every selected device trains and answers.
"""

from __future__ import annotations

import logging
from typing import Any

from edge_runtime.config import RunConfig
from edge_runtime.errors import UserError
from edge_runtime.rounds.server import AggregatorService
from edge_runtime.transport.scheduler import SimDevice

__all__ = ["run_flower"]

log = logging.getLogger(__name__)


def _device_setup(run_json: dict[str, Any], devices: list[dict[str, Any]]) -> Any:
    """A picklable setup function: each Ray actor loads the model and its device's rows."""

    def setup(context: Any) -> Any:
        from edge_runtime.checkpoints import load_model
        from edge_runtime.data import Example
        from edge_runtime.flower.client import DeviceSetup

        run = RunConfig.from_dict(run_json)
        d = devices[int(context.node_config.get("partition-id", 0))]
        loaded = load_model(run.model.name, run.model.quant)
        return DeviceSetup(loaded, [Example(**e) for e in d["examples"]],
                           d["device_id"], d["device_class"], d["profile"],
                           run.fleet.compression.value)

    return setup


def run_flower(service: AggregatorService, devices: list[SimDevice], run: RunConfig,
               timeout_s: float = 3600.0) -> None:
    """Run every remaining round of `service` through Flower with `devices`."""
    try:
        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation
    except ImportError:
        raise UserError("the flower transport needs Flower: pip install "
                        "'edge-runtime[flower]'") from None
    from edge_runtime.data import example_to_json
    from edge_runtime.flower.client import make_client_app
    from edge_runtime.flower.strategy import LoRARoundStrategy, adapter_arrays

    strategy = LoRARoundStrategy(service, timeout_s=timeout_s, min_nodes=len(devices))
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, adapter_arrays(service.global_adapter),
                       num_rounds=run.fleet.rounds - service.round, timeout=timeout_s)

    rows = [{"device_id": d.device_id, "device_class": d.device_class, "profile": d.profile,
             "examples": [example_to_json(e) for e in d.examples]} for d in devices]
    client_app = make_client_app(_device_setup(run.to_json(), rows))
    run_simulation(server_app, client_app, num_supernodes=len(devices),
                   backend_config={"client_resources": {"num_cpus": 1}})
    if not service.finished:
        raise UserError(f"the Flower run stopped after {service.round} of {run.fleet.rounds} "
                        "rounds; see the log")
