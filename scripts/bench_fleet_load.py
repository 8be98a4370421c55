#!/usr/bin/env python3
"""Fleet load test: N emulated devices through a real Mosquitto into the real aggregator.

For each N (default 100, 300, 1000) this starts, on this machine:

- Mosquitto as `edge-rt demo` starts it (`fleet.mosquitto.LocalMosquitto`: one user and
  password per device, the production ACL, loopback);
- the aggregator, `AggregatorNode` + `AggregatorService` (fedavg) in a process of its own
  (this script with `--role aggregator`), so its CPU time and peak RSS are its own;
  SmolLM2-135M adapter shapes without the model: LoRA rank `--rank` on q_proj and v_proj
  of the top `--depth` of 30 blocks of a 576-wide model (k/v width 192);
- `--workers` device processes (`--role devices`), each driving its share of the N
  devices as plain paho-mqtt clients on one selector loop (no thread per device). Each
  device speaks the protocol as `fleet/agent.py` does: MQTT 5 with its own user and an
  "offline" presence Will, registers when it sees the aggregator online, reads the
  retained round announcement, downloads its global transfer (manifest + chunks,
  sha256-checked, decoded, fingerprint-checked), builds an update of its plan's keys,
  shapes, ranks and alpha (seeded random factors: no training), encodes it with the
  fleet codec, sends manifest + chunks at QoS 1 and re-sends after the agent's ack
  timeout until acked.

Per round it reports: time from the round's opening to its merge, updates/s, the
aggregator's CPU seconds and peak RSS, the broker's CPU seconds, and the count check:
updates sent (distinct devices), merged (the aggregator's accepted list), lost (sent,
never merged) and double (merged more than once, merged without being sent, or the
merged global != the weighted mean of the sent updates); the last two must be 0.

    python scripts/bench_fleet_load.py --devices 100,300,1000 --rounds 2 \
        --json docs/results/fleet_load/load.json

A long run (minutes per size): not part of the test suite (tests/scripts/
test_bench_fleet_load.py runs it at N=5). Needs the mosquitto package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import torch
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.adapter import Adapter, LoRAWeights  # noqa: E402
from edge_runtime.config import (  # noqa: E402
    AgentConfig,
    FleetConfig,
    MqttConfig,
    StrategyConfig,
    StrategyName,
    TrainConfig,
)
from edge_runtime.config import lora_module_name as module_name  # noqa: E402
from edge_runtime.fl.types import ClientPlan  # noqa: E402
from edge_runtime.fleet.agent import resend_after  # noqa: E402
from edge_runtime.fleet.codec import decode_adapter, encode_adapter  # noqa: E402
from edge_runtime.fleet.mosquitto import AGGREGATOR_USER, LocalMosquitto  # noqa: E402
from edge_runtime.fleet.protocol import (  # noqa: E402
    Ack,
    AggregatorStatus,
    Manifest,
    Presence,
    ProtocolError,
    Register,
    RoundAnnouncement,
    Topics,
)
from edge_runtime.fleet.server import AggregatorNode  # noqa: E402
from edge_runtime.fleet.transfer import (  # noqa: E402
    Reassembler,
    TransferError,
    iter_chunks,
    make_manifest,
)
from edge_runtime.planning import GlobalShape, Planner  # noqa: E402
from edge_runtime.rounds.server import AggregatorService, RoundRecord  # noqa: E402

N_LAYERS, DIM, KV_DIM = 30, 576, 192  # SmolLM2-135M
FP = hashlib.sha256(b"bench-fleet-load base model").hexdigest()
FLEET = "load"
BUILDS_PER_PASS = 4  # updates a device worker builds between two polls of its sockets
MAX_SAMPLES = 8  # devices hold 1..8 samples: distinct aggregation weights
AGENT = AgentConfig(device_id="x", data=Path("x.jsonl"))  # the agent's defaults

log = logging.getLogger("bench_fleet_load")


def module_shapes(depth: int) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} of q_proj and v_proj in the top `depth` blocks."""
    out = {}
    for i in range(N_LAYERS - depth, N_LAYERS):
        out[module_name(i, "q_proj")] = (DIM, DIM)
        out[module_name(i, "v_proj")] = (KV_DIM, DIM)
    return out


def n_samples(index: int) -> int:
    return 1 + index % MAX_SAMPLES


def device_update(index: int, round_index: int, plan: ClientPlan,
                  shapes: dict[str, tuple[int, int]]) -> Adapter:
    """The update device `index` sends in `round_index`: seeded factors of its plan."""
    g = torch.Generator().manual_seed(index * 100_003 + round_index)
    return {n: LoRAWeights(torch.randn(r, shapes[n][1], generator=g) * 0.02,
                           torch.randn(shapes[n][0], r, generator=g) * 0.01, plan.alpha)
            for n, r in sorted(plan.ranks.items())}


def encode_update(index: int, round_index: int, plan: ClientPlan,
                  shapes: dict[str, tuple[int, int]], compression: str) -> bytes:
    meta = {"fingerprint": FP, "n_samples": n_samples(index), "round": round_index,
            "steps": 0, "train_loss": None}
    return encode_adapter(device_update(index, round_index, plan, shapes), meta, compression)


def process_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


# aggregator process ---------------------------------------------------------------------
def aggregator_main(args: argparse.Namespace) -> int:
    """Run the real aggregator node for `args.rounds` rounds of `args.n` devices; write a
    JSON of per-round measurements to `args.out`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    mq = MqttConfig(url=f"mqtt://127.0.0.1:{args.port}", username=AGGREGATOR_USER,
                    password=os.environ["BENCH_AGG_PASSWORD"], fleet=FLEET)
    shape = GlobalShape(n_layers=N_LAYERS, depth=args.depth, r_max=args.rank,
                        targets=("q_proj", "v_proj"), alpha=16.0)
    fleet = FleetConfig(rounds=args.rounds, min_clients=1, round_timeout_s=args.round_timeout_s,
                        compression=args.compression)
    strategy = StrategyConfig(StrategyName.FEDAVG)
    recipe = TrainConfig(steps=MAX_SAMPLES, batch_size=1)  # weight cap >= every claim
    svc = AggregatorService(fleet, strategy, recipe, Planner(shape, strategy, steps=1),
                            module_shapes(args.depth), FP, Path(args.state))
    me, broker = psutil.Process(), psutil.Process(args.broker_pid)
    t_start = time.monotonic()
    rounds: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    plan_round, accept_update, close_round = svc.plan_round, svc.accept_update, svc.close_round

    def timed_plan():  # type: ignore[no-untyped-def]
        opened = plan_round()
        cur.clear()
        cur.update(t_open=time.monotonic(), cpu=process_cpu(me), broker_cpu=process_cpu(broker),
                   first=None, last=None, selected=len(opened.announcement.devices),
                   download_bytes=sum(m.size for m, _ in opened.downloads.values()))
        if not rounds:
            cur["join_s"] = cur["t_open"] - t_start
        return opened

    def timed_accept(dev, manifest, payload):  # type: ignore[no-untyped-def]
        verdict = accept_update(dev, manifest, payload)
        if verdict.accepted:
            now = time.monotonic()
            cur["first"] = cur["first"] or now
            cur["last"] = now
        return verdict

    def timed_close(duration_s=None):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        rec = close_round(duration_s)
        cur["close_s"] = time.monotonic() - t0
        return rec

    def on_round(rec: RoundRecord) -> None:
        now = time.monotonic()
        span = (cur["last"] - cur["first"]) if cur["first"] else 0.0
        rounds.append({
            "round": rec.round - 1, "join_s": cur.get("join_s"),
            "time_to_close_s": now - cur["t_open"], "ingest_span_s": span,
            "merge_s": cur["close_s"],
            "selected": cur["selected"], "participants": rec.participants,
            "accepted": rec.accepted, "stragglers": rec.stragglers, "rejected": rec.rejected,
            "bytes_up": rec.bytes_up, "download_bytes": cur["download_bytes"],
            "agg_cpu_s": process_cpu(me) - cur["cpu"],
            "agg_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "broker_cpu_s": process_cpu(broker) - cur["broker_cpu"],
            "inbox_dropped": node.link.dropped, "uploads_evicted": node.transfers.evicted})
        Path(args.out).write_text(json.dumps({"rounds": rounds}, indent=1))

    svc.plan_round = timed_plan  # type: ignore[method-assign]
    svc.accept_update = timed_accept  # type: ignore[method-assign]
    svc.close_round = timed_close  # type: ignore[method-assign]
    node = AggregatorNode(svc, mq, on_round=on_round, wait_for_clients_s=args.join_timeout_s,
                          start_clients=args.n, linger_s=1.0)
    node.run()
    Path(args.out).write_text(json.dumps({"rounds": rounds, "finished": svc.finished,
                                          "rejected_total": dict(svc.rejected)}, indent=1))
    return 0


# emulated devices -------------------------------------------------------------------------
class EmulatedDevice:
    """One device of the fleet protocol without training (see the module docstring)."""

    def __init__(self, index: int, dev: str, password: str, topics: Topics,
                 compression: str) -> None:
        self.index, self.dev, self.topics, self.compression = index, dev, topics, compression
        self.inbox: deque[mqtt.MQTTMessage] = deque()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-rt-dev-{dev}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(dev, password)
        c.will_set(topics.presence(dev), Presence(dev, False).to_bytes(), qos=1, retain=True)
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_message = lambda _c, _u, msg: self.inbox.append(msg)
        self.client = c
        self.connected = False
        self.download: tuple[str, Reassembler] | None = None
        self.pending: RoundAnnouncement | None = None
        self.inflight: dict[str, tuple[Manifest, bytes, float]] = {}
        self.done_rounds: set[int] = set()
        self.finished = False
        # what the count check needs: round -> transfer id sent, sends, acks
        self.sent: dict[int, str] = {}
        self.sends: dict[int, int] = {}  # round -> times its update was sent
        self.acks: list[tuple[int, str, str, str]] = []  # (round, tid, status, reason)
        self.errors: list[str] = []

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any,
                    _p: object) -> None:
        if reason.is_failure:
            self.errors.append(f"connect refused: {reason}")
            return
        self.connected = True
        for t in (self.topics.round(), self.topics.status(), self.topics.ack(self.dev)):
            client.subscribe(t, qos=1)

    def connect(self, port: int) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = MqttConfig().session_expiry_s
        self.client.connect("127.0.0.1", port, keepalive=MqttConfig().keepalive_s,
                            clean_start=False, properties=props)

    def _register(self) -> None:
        c, dev = self.client, self.dev
        c.publish(self.topics.presence(dev), Presence(dev, True).to_bytes(), qos=1, retain=True)
        c.publish(self.topics.register(dev),
                  Register(dev, FP, n_samples(self.index), {}, "emulated").to_bytes(), qos=1)

    def handle(self, msg: mqtt.MQTTMessage) -> None:
        try:
            pt = self.topics.parse(msg.topic)
        except ProtocolError:
            return
        if not msg.payload:
            return
        try:
            if pt.kind == "status":
                if AggregatorStatus.from_bytes(msg.payload).online:
                    self._register()
            elif pt.kind == "round":
                self._on_round(RoundAnnouncement.from_bytes(msg.payload))
            elif pt.kind == "ack":
                ack = Ack.from_bytes(msg.payload)
                self.acks.append((ack.round, ack.transfer_id, ack.status, ack.reason))
                self.inflight.pop(ack.transfer_id, None)
            elif pt.kind in ("down_manifest", "down_chunk") and self.download is not None:
                tid, r = self.download
                if pt.transfer_id != tid:
                    return
                if pt.kind == "down_manifest":
                    r.set_manifest(Manifest.from_bytes(msg.payload))
                else:
                    r.add_chunk(int(pt.offset or 0), msg.payload)
        except (ProtocolError, TransferError) as e:
            self.errors.append(f"bad message on {msg.topic}: {e}")
            if self.download is not None and pt.transfer_id == self.download[0]:
                self.download = None

    def _on_round(self, ann: RoundAnnouncement) -> None:
        if ann.fingerprint != FP:
            self.errors.append("announcement for another base model")
            return
        for tid, (m, _, _) in list(self.inflight.items()):
            if m.round < ann.round:
                self.inflight.pop(tid)
        if ann.finished:
            self.finished = True  # the final download is not part of the measured rounds
            return
        if self.dev not in ann.devices or ann.round in self.done_rounds:
            return
        # only its own plan is kept: N devices in one process holding N plans each is
        # quadratic memory here (a real device holds one announcement)
        self.pending = ann = replace(ann, devices={self.dev: ann.devices[self.dev]})
        tid = ann.devices[self.dev].global_transfer_id
        if self.download is not None and self.download[0] == tid:
            return
        if self.download is not None:
            self.client.unsubscribe(f"{self.topics.base}/agg/down/{self.download[0]}/#")
        self.download = (tid, Reassembler(max_bytes=1 << 30))
        self.client.subscribe(f"{self.topics.base}/agg/down/{tid}/#", qos=1)

    def step(self, now: float, may_build: bool) -> bool:
        """Build and send the update once the download is complete (if `may_build`); re-send
        unacked ones. Returns whether it built one."""
        ann, dl = self.pending, self.download
        built = False
        if may_build and ann is not None and dl is not None and dl[1].complete:
            self.pending = None
            try:
                glob, meta = decode_adapter(dl[1].result())
                if meta.get("fingerprint") != FP:
                    raise TransferError("bad_fingerprint", "global for another base model")
            except TransferError as e:
                self.errors.append(f"download failed: {e}")
                self.download = None
                return False
            self.done_rounds.add(ann.round)
            plan = ClientPlan.from_json(ann.devices[self.dev].plan)
            shapes = {n: (w.lora_b.shape[0], w.lora_a.shape[1]) for n, w in glob.items()}
            data = encode_update(self.index, ann.round, plan, shapes, self.compression)
            m = make_manifest(data, kind="update", round=ann.round, device_id=self.dev,
                              chunk_size=AGENT.chunk_size, compression=self.compression,
                              meta={"n_samples": n_samples(self.index)})
            self.sent[ann.round] = m.transfer_id
            self._send(m, data, now)
            built = True
        for m, data, sent in list(self.inflight.values()):
            if now - sent > resend_after(AGENT.ack_timeout_s, self.sends.get(m.round, 1)):
                self._send(m, data, now)
        return built

    def _send(self, m: Manifest, data: bytes, now: float) -> None:
        c, dev = self.client, self.dev
        c.publish(self.topics.up_manifest(dev, m.transfer_id), m.to_bytes(), qos=1)
        for off, chunk in iter_chunks(data, m.chunk_size):
            c.publish(self.topics.up_chunk(dev, m.transfer_id, off), chunk, qos=1)
        self.inflight[m.transfer_id] = (m, data, now)
        self.sends[m.round] = self.sends.get(m.round, 0) + 1

    def report(self) -> dict[str, Any]:
        return {"sent": self.sent, "sends": self.sends, "acks": self.acks,
                "errors": self.errors[:5], "finished": self.finished}


def devices_main(args: argparse.Namespace) -> int:
    """Drive this worker's devices on one selector loop until all saw `finished`, the
    time limit, or SIGTERM; write each device's report to `args.out`."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    creds = json.loads(Path(args.creds).read_text())
    topics = Topics("edge-rt", FLEET)
    devs = [EmulatedDevice(int(i), d, pw, topics, args.compression) for i, d, pw in creds]
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    sel = selectors.DefaultSelector()
    socks: dict[str, Any] = {}

    def attach(d: EmulatedDevice, first: bool) -> None:
        for attempt in range(20):
            try:
                d.connect(args.port) if first else d.client.reconnect()
                break
            except OSError as e:
                d.errors.append(f"connect: {e}")
                time.sleep(0.2 * (attempt + 1))
        sock = d.client.socket()
        if sock is not None:
            sel.register(sock, selectors.EVENT_READ, d)
            socks[d.dev] = sock

    def detach(d: EmulatedDevice, rc: int) -> None:
        d.errors.append(f"connection lost ({mqtt.error_string(rc)}); reconnecting")
        d.connected = False
        sock = socks.pop(d.dev, None)
        if sock is not None:
            try:
                sel.unregister(sock)
            except (KeyError, ValueError, OSError):  # paho closed it already
                pass

    for d in devs:
        attach(d, first=True)
    end = time.monotonic() + args.time_limit_s
    next_misc = 0.0
    last_progress: tuple[int, ...] = ()
    while not stop[0] and time.monotonic() < end and not all(d.finished for d in devs):
        for key, mask in sel.select(timeout=0.05):
            d = key.data
            rc = d.client.loop_read(16) if mask & selectors.EVENT_READ else 0
            if rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN) and mask & selectors.EVENT_WRITE:
                rc = d.client.loop_write()
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):  # AGAIN: partial read
                detach(d, rc)
        now = time.monotonic()
        builds = 0  # a few updates per pass, so that the sockets (keep-alive) are served
        for d in devs:
            while d.inbox:
                d.handle(d.inbox.popleft())
            if d.dev not in socks:
                attach(d, first=False)
                continue
            builds += d.step(now, may_build=builds < BUILDS_PER_PASS)
            sock = socks.get(d.dev)
            if sock is None:
                continue
            if d.client.socket() is not sock:  # paho dropped the connection (keep-alive)
                detach(d, mqtt.MQTT_ERR_CONN_LOST)
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if d.client.want_write() else 0)
            if sel.get_key(sock).events != want:
                sel.modify(sock, want, d)
        if now > next_misc:
            next_misc = now + 1.0
            progress = (sum(d.connected for d in devs), sum(d.pending is not None for d in devs),
                        sum(len(d.sent) for d in devs), sum(len(d.acks) for d in devs),
                        sum(len(d.errors) for d in devs))
            if progress != last_progress:
                last_progress = progress
                log.info("connected %d, waiting for a download %d, sent %d, acks %d, "
                         "errors %d", *progress)
            for d in devs:
                if d.dev in socks and d.client.loop_misc() not in (mqtt.MQTT_ERR_SUCCESS,
                                                                   mqtt.MQTT_ERR_AGAIN):
                    detach(d, mqtt.MQTT_ERR_CONN_LOST)
    report = {d.dev: d.report() for d in devs}
    report["_cpu_s"] = process_cpu(psutil.Process())  # type: ignore[assignment]
    Path(args.out).write_text(json.dumps(report))
    for d in devs:
        d.client.disconnect()
    return 0


# the driver -------------------------------------------------------------------------------
def check_merge(state: Path, agg_round: dict[str, Any], index: dict[str, int],
                plan: ClientPlan, shapes: dict[str, tuple[int, int]],
                compression: str) -> float:
    """Max |global - expected| over the last merged round: the fedavg mean of the
    accepted devices' updates (each once, weight n_samples), decoded as sent."""
    got, _ = decode_adapter((state / f"global_r{agg_round['round'] + 1}.safetensors")
                            .read_bytes())
    sums = {n: [torch.zeros(shapes[n][0], r, dtype=torch.float64),
                torch.zeros(r, shapes[n][1], dtype=torch.float64)]
            for n, r in plan.ranks.items()}
    total = 0.0
    for dev in agg_round["accepted"]:
        k = index[dev]
        upd, _ = decode_adapter(encode_update(k, agg_round["round"], plan, shapes, compression))
        w = float(n_samples(k))
        total += w
        for n, lw in upd.items():
            sums[n][0] += w * lw.lora_b.double()
            sums[n][1] += w * lw.lora_a.double()
    err = 0.0
    for n, (b, a) in sums.items():
        err = max(err, (got[n].lora_b.double() - b / total).abs().max().item(),
                  (got[n].lora_a.double() - a / total).abs().max().item())
    return err


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One fleet of `n` devices for `args.rounds` rounds; the per-round results."""
    ids = [f"d{k:05d}" for k in range(n)]
    t0 = time.monotonic()
    mosq = LocalMosquitto(ids, prefix="edge-rt").start()
    setup_s = time.monotonic() - t0
    procs: list[subprocess.Popen[bytes]] = []
    state, out = work / f"state{n}", work / f"agg{n}.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--port", str(mosq.port), "--compression", args.compression]
    try:
        assert mosq.proc is not None
        env = {**os.environ, "BENCH_AGG_PASSWORD": mosq.passwords[AGGREGATOR_USER],
               "OMP_NUM_THREADS": "1"}
        with open(work / f"agg{n}.log", "wb") as lf:
            agg = subprocess.Popen([*me, "--role", "aggregator", *common, "--n", str(n),
                                    "--rounds", str(args.rounds), "--rank", str(args.rank),
                                    "--depth", str(args.depth), "--state", str(state),
                                    "--out", str(out), "--broker-pid", str(mosq.proc.pid),
                                    "--round-timeout-s", str(args.round_timeout_s),
                                    "--join-timeout-s", str(args.join_timeout_s)],
                                   stdout=lf, stderr=subprocess.STDOUT, env=env)
        procs.append(agg)
        limit = args.join_timeout_s + args.rounds * (args.round_timeout_s * 4 + 30)
        for w in range(args.workers):
            mine = [[k, ids[k], mosq.passwords[ids[k]]] for k in range(w, n, args.workers)]
            creds = work / f"creds{n}-{w}.json"
            creds.write_text(json.dumps(mine))
            creds.chmod(0o600)
            with open(work / f"dev{n}-{w}.log", "wb") as lf:
                procs.append(subprocess.Popen(
                    [*me, "--role", "devices", *common, "--creds", str(creds),
                     "--out", str(work / f"dev{n}-{w}.json"), "--time-limit-s", str(limit)],
                    stdout=lf, stderr=subprocess.STDOUT, env=env))
        try:
            agg.wait(limit)
        except subprocess.TimeoutExpired:
            log.error("N=%d: the aggregator did not finish within %.0f s", n, limit)
        for p in procs[1:]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        mosq.stop()
    agg_res = json.loads(out.read_text()) if out.exists() else {"rounds": []}
    devices: dict[str, Any] = {}
    worker_cpu = 0.0
    for w in range(args.workers):
        f = work / f"dev{n}-{w}.json"
        if f.exists():
            d = json.loads(f.read_text())
            worker_cpu += d.pop("_cpu_s")
            devices.update(d)
    return summarize(n, args, agg_res, devices, state, setup_s, worker_cpu)


def summarize(n: int, args: argparse.Namespace, agg_res: dict[str, Any],
              devices: dict[str, Any], state: Path, setup_s: float,
              worker_cpu: float) -> dict[str, Any]:
    index = {f"d{k:05d}": k for k in range(n)}
    shapes = module_shapes(args.depth)
    plan = ClientPlan("x", {m: args.rank for m in shapes}, 16.0)
    rows = []
    for r in range(args.rounds):
        rec = next((x for x in agg_res["rounds"] if x["round"] == r), None)
        sent = {d for d, v in devices.items() if str(r) in v["sent"]}
        accepted = rec["accepted"] if rec else []
        acked = {d for d, v in devices.items()
                 if any(a[0] == r and a[2] == "accepted" for a in v["acks"])}
        # an accepted ack for two transfer ids of one device and round would be two merges
        two_acks = sum(1 for v in devices.values()
                       if len({a[1] for a in v["acks"] if a[0] == r and a[2] == "accepted"}) > 1)
        double = (len(accepted) - len(set(accepted))) + len(set(accepted) - sent) + two_acks
        row: dict[str, Any] = {
            "devices": n, "round": r, "sent": len(sent), "merged": len(set(accepted)),
            "acked": len(acked), "lost": len(sent - set(accepted)), "double": double,
            "resends": sum(max(0, v["sends"].get(str(r), 0) - 1) for v in devices.values()),
        }
        if rec is not None:
            row.update({k: rec[k] for k in (
                "time_to_close_s", "ingest_span_s", "merge_s", "selected", "stragglers", "rejected",
                "agg_cpu_s", "agg_peak_rss_mb", "broker_cpu_s", "inbox_dropped", "uploads_evicted", "bytes_up",
                "download_bytes", "join_s")})
            row["updates_per_s"] = len(accepted) / rec["time_to_close_s"]
            row["mb_per_update"] = rec["bytes_up"] / max(1, len(accepted)) / 1e6
            if r == args.rounds - 1 and accepted:
                err = check_merge(state, rec, index, plan, shapes, args.compression)
                row["merge_max_err"] = err
                if err > 1e-6:
                    row["double"] += 1
        rows.append(row)
    errors = sorted({e for v in devices.values() for e in v["errors"]})[:10]
    return {"devices": n, "broker_setup_s": setup_s, "device_workers_cpu_s": worker_cpu,
            "rounds": rows, "finished": agg_res.get("finished", False),
            "device_errors": errors, "reported_devices": len(devices)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| N | round | close (s) | updates/s | agg CPU (s) | agg peak RSS (MB) | "
             "broker CPU (s) | sent | merged | lost | double | re-sends |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rounds"]:
            if "time_to_close_s" not in r:
                lines.append(f"| {r['devices']} | {r['round']} | did not close | - | - | - | - "
                             f"| {r['sent']} | {r['merged']} | {r['lost']} | {r['double']} "
                             f"| {r['resends']} |")
                continue
            lines.append(
                f"| {r['devices']} | {r['round']} | {r['time_to_close_s']:.1f} | "
                f"{r['updates_per_s']:.1f} | {r['agg_cpu_s']:.1f} | {r['agg_peak_rss_mb']:.0f} | "
                f"{r['broker_cpu_s']:.1f} | {r['sent']} | {r['merged']} | {r['lost']} | "
                f"{r['double']} | {r['resends']} |")
    return "\n".join(lines)


def driver_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [int(s) for s in args.devices.split(",")]
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-load-"))
    log.info("work folder %s (each process's log; removed at the end unless --keep-work)", work)
    upd = encode_update(0, 0, ClientPlan("x", {m: args.rank for m in module_shapes(args.depth)},
                                         16.0), module_shapes(args.depth), args.compression)
    log.info("update size %.0f kB (rank %d on q,v of %d blocks, %s)", len(upd) / 1e3,
             args.rank, args.depth, args.compression)
    header = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                          "ram_gb": psutil.virtual_memory().total / 2**30,
                          "mosquitto": LocalMosquitto([]).version(),
                          "ulimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)},
              "update_bytes": len(upd), "args": vars(args)}
    for n in sizes:
        t0 = time.monotonic()
        res = run_size(n, args, work)
        res["wall_s"] = time.monotonic() - t0
        results.append(res)
        ok = res["finished"] and all(r["lost"] == 0 and r["double"] == 0 and
                                     "time_to_close_s" in r for r in res["rounds"])
        res["ok"] = ok
        log.info("N=%d done in %.0f s: %s", n, res["wall_s"], "ok" if ok else "FAILED")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**header, "results": results}, indent=1))
        if not ok and args.stop_on_failure:
            break
    if args.keep_work:
        log.info("logs and state kept in %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    for res in results:
        print(f"N={res['devices']}: broker setup {res['broker_setup_s']:.1f} s, device "
              f"workers {res['device_workers_cpu_s']:.0f} CPU s, wall {res['wall_s']:.0f} s"
              + (f", device errors {res['device_errors']}" if res["device_errors"] else ""))
    return 0 if all(r["ok"] for r in results) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("driver", "aggregator", "devices"), default="driver")
    ap.add_argument("--devices", default="100,300,1000", help="fleet sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="device worker processes")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--depth", type=int, default=N_LAYERS, help="top blocks with LoRA")
    ap.add_argument("--compression", default="int8", choices=("fp32", "fp16", "int8"))
    ap.add_argument("--round-timeout-s", type=float, default=300.0)
    ap.add_argument("--join-timeout-s", type=float, default=300.0)
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work folder (each process's log, the aggregator's state)")
    ap.add_argument("--json", help="write the results here")
    # internal: the child processes
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--creds", help=argparse.SUPPRESS)
    ap.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--time-limit-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "aggregator":
        return aggregator_main(args)
    if args.role == "devices":
        return devices_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
