"""Flags shared by the fleet subcommands (`agent`, `aggregator`)."""

from __future__ import annotations

import argparse
import os

from edge_runtime.config import MqttConfig

__all__ = ["add_mqtt_args", "mqtt_from_args", "MQTT_FLAGS"]

# flag dest -> run config key
MQTT_FLAGS = {"broker": "mqtt.url", "username": "mqtt.username", "password": "mqtt.password",
              "tls_ca": "mqtt.tls_ca", "fleet": "mqtt.fleet", "prefix": "mqtt.prefix"}


def add_mqtt_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--broker", required=required, metavar="URL",
                   help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--username", help="broker username (for a device: its device id)")
    p.add_argument("--password", default=os.environ.get("EDGE_RT_MQTT_PASSWORD"),
                   help="broker password (or env EDGE_RT_MQTT_PASSWORD)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate for mqtts://")
    p.add_argument("--fleet", help="fleet id: topics live under PREFIX/FLEET/ (default default)")
    p.add_argument("--prefix", help="topic prefix (default edge-rt)")


def mqtt_from_args(args: argparse.Namespace) -> MqttConfig:
    kw = {k: v for k, v in (("username", args.username), ("password", args.password),
                            ("tls_ca", args.tls_ca), ("fleet", args.fleet),
                            ("prefix", args.prefix)) if v is not None}
    return MqttConfig(url=args.broker, **kw)
