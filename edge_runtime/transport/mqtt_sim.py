"""A simulated fleet through a real MQTT broker: the fleet's aggregator node and device
agents (threads of this process, one shared model) with the simulation's scheduler.

Everything a round does crosses the broker (announcement, downloads, chunked updates,
acks); only the devices' dropout/deadline behaviour and the simulated clock come from
the `SimScheduler`, exactly as in the in-process transport.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from edge_runtime.checkpoints import LoadedModel
from edge_runtime.config import AgentConfig, MqttConfig, RunConfig
from edge_runtime.errors import UserError
from edge_runtime.fleet.agent import DeviceAgent
from edge_runtime.fleet.server import AggregatorNode
from edge_runtime.rounds.server import AggregatorService, RoundRecord
from edge_runtime.transport.mqtt_sites import SiteTopology
from edge_runtime.transport.scheduler import SimDevice, SimScheduler

__all__ = ["run_mqtt"]

log = logging.getLogger(__name__)


def run_mqtt(service: AggregatorService, devices: list[SimDevice], loaded: LoadedModel,
             scheduler: SimScheduler, run: RunConfig, lock: threading.RLock,
             timeout_s: float = 3600.0) -> list[RoundRecord]:
    """Run every remaining round through the broker `run.sim.broker`; without one, a
    Mosquitto started for the run (per-device passwords and ACL, `fleet/mosquitto.py`)
    when installed, else the embedded broker."""
    from edge_runtime.fleet.broker import EmbeddedBroker
    from edge_runtime.fleet.mosquitto import AGGREGATOR_USER, LocalMosquitto, find_mosquitto

    broker: EmbeddedBroker | LocalMosquitto | None = None
    url = run.sim.broker
    mqtt = MqttConfig(url=url or "mqtt://127.0.0.1:1883", username=run.mqtt.username,
                      password=run.mqtt.password, tls_ca=run.mqtt.tls_ca,
                      prefix=run.mqtt.prefix, fleet=run.mqtt.fleet)
    creds: dict[str, tuple[str | None, str | None]] = {}
    topology: SiteTopology | None = None
    device_mqtt: dict[str, MqttConfig] = {}
    if run.sim.sites:
        topology = SiteTopology([d.device_id for d in devices], run.sim.sites, run.fleet,
                                service.fingerprint, mqtt).start()
        mqtt = topology.root_mqtt()
        device_mqtt = {d.device_id: topology.device_mqtt(d.device_id) for d in devices}
        log.info("simulated fleet over %d sites bridged to a root broker", run.sim.sites)
    elif url is None and find_mosquitto() is not None:
        mosq = LocalMosquitto([d.device_id for d in devices], prefix=run.mqtt.prefix).start()
        broker, url = mosq, mosq.url
        creds = {u: (u, p) for u, p in mosq.passwords.items()}
        mqtt = replace(mqtt, url=url, username=AGGREGATOR_USER,
                       password=mosq.passwords[AGGREGATOR_USER])
        log.info("simulated fleet on %s at %s", mosq.version(), url)
    elif url is None:
        emb = EmbeddedBroker().start()
        broker, url = emb, f"mqtt://127.0.0.1:{emb.port}"
        mqtt = replace(mqtt, url=url)
        log.info("simulated fleet on the embedded broker at %s (mosquitto not installed)", url)
    records: list[RoundRecord] = []
    agents: list[DeviceAgent] = []
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def ready(svc: AggregatorService) -> bool:
        op = svc.open
        if op is None:
            return False
        return (scheduler.settled(svc.round, list(op.plans))
                and set(svc.accepted) >= scheduler.sent(svc.round))

    node = AggregatorNode(service, mqtt, on_round=records.append,
                          wait_for_clients_s=timeout_s, start_clients=len(devices),
                          threads=torch.get_num_threads(), linger_s=0.5, ready=ready,
                          duration=lambda: scheduler.duration(service.round),
                          sites=topology is not None)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-rt-sim-") as tmp:
            for d in devices:
                cfg = AgentConfig(device_id=d.device_id, data=Path("-"), model=loaded.name,
                                  state_dir=Path(tmp) / d.device_id, profile=d.profile,
                                  device_class=d.device_class,
                                  compression=run.fleet.compression,
                                  chunk_size=run.fleet.chunk_size, connect_timeout_s=30.0)
                user, password = creds.get(d.device_id, (mqtt.username, mqtt.password))
                dev_mqtt = device_mqtt.get(d.device_id) or replace(mqtt, username=user,
                                                                    password=password)
                agent = DeviceAgent(cfg, dev_mqtt,
                                    loaded=loaded, examples=d.examples,
                                    gate=scheduler, train_lock=lock)
                agents.append(agent)

                def serve(a: DeviceAgent = agent) -> None:
                    try:
                        a.run(timeout_s)
                    except BaseException as e:  # surfaced below
                        errors.append(e)

                th = threading.Thread(target=serve, name=f"sim-{d.device_id}", daemon=True)
                th.start()
                threads.append(th)
            node.run()
            if errors:
                raise errors[0]
            end = time.monotonic() + 30
            for th in threads:
                th.join(max(0.1, end - time.monotonic()))
    finally:
        node.stop()
        for a in agents:
            a.stop()
        if broker is not None:
            broker.stop()
        if topology is not None:
            topology.stop()
    if not service.finished:
        raise UserError(f"the simulated MQTT fleet stopped after {service.round} of "
                        f"{run.fleet.rounds} rounds; see the log")
    return records
