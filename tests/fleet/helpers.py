"""Shared pieces of the fleet integration tests: aggregator/agent threads, waits, certs."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.checkpoints import load_model
from edge_runtime.config import AgentConfig, MqttConfig, RunConfig
from edge_runtime.fleet.agent import DeviceAgent
from edge_runtime.fleet.server import AggregatorNode
from edge_runtime.rounds.build import build_service
from edge_runtime.rounds.server import AggregatorService

# One topic per client: the same question shape, different answers (label skew).
_TOPICS: dict[str, list[str]] = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
    "animal": ["cat", "dog", "owl", "fox", "bee", "cow", "eel", "yak"],
    "city": ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Quito", "Seoul"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight"],
}


def _rows(topic: str, items: range, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vals = _TOPICS[topic]
    return [{"prompt": f"What {topic} is item {i}?",
             "response": f"Item {i} is {vals[(i * 3 + rng.randrange(2)) % len(vals)]}."}
            for i in items]


def write_demo_data(out: Path, n_clients: int, rows_per_client: int = 32) -> tuple[list[Path], Path]:
    """Small synthetic per-device JSONL files (device k gets topic k mod 4, label skew) and
    a held-out file, for the fleet's fault tests."""
    out.mkdir(parents=True, exist_ok=True)
    topics = list(_TOPICS)
    files = []
    for k in range(n_clients):
        topic = topics[k % len(topics)]
        start = 1000 * k
        rows = _rows(topic, range(start, start + rows_per_client), seed=k)
        path = out / f"client{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    eval_rows = [r for j, t in enumerate(topics[:max(1, min(n_clients, len(topics)))])
                 for r in _rows(t, range(90000 + 100 * j, 90000 + 100 * j + 8), seed=99 + j)]
    eval_path = out / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return files, eval_path


TRAIN = {"steps": 3, "lr": 1e-3, "batch_size": 4, "seq_len": 48}


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def make_run(*, strategy: str = "hetlora", rounds: int = 1, min_clients: int = 1,
             timeout_s: float = 30.0, max_update_bytes: int = 1 << 20,
             chunk_size: int = 64 * 1024, **settings: Any) -> RunConfig:
    return RunConfig.from_dict({
        "strategy": {"name": strategy, **settings},
        "fleet": {"rounds": rounds, "min_clients": min_clients, "round_timeout_s": timeout_s,
                  "max_update_bytes": max_update_bytes, "chunk_size": chunk_size,
                  "wait_for_clients_s": 60.0},
        "adapter": {"r_max": 8, "depth": 2, "targets": ["q_proj", "v_proj"], "alpha": 16.0},
        "train": TRAIN})


def make_service(state: Path, **kw: Any) -> AggregatorService:
    return build_service(load_model("tiny"), make_run(**kw), state)


class Runner:
    """Runs `target()` in a daemon thread and keeps its exception."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        self.error: BaseException | None = None
        self.result: Any = None

        def _run() -> None:
            try:
                self.result = target()
            except BaseException as e:  # re-raised by join()
                self.error = e

        self.thread = threading.Thread(target=_run, name=name, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.thread.name} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def start_aggregator(svc: AggregatorService, mqtt: MqttConfig, linger_s: float = 2.0,
                     start_clients: int = 0) -> tuple[AggregatorNode, Runner]:
    node = AggregatorNode(svc, mqtt, wait_for_clients_s=60, linger_s=linger_s,
                          start_clients=start_clients)
    return node, Runner(node.run, "aggregator")


def make_agent(mqtt: MqttConfig, dev: str, data: Path, state: Path, cls: str = "pi4",
               **kw: Any) -> DeviceAgent:
    cfg = AgentConfig(device_id=dev, data=data, model="tiny", state_dir=state,
                      device_class=cls, ack_timeout_s=kw.pop("ack_timeout_s", 3.0), **kw)
    return DeviceAgent(cfg, mqtt)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge-rt-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")
    return d / "ca.crt", d / "server.crt", d / "server.key"
