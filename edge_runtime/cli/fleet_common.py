"""Flags shared by the fleet subcommands (`agent`, `aggregator`, `demo`)."""

from __future__ import annotations

import argparse
import os

from edge_runtime.config import MqttConfig

__all__ = ["add_mqtt_args", "mqtt_from_args"]


def add_mqtt_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--broker", required=required, metavar="URL",
                   help="mqtt://HOST:PORT or mqtts://HOST:PORT"
                   + ("" if required else " (default: an embedded broker in this process)"))
    p.add_argument("--username", help="broker username (for a device: its device id)")
    p.add_argument("--password", help="broker password (or env EDGE_RT_MQTT_PASSWORD)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate for mqtts://")
    p.add_argument("--fleet", default="default", help="fleet id: topics live under PREFIX/FLEET/")
    p.add_argument("--prefix", default="edge-rt", help="topic prefix (default edge-rt)")


def mqtt_from_args(args: argparse.Namespace, url: str | None = None) -> MqttConfig:
    password = args.password or os.environ.get("EDGE_RT_MQTT_PASSWORD")
    return MqttConfig(url=url or args.broker, username=args.username, password=password,
                      tls_ca=args.tls_ca, prefix=args.prefix, fleet=args.fleet)
