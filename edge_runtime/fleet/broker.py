"""A small embedded MQTT 3.1.1 broker (asyncio, pure Python) for one-command runs.

Enough of MQTT 3.1.1 (OASIS standard, 2014) for the fleet demo and tests: CONNECT with
optional username/password, PUBLISH at QoS 0/1/2, SUBSCRIBE/UNSUBSCRIBE with `+`/`#`
wildcards, retained messages, Will messages, keep-alive, persistent sessions
(clean session 0: subscriptions kept and QoS>0 messages queued, bounded, while the
client is away) and session take-over by client id. A client that asks for MQTT 5 is
refused with return code 1 ("unacceptable protocol version"), which paho-mqtt turns into
reason 132 so the client can fall back to 3.1.1.

QoS 1/2 messages a client has not acknowledged are re-sent (DUP) when its persistent
session resumes. Not a production broker: no TLS, no ACLs, messages live in memory only.
Production fleets use Mosquitto (deploy/mosquitto/) or a clustered broker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EmbeddedBroker", "topic_matches"]

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest; `$` topics not by wildcards)."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    fl, tl = filt.split("/"), topic.split("/")
    for i, f in enumerate(fl):
        if f == "#":
            return True
        if i >= len(tl):
            return False
        if f != "+" and f != tl[i]:
            return False
    return len(fl) == len(tl)


def _encode_len(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise _Malformed("short packet")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise _Malformed("short packet")
        (v,) = struct.unpack_from("!H", self.data, self.pos)
        self.pos += 2
        return int(v)

    def blob(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise _Malformed("string past end of packet")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("topic/client id is not UTF-8") from None

    def rest(self) -> bytes:
        return self.data[self.pos:]


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class _Session:
    client_id: str
    clean: bool
    subs: dict[str, int] = field(default_factory=dict)
    queued: collections.deque[_Message] = field(default_factory=lambda: collections.deque(maxlen=10000))
    conn: _Conn | None = None
    next_pid: int = 0
    # QoS>0 messages sent but not yet acknowledged; re-sent (DUP) when the session resumes
    inflight: dict[int, _Message] = field(default_factory=dict)

    def pid(self) -> int:
        self.next_pid = self.next_pid % 65535 + 1
        return self.next_pid


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive = 0
        self.closed = False
        self.qos2_in: set[int] = set()


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker on its own thread and event loop.

    Args:
        host, port: where to listen (port 0 picks a free port; read `.port` after start()).
        users: optional {username: password}; when given, CONNECT must match.
        max_packet_size: larger PUBLISH packets are dropped (as Mosquitto's
            message_size_limit does) and counted in `stats["dropped_oversize"]`.
        classify: optional topic -> label; `traffic[label]` then counts publish bytes in
            (from publishers) and out (to subscribers), whole packets.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 users: dict[str, str] | None = None, max_packet_size: int = 16 << 20,
                 classify: Callable[[str], str] | None = None) -> None:
        self.host, self.port = host, port
        self.users = users
        self.max_packet_size = max_packet_size
        self.classify = classify
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Message] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.traffic: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()  # guards traffic/stats reads from other threads

    # lifecycle ---------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        self._thread = threading.Thread(target=self._run, name="mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("embedded broker did not start")
        if self._server is None:
            raise RuntimeError(f"embedded broker could not listen on {self.host}:{self.port}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, limit=1 << 16))
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as e:
            log.error("broker: cannot listen on %s:%s: %s", self.host, self.port, e)
            self._ready.set()
            return
        self._ready.set()
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        loop.run_forever()
        loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for s in list(self.sessions.values()):
                if s.conn is not None:
                    s.conn.closed = True
                    s.conn.writer.close()
            loop.stop()

        asyncio.run_coroutine_threadsafe(_shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def traffic_snapshot(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self.traffic.items()}

    # connection handling -----------------------------------------------------
    async def _read_packet(self, conn: _Conn) -> tuple[int, int, bytes, int]:
        first = await conn.reader.readexactly(1)
        mult, length, nbytes = 1, 0, 1
        for _ in range(4):
            b = (await conn.reader.readexactly(1))[0]
            nbytes += 1
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        else:
            raise _Malformed("remaining length over 4 bytes")
        if length > self.max_packet_size:
            # read and discard, as Mosquitto does for an oversize publish (no error to 3.1.1)
            remaining = length
            while remaining:
                remaining -= len(await conn.reader.readexactly(min(remaining, 1 << 16)))
            self.stats["dropped_oversize"] += 1
            return first[0] >> 4, first[0] & 0x0F, b"", -1
        body = await conn.reader.readexactly(length) if length else b""
        return first[0] >> 4, first[0] & 0x0F, body, nbytes + length

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        graceful = False
        try:
            ptype, _, body, _ = await asyncio.wait_for(self._read_packet(conn), 10.0)
            if ptype != CONNECT or not await self._on_connect(conn, body):
                return
            while not conn.closed:
                timeout = conn.keepalive * 1.5 if conn.keepalive else None
                ptype, flags, body, size = await asyncio.wait_for(self._read_packet(conn), timeout)
                if size < 0:
                    continue
                if ptype == DISCONNECT:
                    graceful = True
                    return
                await self._dispatch(conn, ptype, flags, body, size)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, _Malformed) as e:
            log.debug("broker: connection ended: %r", e)
        finally:
            await self._drop(conn, graceful)

    async def _on_connect(self, conn: _Conn, body: bytes) -> bool:
        r = _Reader(body)
        proto, level = r.text(), r.u8()
        flags, conn.keepalive = r.u8(), r.u16()
        if proto not in ("MQTT", "MQIsdp") or level not in (3, 4):
            await self._send(conn, bytes([CONNACK << 4, 2, 0, 1]))  # unacceptable version
            return False
        client_id = r.text()
        clean = bool(flags & 0x02)
        if flags & 0x04:
            wtopic, wpayload = r.text(), r.blob()
            conn.will = _Message(wtopic, wpayload, (flags >> 3) & 3, bool(flags & 0x20))
        user = r.text() if flags & 0x80 else None
        password = r.blob().decode(errors="replace") if flags & 0x40 else None
        if self.users is not None and (user is None or self.users.get(user) != password):
            await self._send(conn, bytes([CONNACK << 4, 2, 0, 5]))  # not authorized
            return False
        if not client_id:
            if not clean:
                await self._send(conn, bytes([CONNACK << 4, 2, 0, 2]))  # identifier rejected
                return False
            client_id = f"anon-{id(conn)}"
        old = self.sessions.get(client_id)
        if old is not None and old.conn is not None:  # take-over: close the previous connection
            old.conn.closed = True
            old.conn.will = None
            old.conn.writer.close()
            old.conn = None
        present = old is not None and not clean and not old.clean
        session = old if present and old is not None else _Session(client_id, clean)
        session.clean = clean
        session.conn = conn
        conn.session = session
        self.sessions[client_id] = session
        await self._send(conn, bytes([CONNACK << 4, 2, 1 if present else 0, 0]))
        if not present:
            session.inflight.clear()
        for pid, msg in list(session.inflight.items()):  # unacknowledged before the drop
            await self._write_publish(session, conn, msg, pid, retain=False, dup=True)
        while session.queued:
            await self._deliver(session, session.queued.popleft(), retain=False)
        return True

    async def _drop(self, conn: _Conn, graceful: bool) -> None:
        conn.closed = True
        s = conn.session
        if s is not None and s.conn is conn:
            s.conn = None
            if s.clean:
                self.sessions.pop(s.client_id, None)
        if not graceful and conn.will is not None:
            await self._publish(conn.will)
        try:
            conn.writer.close()
        except Exception:  # already torn down
            pass

    async def _dispatch(self, conn: _Conn, ptype: int, flags: int, body: bytes, size: int) -> None:
        r = _Reader(body)
        if ptype == PUBLISH:
            qos, retain = (flags >> 1) & 3, bool(flags & 1)
            topic = r.text()
            if not topic or "+" in topic or "#" in topic:
                raise _Malformed(f"bad publish topic {topic!r}")
            pid = r.u16() if qos else 0
            payload = r.rest()
            self._count(topic, size, 0)
            if qos == 2:
                if pid not in conn.qos2_in:
                    conn.qos2_in.add(pid)
                    await self._publish(_Message(topic, payload, qos, retain))
                await self._send(conn, bytes([PUBREC << 4, 2]) + struct.pack("!H", pid))
                return
            await self._publish(_Message(topic, payload, qos, retain))
            if qos == 1:
                await self._send(conn, bytes([PUBACK << 4, 2]) + struct.pack("!H", pid))
        elif ptype == PUBREL:
            pid = r.u16()
            conn.qos2_in.discard(pid)
            await self._send(conn, bytes([PUBCOMP << 4, 2]) + struct.pack("!H", pid))
        elif ptype == PUBREC:  # we sent QoS 2: acknowledge the flow
            pid = r.u16()
            await self._send(conn, bytes([PUBREL << 4 | 2, 2]) + struct.pack("!H", pid))
        elif ptype in (PUBACK, PUBCOMP):
            if conn.session is not None:
                conn.session.inflight.pop(r.u16(), None)
        elif ptype == SUBSCRIBE:
            await self._on_subscribe(conn, r)
        elif ptype == UNSUBSCRIBE:
            pid = r.u16()
            assert conn.session is not None
            while r.pos < len(r.data):
                conn.session.subs.pop(r.text(), None)
            await self._send(conn, bytes([UNSUBACK << 4, 2]) + struct.pack("!H", pid))
        elif ptype == PINGREQ:
            await self._send(conn, bytes([PINGRESP << 4, 0]))
        else:
            raise _Malformed(f"unexpected packet type {ptype}")

    async def _on_subscribe(self, conn: _Conn, r: _Reader) -> None:
        pid = r.u16()
        session = conn.session
        assert session is not None
        granted: list[int] = []
        filters: list[tuple[str, int]] = []
        while r.pos < len(r.data):
            filt, qos = r.text(), r.u8() & 3
            if not filt or qos > 2:
                granted.append(0x80)
                continue
            session.subs[filt] = qos
            granted.append(qos)
            filters.append((filt, qos))
        body = struct.pack("!H", pid) + bytes(granted)
        await self._send(conn, bytes([SUBACK << 4]) + _encode_len(len(body)) + body)
        for filt, qos in filters:
            for msg in list(self.retained.values()):
                if topic_matches(filt, msg.topic):
                    await self._deliver(session, _Message(msg.topic, msg.payload,
                                                          min(qos, msg.qos)), retain=True)

    # routing -----------------------------------------------------------------
    async def _publish(self, msg: _Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = _Message(msg.topic, msg.payload, msg.qos, True)
            else:
                self.retained.pop(msg.topic, None)
        self.stats["published"] += 1
        for session in list(self.sessions.values()):
            qos = -1
            for filt, sq in session.subs.items():
                if sq > qos and topic_matches(filt, msg.topic):
                    qos = sq
            if qos < 0:
                continue
            out = _Message(msg.topic, msg.payload, min(qos, msg.qos))
            if session.conn is None:
                if out.qos > 0:
                    session.queued.append(out)
                continue
            await self._deliver(session, out, retain=False)

    async def _deliver(self, session: _Session, msg: _Message, retain: bool) -> None:
        conn = session.conn
        if conn is None or conn.closed:
            if msg.qos > 0:
                session.queued.append(msg)
            return
        pid = 0
        if msg.qos:
            pid = session.pid()
            if len(session.inflight) < 65000:
                session.inflight[pid] = msg
        await self._write_publish(session, conn, msg, pid, retain=retain, dup=False)

    async def _write_publish(self, session: _Session, conn: _Conn, msg: _Message, pid: int, *,
                             retain: bool, dup: bool) -> None:
        var = _str(msg.topic) + (struct.pack("!H", pid) if msg.qos else b"")
        body_len = len(var) + len(msg.payload)
        flags = msg.qos << 1 | int(retain) | (0x08 if dup else 0)
        header = bytes([PUBLISH << 4 | flags]) + _encode_len(body_len)
        self._count(msg.topic, 0, len(header) + body_len)
        conn.writer.write(header + var)
        conn.writer.write(msg.payload)
        try:
            await conn.writer.drain()
        except ConnectionError:
            conn.closed = True

    async def _send(self, conn: _Conn, data: bytes) -> None:
        conn.writer.write(data)
        await conn.writer.drain()

    def _count(self, topic: str, n_in: int, n_out: int) -> None:
        if self.classify is None:
            return
        label = self.classify(topic)
        with self._lock:
            t = self.traffic[label]
            t[0] += n_in
            t[1] += n_out
