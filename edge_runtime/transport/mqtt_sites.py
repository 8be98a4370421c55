"""A two-level fleet on this machine: a root Mosquitto, one Mosquitto per site bridged to
it over TLS, and a site aggregator per site (`fleet.site.SiteNode`), for simulations
(`sim.sites`) and tests of hierarchical aggregation.

Devices are dealt to sites in turn (device i to site i mod n); each device connects to
its site's broker with its own password and the fleet ACL; the root aggregator connects
to the root broker, where each site's bridge logs in as the site's user.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edge_runtime.config import FleetConfig, MqttConfig
from edge_runtime.fleet.mosquitto import AGGREGATOR_USER, Bridge, LocalMosquitto
from edge_runtime.fleet.site import SiteNode
from edge_runtime.rounds.site import SiteService

__all__ = ["SiteTopology", "site_ids"]

log = logging.getLogger(__name__)


def site_ids(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" if i < 26 else f"site-{i}" for i in range(n)]


@dataclass
class SiteTopology:
    """Brokers and site aggregators of an `n_sites` fleet (a context manager).

    Args:
        devices: device ids (dealt to sites in turn).
        n_sites: number of sites.
        fleet: the fleet's limits (sites accept what the root would).
        fingerprint: the base model's fingerprint (None: the root's, from its rounds).
        mqtt: topic prefix and fleet name (the URL and credentials are filled in).
        flush_s: a site forwards what it holds after this long without a new update.
    """

    devices: list[str]
    n_sites: int
    fleet: FleetConfig
    fingerprint: str | None
    mqtt: MqttConfig
    flush_s: float = 2.0
    root: LocalMosquitto | None = field(default=None, init=False)
    brokers: dict[str, LocalMosquitto] = field(default_factory=dict, init=False)
    nodes: dict[str, SiteNode] = field(default_factory=dict, init=False)
    home: dict[str, str] = field(default_factory=dict, init=False)  # device -> site
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def start(self) -> SiteTopology:
        sites = site_ids(self.n_sites)
        self.home = {d: sites[i % len(sites)] for i, d in enumerate(self.devices)}
        self._dir = tempfile.TemporaryDirectory(prefix="edge-rt-sites-")
        self.root = LocalMosquitto([], prefix=self.mqtt.prefix, sites=sites, tls=True).start()
        for s in sites:
            mine = [d for d, h in self.home.items() if h == s]
            bridge = Bridge(s, f"127.0.0.1:{self.root.tls_port}", self.root.passwords[s],
                            str(self.root.cafile))
            self.brokers[s] = LocalMosquitto(mine, prefix=self.mqtt.prefix,
                                             bridge=bridge).start()
        for s in self.brokers:
            svc = SiteService(s, self.fleet, self.fingerprint, Path(self._dir.name) / s)
            node = SiteNode(svc, self.site_mqtt(s), flush_s=self.flush_s)
            self.nodes[s] = node
            th = threading.Thread(target=node.run, name=f"site-{s}", daemon=True)
            th.start()
            self._threads.append(th)
        log.info("hierarchical fleet: root broker %s, sites %s", self.root.url,
                 {s: b.url for s, b in self.brokers.items()})
        return self

    def root_mqtt(self) -> MqttConfig:
        assert self.root is not None
        return MqttConfig(url=self.root.url, username=AGGREGATOR_USER,
                          password=self.root.passwords[AGGREGATOR_USER],
                          prefix=self.mqtt.prefix, fleet=self.mqtt.fleet)

    def site_mqtt(self, site: str) -> MqttConfig:
        b = self.brokers[site]
        return MqttConfig(url=b.url, username=AGGREGATOR_USER,
                          password=b.passwords[AGGREGATOR_USER], prefix=self.mqtt.prefix,
                          fleet=self.mqtt.fleet)

    def device_mqtt(self, device_id: str) -> MqttConfig:
        b = self.brokers[self.home[device_id]]
        return MqttConfig(url=b.url, username=device_id, password=b.passwords[device_id],
                          prefix=self.mqtt.prefix, fleet=self.mqtt.fleet)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for th in self._threads:
            th.join(10)
        for b in self.brokers.values():
            b.stop()
        if self.root is not None:
            self.root.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> SiteTopology:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
