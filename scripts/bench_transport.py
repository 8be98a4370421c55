#!/usr/bin/env python3
"""Transport benchmark: adapter transfer over Mosquitto on loopback, and aggregator ingest.

1. transfer: an adapter of SmolLM2-135M shapes (q,v on all 30 blocks, rank 16: 3.7 MB fp32)
   sent by the fleet protocol (manifest + 64 KiB chunks at QoS 1, reassembled and sha256-
   checked by a subscriber) against the same bytes as one message through the raw
   `mosquitto_pub -f` / `mosquitto_sub -C 1` clients. MB/s and the ratio.
2. ingest: 200 simulated devices (SmolLM2 shapes, three device classes) each upload one
   update; (a) straight into `AggregatorService.accept_update` (decode, validate, journal
   with fsync, fold), (b) end to end through Mosquitto into the running aggregator node.
   Updates/s.

    python scripts/bench_transport.py [--devices 200] [--repeats 5] [--threads 1] [--json FILE]

Starts its own mosquitto on a free loopback port (needs the mosquitto package).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.adapter import LoRAWeights  # noqa: E402
from edge_runtime.config import (  # noqa: E402
    FleetConfig,
    MqttConfig,
    StrategyConfig,
    StrategyName,
    TrainConfig,
)
from edge_runtime.config import lora_module_name as module_name  # noqa: E402
from edge_runtime.fl.types import ClientPlan  # noqa: E402
from edge_runtime.fleet.codec import encode_adapter  # noqa: E402
from edge_runtime.fleet.mqtt_client import MqttLink  # noqa: E402
from edge_runtime.fleet.protocol import Manifest, Presence, Register, Topics  # noqa: E402
from edge_runtime.fleet.server import AggregatorNode, publish_transfer  # noqa: E402
from edge_runtime.fleet.transfer import Reassembler, make_manifest  # noqa: E402
from edge_runtime.planning import GlobalShape, Planner  # noqa: E402
from edge_runtime.rounds.server import AggregatorService  # noqa: E402

N_LAYERS, DIM, KV_DIM = 30, 576, 192  # SmolLM2-135M
FP = "b" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    import getpass

    conf = tmp / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                    "persistence false\nmax_queued_messages 1000000\nlog_dest none\n")
    proc = subprocess.Popen([exe, "-c", str(conf)])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def shapes(depth: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(N_LAYERS - depth, N_LAYERS):
        out[module_name(i, "q_proj")] = (DIM, DIM)
        out[module_name(i, "v_proj")] = (KV_DIM, DIM)
    return out


def random_adapter(ranks: dict[str, int], shp: dict[str, tuple[int, int]], seed: int,
                   alpha: float = 16.0) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    return {n: LoRAWeights(torch.randn(r, shp[n][1], generator=g) * 0.01,
                           torch.randn(shp[n][0], r, generator=g) * 0.01, alpha)
            for n, r in ranks.items()}


# 1. transfer --------------------------------------------------------------------------
def bench_transfer(port: int, data: bytes, repeats: int) -> dict[str, float]:
    url = f"mqtt://127.0.0.1:{port}"
    topics = Topics("bench", "t")
    recv = MqttLink(MqttConfig(url=url), "bench-recv", [f"{topics.base}/dev/+/up/#"])
    send = MqttLink(MqttConfig(url=url), "bench-send", [])
    recv.connect(10)
    send.connect(10)
    time.sleep(0.3)
    ours = []
    for k in range(repeats):
        m = make_manifest(data, kind="update", round=k, device_id="d")
        r = Reassembler(max_bytes=len(data) + 1)
        t0 = time.perf_counter()
        publish_transfer(send, topics.up_manifest("d", m.transfer_id),
                         lambda off, t=m.transfer_id: topics.up_chunk("d", t, off),  # type: ignore[misc]
                         m, data)
        while not r.complete:
            msg = recv.get(10)
            if msg is None:
                raise RuntimeError("transfer stalled")
            pt = topics.parse(msg.topic)
            if pt.kind == "up_manifest":
                r.set_manifest(Manifest.from_bytes(msg.payload))
            else:
                r.add_chunk(int(pt.offset or 0), msg.payload)
        assert r.result() == data
        ours.append(time.perf_counter() - t0)
    send.close()
    recv.close()

    raw = []
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.bin", Path(d) / "out.bin"
        src.write_bytes(data)
        for _ in range(repeats):
            with open(dst, "wb") as out:
                sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                                        "-t", "bench/raw", "-C", "1", "-q", "1", "-N"],
                                       stdout=out)
                time.sleep(0.5)  # subscribed
                t0 = time.perf_counter()
                subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t",
                                "bench/raw", "-q", "1", "-f", str(src)], check=True)
                sub.wait(60)
                raw.append(time.perf_counter() - t0)
            assert dst.read_bytes() == data
    mb = len(data) / 1e6
    ours_s, raw_s = statistics.median(ours), statistics.median(raw)
    return {"bytes": len(data), "ours_median_s": ours_s, "ours_MBps": mb / ours_s,
            "raw_median_s": raw_s, "raw_MBps": mb / raw_s, "ratio_ours_over_raw":
            (mb / ours_s) / (mb / raw_s)}


# 2. ingest ----------------------------------------------------------------------------
CLASSES = (("pi5", 8, 4), ("pi4", 4, 2), ("phone", 2, 1))


def make_fleet(n: int, state: Path, strategy: str) -> tuple[AggregatorService, dict]:
    shape = GlobalShape(n_layers=N_LAYERS, depth=4, r_max=8, targets=("q_proj", "v_proj"),
                        alpha=16.0)
    cfg = FleetConfig(rounds=1, min_clients=n, round_timeout_s=600, max_update_bytes=8 << 20)
    st = StrategyConfig(StrategyName(strategy))
    svc = AggregatorService(cfg, st, TrainConfig(steps=1), Planner(shape, st, steps=1),
                            shapes(4), FP, state)
    payloads = {}
    for k in range(n):
        cls = CLASSES[k % 3][0]
        dev = f"dev{k:03d}"
        svc.register(Register(dev, FP, 10 + k, {}, cls))
        payloads[dev] = cls
    return svc, payloads


def updates_for(svc: AggregatorService) -> dict[str, bytes]:
    out = {}
    assert svc.open is not None
    for i, (dev, pj) in enumerate(sorted(svc.open.plans.items())):
        plan = ClientPlan.from_json(pj)
        a = random_adapter(plan.ranks, svc.shapes, seed=i)
        out[dev] = encode_adapter(a, {"fingerprint": FP, "n_samples": 10 + i, "round": 0})
    return out


def bench_ingest_service(n: int, strategy: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        svc, _ = make_fleet(n, Path(d) / "state", strategy)
        svc.plan_round()
        ups = updates_for(svc)
        t0 = time.perf_counter()
        for dev, data in ups.items():
            m = make_manifest(data, kind="update", round=0, device_id=dev)
            assert svc.accept_update(dev, m, data).accepted
        t_accept = time.perf_counter() - t0
        t1 = time.perf_counter()
        rec = svc.close_round()
        t_close = time.perf_counter() - t1
        assert rec is not None and rec.participants == n
        total = sum(len(v) for v in ups.values())
    return {"devices": n, "update_MB_total": total / 1e6, "accept_s": t_accept,
            "updates_per_s": n / t_accept, "close_round_s": t_close}


def bench_ingest_mqtt(port: int, n: int, strategy: str, publishers: int = 8) -> dict[str, float]:
    url = f"mqtt://127.0.0.1:{port}"
    mq = MqttConfig(url=url, fleet="ingest")
    topics = Topics(mq.prefix, mq.fleet)
    with tempfile.TemporaryDirectory() as d:
        svc, _ = make_fleet(n, Path(d) / "state", strategy)
        svc.online.clear()  # they must come online over MQTT
        node = AggregatorNode(svc, mq, wait_for_clients_s=120, linger_s=0.0)
        done = threading.Event()
        t_close: list[float] = []

        def on_round(_rec: object) -> None:
            t_close.append(time.perf_counter())
            done.set()

        node.on_round = on_round  # type: ignore[assignment]
        th = threading.Thread(target=node.run, daemon=True)
        links = [MqttLink(mq, f"pub{j}", []) for j in range(publishers)]
        for link in links:
            link.connect(10)
        th.start()
        time.sleep(1.0)
        devs = sorted(svc.devices)
        for k, dev in enumerate(devs):
            links[k % publishers].publish(topics.presence(dev), Presence(dev, True).to_bytes())
        while svc.open is None:
            time.sleep(0.05)
        ups = updates_for(svc)
        manifests = {dev: make_manifest(data, kind="update", round=0, device_id=dev)
                     for dev, data in ups.items()}
        t0 = time.perf_counter()

        def pub(j: int) -> None:
            for k, dev in enumerate(devs):
                if k % publishers == j:
                    m = manifests[dev]
                    publish_transfer(links[j], topics.up_manifest(dev, m.transfer_id),
                                     lambda off, t=m.transfer_id, d=dev: topics.up_chunk(d, t, off),  # type: ignore[misc]
                                     m, ups[dev])

        pubs = [threading.Thread(target=pub, args=(j,)) for j in range(publishers)]
        for p in pubs:
            p.start()
        for p in pubs:
            p.join()
        if not done.wait(600):
            raise RuntimeError("ingest over MQTT did not finish")
        th.join(30)
        for link in links:
            link.close()
        elapsed = t_close[0] - t0
        total = sum(len(v) for v in ups.values())
    return {"devices": n, "publishers": publishers, "update_MB_total": total / 1e6,
            "first_publish_to_round_closed_s": elapsed, "updates_per_s": n / elapsed,
            "MBps": total / 1e6 / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16, help="rank of the transferred adapter")
    ap.add_argument("--strategy", default="hetlora")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: small per-update ops; more threads only spin)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    proc, port = start_mosquitto(tmp)
    try:
        shp = shapes(N_LAYERS)
        adapter = random_adapter({n: args.rank for n in shp}, shp, seed=0)
        data = encode_adapter(adapter, {"fingerprint": FP, "n_samples": 1, "round": 0})
        res = {"transfer": bench_transfer(port, data, args.repeats),
               "ingest_service": bench_ingest_service(args.devices, args.strategy),
               "ingest_mqtt": bench_ingest_mqtt(port, args.devices, args.strategy)}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    t, s, q = res["transfer"], res["ingest_service"], res["ingest_mqtt"]
    print(f"transfer {t['bytes'] / 1e6:.2f} MB adapter over Mosquitto (loopback):")
    print(f"  fleet protocol (64 KiB chunks, QoS 1, sha256): {t['ours_MBps']:.1f} MB/s "
          f"({t['ours_median_s'] * 1e3:.0f} ms)")
    print(f"  raw mosquitto_pub -f | mosquitto_sub (1 msg):  {t['raw_MBps']:.1f} MB/s "
          f"({t['raw_median_s'] * 1e3:.0f} ms)")
    print(f"  ratio ours/raw: {t['ratio_ours_over_raw']:.2f}")
    print(f"ingest, {s['devices']} devices ({s['update_MB_total']:.1f} MB of updates, "
          f"{args.strategy}, {args.threads} torch thread(s)):")
    print(f"  service only (decode+validate+journal+fold): {s['updates_per_s']:.0f} updates/s; "
          f"close_round {s['close_round_s']:.2f} s")
    print(f"  end to end through Mosquitto: {q['updates_per_s']:.0f} updates/s "
          f"({q['MBps']:.1f} MB/s); ratio MQTT/service {q['updates_per_s'] / s['updates_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
