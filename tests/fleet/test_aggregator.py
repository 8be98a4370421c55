"""The aggregator service with in-memory updates (no MQTT): validation, merging, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_runtime.adapter import LoRAWeights
from edge_runtime.config import (
    FleetConfig,
    StrategyConfig,
    StrategyName,
    TrainConfig,
    lora_module_name,
)
from edge_runtime.fl.types import ClientPlan
from edge_runtime.fleet.codec import decode_adapter, encode_adapter
from edge_runtime.fleet.protocol import Register
from edge_runtime.fleet.transfer import make_manifest
from edge_runtime.planning import GlobalShape, Planner
from edge_runtime.rounds.server import AggregatorService

FP = "f" * 64
SHAPE = GlobalShape(n_layers=2, depth=2, r_max=8, targets=("q_proj", "v_proj"), alpha=16.0)
SHAPES = {lora_module_name(i, "q_proj"): (64, 64) for i in range(2)} | {
    lora_module_name(i, "v_proj"): (32, 64) for i in range(2)}


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make_service(tmp: Path, strategy: str = "fedavg", clock: Clock | None = None, *,
                 rounds: int = 2, min_clients: int = 1,
                 max_update_bytes: int = 1 << 20) -> AggregatorService:
    # the aggregation maths as such: claims trusted, no adaptive clipping (the defences
    # have their own tests, tests/rounds/test_defences.py)
    cfg = FleetConfig(rounds=rounds, min_clients=min_clients, round_timeout_s=30,
                      max_update_bytes=max_update_bytes, weight_cap="none", clip_multiple=0)
    st = StrategyConfig(StrategyName(strategy))
    return AggregatorService(cfg, st, TrainConfig(steps=2), Planner(SHAPE, st, steps=2,
                                                                    deadline_s=30.0),
                             SHAPES, FP, tmp / "state", clock=clock or Clock())


def register(svc: AggregatorService, devs: dict[str, str]) -> None:
    for d, cls in devs.items():
        assert svc.register(Register(d, FP, n_samples=10, device_class=cls)) is None


def trained(plan: ClientPlan, seed: int, scale: float = 0.1) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in plan.ranks.items():
        d_out, d_in = SHAPES[name]
        out[name] = LoRAWeights(torch.randn(r, d_in, generator=g) * scale,
                                torch.randn(d_out, r, generator=g) * scale, plan.alpha)
    return out


def send(svc: AggregatorService, dev: str, adapter: dict, *, rnd: int | None = None,
         fp: str = FP, n: int = 10, raw: bytes | None = None):
    rnd = svc.round if rnd is None else rnd
    data = raw if raw is not None else encode_adapter(
        adapter, {"fingerprint": fp, "n_samples": n, "round": rnd})
    m = make_manifest(data, kind="update", round=rnd, device_id=dev)
    return svc.accept_update(dev, m, data)


def test_fedavg_round_matches_manual_average(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    register(svc, {"a": "pi4", "b": "pi5", "c": "phone"})
    opened = svc.plan_round()
    assert set(opened.announcement.devices) == {"a", "b", "c"}
    assert len(opened.downloads) == 1  # fedavg: one plan, one download shared by all
    plans = {d: ClientPlan.from_json(p.plan) for d, p in opened.announcement.devices.items()}
    ups = {d: trained(plans[d], i) for i, d in enumerate("abc")}
    ns = {"a": 10, "b": 30, "c": 60}
    for d in "abc":
        assert send(svc, d, ups[d], n=ns[d]).accepted
    assert svc.ready_to_close()
    rec = svc.close_round()
    assert rec is not None and rec.participants == 3 and rec.stragglers == 0
    # independent reference: n-weighted mean of A and of B (same rank and alpha everywhere)
    for name in SHAPES:
        a = sum(ns[d] * ups[d][name].lora_a for d in "abc") / 100
        b = sum(ns[d] * ups[d][name].lora_b for d in "abc") / 100
        torch.testing.assert_close(svc.global_adapter[name].lora_a, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(svc.global_adapter[name].lora_b, b, rtol=1e-5, atol=1e-6)
    assert svc.round == 1


def test_bad_updates_rejected_with_reasons_round_completes(tmp_path: Path) -> None:
    svc = make_service(tmp_path, "hetlora", max_update_bytes=200_000)
    devs = {f"d{i}": "pi5" for i in range(10)} | {"good1": "pi4", "good2": "pi5"}
    register(svc, devs)
    opened = svc.plan_round()
    plans = {d: ClientPlan.from_json(p.plan) for d, p in opened.announcement.devices.items()}
    reasons = {}

    nan = trained(plans["d0"], 0)
    next(iter(nan.values())).lora_b[0, 0] = float("nan")
    reasons["d0"] = send(svc, "d0", nan).reason
    wrong = trained(plans["d1"], 1)
    k = next(iter(wrong))
    w = wrong[k]
    wrong[k] = LoRAWeights(torch.zeros(w.rank, 48), w.lora_b, w.alpha)
    reasons["d1"] = send(svc, "d1", wrong).reason
    big = ClientPlan("d2", {n: r + 1 for n, r in plans["d2"].ranks.items()}, 16.0)
    reasons["d2"] = send(svc, "d2", trained(big, 2)).reason
    reasons["d3"] = send(svc, "d3", trained(plans["d3"], 3), fp="0" * 64).reason
    reasons["d4"] = send(svc, "d4", {}, raw=b"\x00garbage" * 50).reason
    reasons["d5"] = send(svc, "d5", {}, raw=b"x" * 300_000).reason
    reasons["d6"] = send(svc, "d6", trained(plans["d6"], 6), rnd=svc.round + 5).reason
    reasons["d7"] = send(svc, "d7", trained(plans["d7"], 7, scale=1e4)).reason
    missing = trained(plans["d8"], 8)
    missing.pop(next(iter(missing)))
    reasons["d8"] = send(svc, "d8", missing).reason
    reasons["stranger"] = send(svc, "stranger", trained(plans["d9"], 9)).reason
    assert reasons == {"d0": "non_finite", "d1": "bad_shape", "d2": "rank_above_plan",
                       "d3": "bad_fingerprint", "d4": "garbage", "d5": "oversize",
                       "d6": "stale_round", "d7": "norm_bound", "d8": "bad_keys",
                       "stranger": "not_selected"}
    assert send(svc, "good1", trained(plans["good1"], 11)).accepted
    assert send(svc, "good2", trained(plans["good2"], 12)).accepted
    assert send(svc, "good2", trained(plans["good2"], 12)).reason == "duplicate"
    svc.clock.t += 31  # type: ignore[attr-defined]
    assert svc.ready_to_close()
    rec = svc.close_round()
    assert rec is not None and rec.participants == 2
    assert rec.stragglers == 10  # d0..d9 never delivered a valid update
    for r in ("non_finite", "bad_shape", "rank_above_plan", "bad_fingerprint", "garbage",
              "oversize", "stale_round", "norm_bound", "bad_keys", "not_selected", "duplicate"):
        assert svc.rejected[r] == 1, r
    assert svc.rejected["straggler_dropped"] == 10
    # a straggler that shows up after the close is "late"; a replay of round 0 later is stale
    assert send(svc, "d9", trained(plans["d9"], 9), rnd=0).reason == "late"
    assert send(svc, "stranger", trained(plans["d9"], 9), rnd=0).reason == "stale_round"


def test_kill_and_resume_merges_nothing_twice(tmp_path: Path) -> None:
    clock = Clock()
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    devs = {"a": "pi4", "b": "pi5", "c": "phone"}

    ref = make_service(ref_dir, "hetlora", clock)
    register(ref, devs)
    plans = {d: ClientPlan.from_json(p.plan)
             for d, p in ref.plan_round().announcement.devices.items()}
    ups = {d: trained(plans[d], i) for i, d in enumerate(devs)}
    for d in devs:
        assert send(ref, d, ups[d]).accepted
    ref.close_round()

    svc = make_service(crash_dir, "hetlora", clock)
    register(svc, devs)
    svc.plan_round()
    assert send(svc, "a", ups["a"]).accepted
    assert send(svc, "b", ups["b"]).accepted
    del svc  # "kill -9": nothing closed, nothing flushed beyond what was persisted
    svc2 = make_service(crash_dir, "hetlora", clock)
    assert svc2.open is not None and set(svc2.accepted) == {"a", "b"}
    assert send(svc2, "a", ups["a"]).reason == "duplicate"  # re-sent after the crash
    assert send(svc2, "c", ups["c"]).accepted
    assert svc2.close_round() is not None
    for name in SHAPES:
        torch.testing.assert_close(svc2.global_adapter[name].lora_b, ref.global_adapter[name].lora_b)
        torch.testing.assert_close(svc2.global_adapter[name].lora_a, ref.global_adapter[name].lora_a)
    # the committed global on disk is what a second resume loads
    svc3 = make_service(crash_dir, "hetlora", clock)
    assert svc3.round == 1 and svc3.open is None
    disk, _ = decode_adapter((crash_dir / "state" / "global_r1.safetensors").read_bytes())
    for name in SHAPES:
        assert torch.equal(disk[name].lora_b, svc3.global_adapter[name].lora_b)
    assert not (crash_dir / "state" / "journal" / "r0").exists()


def test_below_quorum_extends_then_merges(tmp_path: Path) -> None:
    clock = Clock()
    svc = make_service(tmp_path, "hetlora", clock, min_clients=2)
    register(svc, {"a": "pi4"})
    opened = svc.plan_round()
    plan = ClientPlan.from_json(opened.announcement.devices["a"].plan)
    assert send(svc, "a", trained(plan, 0)).accepted
    clock.t += 31
    assert svc.ready_to_close()
    assert svc.close_round() is None  # below quorum: extended, late joiner gets a plan
    register(svc, {"b": "pi5"})
    clock.t += 31
    assert svc.close_round() is None
    assert "b" in svc.current().announcement.devices
    plan_b = ClientPlan.from_json(svc.current().announcement.devices["b"].plan)
    assert send(svc, "b", trained(plan_b, 1)).accepted
    assert svc.ready_to_close()
    rec = svc.close_round()
    assert rec is not None and rec.participants == 2


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "sa-fedlora", "legend"])
def test_each_strategy_runs_two_rounds(tmp_path: Path, strategy: str) -> None:
    svc = make_service(tmp_path, strategy)
    register(svc, {"a": "pi4", "b": "pi5", "c": "phone"})
    for rnd in range(2):
        opened = svc.plan_round()
        for i, (d, p) in enumerate(opened.announcement.devices.items()):
            start, _ = decode_adapter(opened.downloads[p.global_transfer_id][1])
            plan = ClientPlan.from_json(p.plan)
            assert {n: w.rank for n, w in start.items()} == plan.ranks
            assert send(svc, d, trained(plan, 10 * rnd + i)).accepted
        rec = svc.close_round()
        assert rec is not None and rec.participants == 3 and rec.round == rnd + 1
    assert svc.finished
    m = svc.metrics_json({})
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in m["rounds"][1:])


def test_adaptive_clipping_streams_the_journal(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Clipping at the close holds one journaled update at a time, not the whole round
    (1,000 updates of 2 MB decoded at once were 4 GB; bench_fleet_load.py)."""
    import gc
    import weakref

    import edge_runtime.rounds.server as server_mod

    cfg = FleetConfig(rounds=1, round_timeout_s=30, weight_cap="none", clip_multiple=3.0)
    st = StrategyConfig(StrategyName.FEDAVG)
    svc = AggregatorService(cfg, st, TrainConfig(steps=2), Planner(SHAPE, st, steps=2),
                            SHAPES, FP, tmp_path / "state", clock=Clock())
    devs = [f"d{k}" for k in range(8)]
    register(svc, dict.fromkeys(devs, "pi5"))
    opened = svc.plan_round()
    for k, d in enumerate(devs):  # d7 changes the model 100x more than the others
        plan = ClientPlan.from_json(opened.announcement.devices[d].plan)
        assert send(svc, d, trained(plan, k, scale=1.0 if k == 7 else 0.1)).accepted
    alive: list[weakref.ref] = []
    most = [0]
    decode = server_mod.decode_adapter

    def counting_decode(data: bytes):  # type: ignore[no-untyped-def]
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        adapter, meta = decode(data)
        alive.append(weakref.ref(next(iter(adapter.values())).lora_b))
        return adapter, meta

    monkeypatch.setattr(server_mod, "decode_adapter", counting_decode)
    rec = svc.close_round()
    assert rec is not None and rec.participants == 8
    assert set(rec.clipped) == {"d7"} and rec.clipped["d7"]["norm"][2] < 1.0  # t < 1
    assert len(alive) >= 2 * 8  # a pass for the norms, a second to fold the clipped round
    assert most[0] <= 1, f"{most[0]} decoded updates held at once"
