"""One-command fleet demo: broker, aggregator and N agent processes of different classes.

`run_demo` gives each device its own split of real data (default: the sentiment
domains, imdb, yelp and amazon reviews, one domain per device; `data.path` names another
dataset or a folder from `edge-rt data pull`), starts a broker (below), runs the
aggregator in this process and N `edge-rt agent`
subprocesses, prints one progress line per round and the base and final global model's
held-out loss and accuracy on stderr, and writes:

The broker: `--broker URL` if given; else Mosquitto when it is installed, started as a
child with the production setup (`fleet/mosquitto.py`: a password per device and for the
aggregator, the per-device ACL, loopback, a free port); else the embedded broker. The
demo says which.

    OUT/metrics.json    the one metrics schema (README, "Metrics"); `fleet.wire` has the
                        MQTT bytes (topic + payload) the aggregator's client received from
                        devices and published, per round (counted on the client: the same
                        whatever the broker)
    OUT/adapter/        the final global adapter (PEFT folder)
    OUT/logs/*.log      each agent's log;  OUT/state/  the aggregator's state;
    OUT/data/           each device's training rows
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_runtime.checkpoints import load_model
from edge_runtime.config import RunConfig
from edge_runtime.data import Example, example_to_json
from edge_runtime.errors import UserError
from edge_runtime.fleet.agent import save_final
from edge_runtime.fleet.broker import EmbeddedBroker
from edge_runtime.fleet.mosquitto import AGGREGATOR_USER, LocalMosquitto, find_mosquitto
from edge_runtime.fleet.server import AggregatorNode
from edge_runtime.rounds.build import build_service, make_evaluator
from edge_runtime.rounds.server import RoundRecord
from edge_runtime.transport.mqtt_sites import SiteTopology

__all__ = ["run_demo", "demo_data", "DEVICE_CLASSES"]

log = logging.getLogger(__name__)

# declared classes in profiles/ (RAM budget and speed give each its rank and depth)
DEVICE_CLASSES = ("rpi5-8gb", "rpi4-2gb", "android-mid-6gb")

def demo_data(run: RunConfig, out: Path) -> tuple[list[Path], list[Example]]:
    """Each device's training rows as its own JSONL file, and the held-out rows.

    The data is `run.data.path` (a folder from `edge-rt data pull`, or a dataset name:
    the demo's default is the sentiment domains, imdb, yelp and amazon, one per device);
    held out: `run.data.eval_max` rows drawn from its test split with the run's seed.
    """
    from edge_runtime.simulation import load_client_data

    if run.data.path is None:
        raise UserError("the demo needs data: pass --data NAME|DIR or set data.path")
    train, test = load_client_data(run.data.path, run.sim.clients,
                                   partition=run.data.partition,
                                   alpha=run.data.dirichlet_alpha, seed=run.seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, rows in enumerate(train):
        path = out / f"client{k}.jsonl"
        path.write_text("".join(json.dumps(example_to_json(e)) + "\n" for e in rows))
        files.append(path)
    n = min(len(test), run.data.eval_max)
    return files, random.Random(run.seed).sample(test, n)


def _acc(acc: float | None) -> str:
    return "" if acc is None else f", accuracy {acc:.3f}"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(run: RunConfig, out: Path, broker_url: str | None = None,
             join_timeout_s: float = 180.0, http_port: int | None = 0,
             http_linger_s: float = 0.0) -> dict[str, Any]:
    """Run the whole demo (`run.sim.clients` agent processes); returns OUT/metrics.json."""
    out = Path(out)
    if (out / "state" / "state.json").exists():
        raise UserError(f"{out} holds a previous demo run; pass another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    files, eval_rows = demo_data(run, out / "data")
    device_ids = [f"dev{k}" for k in range(len(files))]
    broker: EmbeddedBroker | LocalMosquitto | SiteTopology | None = None
    passwords: dict[str, str] = {}
    agents: dict[str, tuple[str, str | None]] = {}  # device -> (its broker, its password)
    if run.sim.sites:
        topo = SiteTopology(device_ids, run.sim.sites, run.fleet, None, run.mqtt)
        broker = topo.start()
        root = topo.root_mqtt()
        url, passwords = root.url, {AGGREGATOR_USER: root.password or ""}
        for dev in device_ids:
            dm = topo.device_mqtt(dev)
            agents[dev] = (dm.url, dm.password)
        _say(f"{run.sim.sites} sites: a Mosquitto each with a site aggregator, bridged over "
             f"TLS to the root Mosquitto on {url} (deploy/mosquitto/site.conf); devices "
             f"dealt to sites {topo.home}")
    elif broker_url is not None:
        url = broker_url
        _say(f"MQTT broker {url} (given)")
    elif find_mosquitto() is not None:
        mosq = LocalMosquitto(device_ids, prefix=run.mqtt.prefix)
        broker = mosq.start()
        url, passwords = mosq.url, mosq.passwords
        _say(f"{mosq.version()} on {url}: a password per device and the per-device ACL "
             "(deploy/mosquitto/aclfile)")
    else:
        broker = EmbeddedBroker().start()
        url = f"mqtt://127.0.0.1:{broker.port}"
        _say(f"embedded MQTT broker on {url} (no mosquitto found, or EDGE_RT_MOSQUITTO=none; "
             "apt-get install mosquitto for the production setup; no passwords, no ACL)")
    for dev in device_ids:
        agents.setdefault(dev, (url, passwords.get(dev)))
    try:
        return _run_fleet(run, out, url, passwords, agents, files, eval_rows,
                          join_timeout_s, t_start, http_port, http_linger_s)
    finally:
        if broker is not None:
            broker.stop()


def _run_fleet(run: RunConfig, out: Path, url: str, passwords: dict[str, str],
               agents: dict[str, tuple[str, str | None]], files: list[Path],
               eval_rows: list[Example],
               join_timeout_s: float, t_start: float, http_port: int | None,
               http_linger_s: float) -> dict[str, Any]:
    n_clients = run.sim.clients
    mq = replace(run.mqtt, url=url)
    if passwords:
        mq = replace(mq, username=AGGREGATOR_USER, password=passwords[AGGREGATOR_USER])
    loaded = load_model(run.model.name, run.model.quant)
    evaluator = make_evaluator(loaded, eval_rows, run.train.seq_len)
    svc = build_service(loaded, run, out / "state", evaluator=evaluator)
    base = svc.metrics[0]
    base_loss = base.eval_loss
    _say(f"model {loaded.name}, data {run.data.path}: the base model's held-out loss "
         f"{base_loss:.4f}{_acc(base.eval_accuracy)} on {len(eval_rows)} rows; strategy "
         f"{run.strategy.name.value}, {n_clients} clients, {run.fleet.rounds} rounds")

    wire: list[tuple[int, int]] = []  # the aggregator client's byte counters per round
    last = [(0, 0)]

    def on_round(rec: RoundRecord) -> None:
        up_in, down_out = node.link.bytes_received, node.link.bytes_sent
        wire.append((up_in - last[0][0], down_out - last[0][1]))
        last[0] = (up_in, down_out)
        _say(f"round {rec.round}/{run.fleet.rounds}: {rec.participants}/{n_clients} updates "
             f"merged, eval_loss {rec.eval_loss:.4f}{_acc(rec.eval_accuracy)} (base "
             f"{base_loss:.4f}), up "
             f"{rec.bytes_up / 1e3:.1f} kB, down {rec.bytes_down / 1e3:.1f} kB, "
             f"{rec.time_s:.1f} s" + (f", rejected {rec.rejected}" if rec.rejected else ""))

    node = AggregatorNode(svc, mq, on_round=on_round, wait_for_clients_s=join_timeout_s,
                          linger_s=3.0, start_clients=n_clients, sites=bool(run.sim.sites))
    web = None
    if http_port is not None:
        from edge_runtime.observe.http import ObserveServer

        web = ObserveServer(svc, "127.0.0.1", http_port)
        _say(f"fleet status page {web.url} (JSON {web.url}status.json, Prometheus "
             f"{web.url}metrics)")
    try:
        metrics = _serve_fleet(run, out, mq, agents, files, svc, node, loaded, base, wire,
                               last, t_start)
        if web is not None and http_linger_s > 0:  # not after a failure or Ctrl-C
            _say(f"status page stays up {http_linger_s:.0f} s more: {web.url}")
            time.sleep(http_linger_s)
        return metrics
    finally:
        if web is not None:
            web.stop()


def _serve_fleet(run: RunConfig, out: Path, mq: Any, agents: dict[str, tuple[str, str | None]],
                 files: list[Path], svc: Any, node: AggregatorNode,
                 loaded: Any, base: RoundRecord, wire: list[tuple[int, int]],
                 last: list[tuple[int, int]], t_start: float) -> dict[str, Any]:
    base_loss = base.eval_loss
    join_timeout_s = node.wait_for_clients_s
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    final_down = [0]
    # N trainers share this machine's cores: one thread each avoids oversubscription
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        for k, (data, (dev, (url, password))) in enumerate(zip(files, agents.items(),
                                                                 strict=True)):
            cls = DEVICE_CLASSES[k % len(DEVICE_CLASSES)]
            cmd = [sys.executable, "-m", "edge_runtime", "agent", "--broker", url,
                   "--device-id", dev, "--device-class", cls, "--data", str(data),
                   "--model", run.model.name, "--quant", run.model.quant.value,
                   "--state", str(out / "agents" / f"dev{k}"),
                   "--compression", run.fleet.compression.value, "--fleet", mq.fleet,
                   "--prefix", mq.prefix]
            agent_env = env
            if password is not None:  # its own user; the password in the environment
                cmd += ["--username", dev]
                agent_env = {**env, "EDGE_RT_MQTT_PASSWORD": password}
            elif mq.username:
                cmd += ["--username", mq.username]
                agent_env = {**env, "EDGE_RT_MQTT_PASSWORD": mq.password or ""}
            with open(logs / f"{dev}.log", "wb") as lf:
                procs.append(subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                              env=agent_env))
            _say(f"started agent {dev} ({cls}), log {logs / f'{dev}.log'}")
        result: list[BaseException] = []

        def _serve() -> None:
            try:
                node.run()
            except BaseException as e:  # surfaced below
                result.append(e)

        th = threading.Thread(target=_serve, name="aggregator", daemon=True)
        th.start()
        limit = join_timeout_s + run.fleet.rounds * (run.fleet.round_timeout_s * 4 + 30)
        end = time.monotonic() + limit
        shown = False
        while th.is_alive() and time.monotonic() < end:
            th.join(0.5)
            opened = svc.open
            if not shown and opened is not None:  # what each device class was given
                shown = True
                for dev, pj in sorted(opened.plans.items()):
                    ranks = pj["ranks"]
                    depth = len({n.split(".")[2] for n in ranks})
                    _say(f"{dev} ({pj.get('device_class') or '?'}): LoRA rank "
                         f"{max(ranks.values())} on the top {depth} blocks, "
                         f"{len(ranks)} modules")
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if dead and svc.round < run.fleet.rounds:
                node.stop()
                raise UserError(f"agent exited with code {dead[0].returncode}; see {logs}")
        if th.is_alive():
            node.stop()
            raise UserError(f"demo did not finish within {limit:.0f} s; see {logs}")
        if result:
            raise result[0]
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    finally:
        final_down[0] = node.link.bytes_sent
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)

    config = run.to_json()
    config["strategy"] = svc.strategy_cfg.to_json()
    metrics = svc.metrics_json(config)
    # MQTT bytes (topic + payload) the aggregator's client received and published
    metrics["fleet"]["wire"] = [{"round": i + 1, "up": up, "down": down}
                                for i, (up, down) in enumerate(wire)]
    metrics["fleet"]["final_download_wire"] = final_down[0] - last[0][1]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_final(out / "adapter", svc.global_adapter, loaded.fingerprint, loaded.name)
    codes = [p.returncode for p in procs]
    final = svc.metrics[-1]
    _say(f"held-out, base model -> final global model: loss {base_loss:.4f} -> "
         f"{final.eval_loss:.4f}" + (f", accuracy {base.eval_accuracy:.3f} -> "
                                     f"{final.eval_accuracy:.3f}"
                                     if final.eval_accuracy is not None
                                     and base.eval_accuracy is not None else ""))
    _say(f"done in {time.monotonic() - t_start:.1f} s: metrics {out / 'metrics.json'}, "
         f"adapter {out / 'adapter'}; agents exited {codes}")
    if any(c != 0 for c in codes):
        raise UserError(f"some agents failed (exit codes {codes}); see {logs}")
    return metrics
