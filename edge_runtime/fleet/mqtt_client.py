"""A thin paho-mqtt 2.x wrapper: connect, subscribe in on_connect, queue inbound messages.

- `CallbackAPIVersion.VERSION2`; MQTT 5 first, with a session expiry interval so the
  broker keeps subscriptions (and queued QoS 1 messages) across a reconnect; if the
  broker refuses MQTT 5 (reason 132, e.g. the embedded 3.1.1 broker) it falls back to
  MQTT 3.1.1 with clean_session=False.
- Subscriptions are (re)made in `on_connect`, so they come back after a reconnect.
- `reconnect_delay_set` gives exponential backoff; paho's loop thread reconnects.
- A Last Will publishes the owner's "offline" presence if the connection dies.
- Callbacks only enqueue into a bounded `queue.Queue`; the owner's worker loop takes
  messages with `get()`. If the queue stays full for a second the message is dropped
  and counted (application-level acks and retries recover it).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.config import MqttConfig
from edge_runtime.errors import UserError

__all__ = ["BrokerUnavailable", "InboundMessage", "MqttLink"]

log = logging.getLogger(__name__)


class BrokerUnavailable(UserError):
    """The broker could not be reached or refused the connection."""


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    retain: bool


class MqttLink:
    """One MQTT connection with a bounded inbound queue.

    Args:
        cfg: broker address, credentials, TLS, timing.
        client_id: MQTT client id (stable across restarts so the session is kept).
        subscriptions: topic filters, subscribed at QoS 1 on every (re)connect.
        will: (topic, payload, retain) published by the broker if we vanish.
    """

    def __init__(self, cfg: MqttConfig, client_id: str, subscriptions: list[str],
                 will: tuple[str, bytes, bool] | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.will = will
        self.inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=cfg.queue_size)
        self.dropped = 0
        self.connected = threading.Event()
        self.protocol: MQTTProtocolVersion = mqtt.MQTTv5
        self._refused: str | None = None
        self._answered = threading.Event()
        self._client: mqtt.Client | None = None
        self.connects = 0
        # application bytes (topic + payload) this client sent and received: traffic
        # counted on the client side, the same whatever the broker
        self.bytes_sent = 0
        self.bytes_received = 0

    # connection ----------------------------------------------------------------
    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        kw: dict = {}
        if protocol != mqtt.MQTTv5:
            kw["clean_session"] = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=protocol, **kw)
        if self.cfg.username is not None:
            c.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            c.tls_set(ca_certs=self.cfg.tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will is not None:
            topic, payload, retain = self.will
            c.will_set(topic, payload, qos=1, retain=retain)
        c.reconnect_delay_set(min_delay=max(1, int(self.cfg.reconnect_min_s)),
                              max_delay=max(1, int(self.cfg.reconnect_max_s)))
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def connect(self, timeout: float | None = 30.0) -> None:
        """Connect (MQTT 5, else 3.1.1) and start paho's network thread.

        With `timeout` None, keep trying an unreachable broker forever (a device that boots
        before the network or the broker); a refusal (credentials) still raises at once.

        Raises BrokerUnavailable if no broker answers within `timeout` or it refuses us.
        """
        host, port = self.cfg.host_port()
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        next_note = time.monotonic() + 30.0
        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            self.protocol = protocol
            self._refused = None
            self._answered.clear()
            client = self._make_client(protocol)
            props = None
            if protocol == mqtt.MQTTv5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.cfg.session_expiry_s
            self._client = client
            while True:
                try:
                    client.connect(host, port, keepalive=self.cfg.keepalive_s,
                                   clean_start=False if protocol == mqtt.MQTTv5
                                   else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=props)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(f"cannot reach the MQTT broker at {host}:{port} "
                                                f"({e}); start it or fix --broker") from None
                    if time.monotonic() > next_note:
                        log.warning("%s: broker %s:%d unreachable (%s); still trying",
                                    self.client_id, host, port, e)
                        next_note = time.monotonic() + 30.0
                    time.sleep(min(self.cfg.reconnect_max_s, 1.0))
            client.loop_start()
            if not self._answered.wait(max(0.1, min(60.0, deadline - time.monotonic()))):
                client.loop_stop()
                raise BrokerUnavailable(f"MQTT broker at {host}:{port} did not answer CONNECT")
            if self._refused is None:
                log.info("%s: connected to %s:%d with MQTT %s", self.client_id, host, port,
                         "5" if protocol == mqtt.MQTTv5 else "3.1.1")
                return
            client.loop_stop()
            client.disconnect()
            if self._refused != "version":
                raise BrokerUnavailable(f"MQTT broker at {host}:{port} refused the connection: "
                                        f"{self._refused}; check --username/--password")
            log.info("%s: broker does not speak MQTT 5, falling back to 3.1.1", self.client_id)
        raise BrokerUnavailable(f"MQTT broker at {host}:{port} refused MQTT 5 and 3.1.1")

    def close(self) -> None:
        c = self._client
        if c is None:
            return
        try:
            c.disconnect()
        finally:
            c.loop_stop()
            self.connected.clear()

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker publishes the Will)."""
        c = self._client
        if c is None:
            return
        sock = c.socket()
        c.loop_stop()
        if sock is not None:
            sock.close()
        self.connected.clear()

    # callbacks: thin, never block for long ----------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, properties: object) -> None:
        if reason.is_failure:
            self._refused = "version" if reason.value in (1, 132) else str(reason)
            self._answered.set()
            return
        self.connects += 1
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        self._answered.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, properties: object) -> None:
        self.connected.clear()
        if reason.value != 0 and self._answered.is_set() and self._refused is None:
            log.warning("%s: disconnected (%s); reconnecting with backoff", self.client_id, reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        item = InboundMessage(msg.topic, bytes(msg.payload), bool(msg.retain))
        self.bytes_received += len(item.topic.encode()) + len(item.payload)
        try:
            self.inbox.put(item, timeout=1.0)
        except queue.Full:
            self.dropped += 1
            log.warning("%s: inbound queue full, dropped a message on %s", self.client_id,
                        msg.topic)

    # use -------------------------------------------------------------------------
    def subscribe(self, topic: str) -> None:
        """Add a subscription (kept across reconnects)."""
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        if self._client is not None:
            self._client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        if self._client is not None:
            self._client.unsubscribe(topic)

    def get(self, timeout: float | None) -> InboundMessage | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        assert self._client is not None, "connect() first"
        self.bytes_sent += len(topic.encode()) + len(payload)
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 30.0) -> bool:
        """Publish and wait until the broker acknowledged it (QoS 1) or `timeout`."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()
