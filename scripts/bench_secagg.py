"""What secure aggregation and client-level DP cost per round: bytes and time, against the
plain round (the same updates encoded and folded one by one) in the same run.

Updates are random factors of SmolLM2-135M's shapes (hidden 576, k/v 192; q and v of
the top `--depth` blocks; ranks drawn from {2, 4, 8} under r_max 8): the protocol's cost
does not depend on what was trained. For each N it runs the plain fold (encode, decode,
validate-free accumulate) and SecAgg+ in process with 30% of the devices dropping after
masking, and checks the decoded sum against the plain aggregate. DP (`fl.dp`: each
update's change clipped against its start, noise on the sum) sends the same bytes as
the plain round; its column is the aggregator's time for the same updates.

    python scripts/bench_secagg.py --devices 10,30,100 --strategy hetlora
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.adapter import LoRAWeights  # noqa: E402
from edge_runtime.config import StrategyConfig, StrategyName, lora_module_name  # noqa: E402
from edge_runtime.fl.common import truncate_to_plan  # noqa: E402
from edge_runtime.fl.dp import DPAccumulator, NoiseSource  # noqa: E402
from edge_runtime.fl.registry import make_strategy  # noqa: E402
from edge_runtime.fl.types import ClientPlan, ClientUpdate  # noqa: E402
from edge_runtime.fleet.codec import decode_adapter, encode_adapter  # noqa: E402
from edge_runtime.secagg.layout import layout_for  # noqa: E402
from edge_runtime.secagg.protocol import SecAggParams, run_in_process  # noqa: E402

SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}
N_LAYERS = 30


def modules(depth: int) -> dict[str, tuple[int, int]]:
    return {lora_module_name(i, t): s for i in range(N_LAYERS - depth, N_LAYERS)
            for t, s in SHAPES.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="10,30,100")
    p.add_argument("--strategy", default="hetlora",
                   choices=["fedavg", "hetlora", "legend", "flexlora"])
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--drop", type=float, default=0.3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    mods = modules(args.depth)
    glob = {n: LoRAWeights(torch.randn(8, di, generator=gen) * 0.02, torch.zeros(do, 8), 16.0)
            for n, (do, di) in mods.items()}
    strategy = make_strategy(StrategyConfig(StrategyName(args.strategy)))
    layout = layout_for(StrategyName(args.strategy), glob)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        ups = []
        for i in range(n):
            r = 8 if args.strategy == "fedavg" else rng.choice([2, 4, 8])
            ad = {m: LoRAWeights(torch.randn(r, di, generator=gen) * 0.02,
                                 torch.randn(do, r, generator=gen) * 0.02, 16.0)
                  for m, (do, di) in mods.items()}
            ups.append(ClientUpdate(f"d{i:04d}", ad, 10 + i % 7,
                                    ClientPlan(f"d{i:04d}", {m: r for m in mods}, 16.0)))
        t0 = time.perf_counter()
        acc = strategy.accumulator(glob, 0)
        plain_up = 0
        for u in ups:
            data = encode_adapter(u.adapter, {"n_samples": u.num_samples})
            plain_up += len(data)
            ad, _ = decode_adapter(data)
            acc.add(ClientUpdate(u.device_id, ad, u.num_samples, u.plan))
        want = acc.result()
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        vecs = {}
        for u in ups:
            one = strategy.accumulator(glob, 0)
            one.add(u)
            vecs[u.device_id] = layout.to_vector(one.partial())
        t_layout = time.perf_counter() - t0
        params = SecAggParams.choose(0, [u.device_id for u in ups], layout.size)
        drop = frozenset(sorted(vecs)[: int(args.drop * n)])
        t0 = time.perf_counter()
        total, survivors, wire, _ = run_in_process(params, vecs, drop_after_mask=drop)
        t_secagg = time.perf_counter() - t0
        starts = {u.device_id: truncate_to_plan(glob, u.plan) for u in ups if u.plan}
        t0 = time.perf_counter()
        dp = DPAccumulator(glob, "product" if args.strategy == "flexlora" else "factor",
                           1.0, 4.0, NoiseSource(None), starts.__getitem__,
                           lambda s=starts: list(s), lambda u: None)
        for u in ups:
            dp.add(u)
        dp.result()
        t_dp = time.perf_counter() - t0
        root = strategy.accumulator(glob, 0)
        root.merge(layout.from_vector(total, len(survivors)))
        got = root.result()
        err = max(float((got[m].delta() - want[m].delta()).norm() / want[m].delta().norm())
                  for m in mods)
        row = {"devices": n, "degree": params.degree, "threshold": params.threshold,
               "vector_len": layout.size, "plain_up_mb": plain_up / 1e6,
               "secagg_up_mb": wire["up"] / 1e6, "secagg_down_mb": wire["down"] / 1e6,
               "up_ratio": wire["up"] / plain_up, "plain_s": t_plain,
               "secagg_s_all_parties": t_secagg, "layout_s": t_layout, "dp_s": t_dp,
               "rel_err": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nstrategy {args.strategy}, depth {args.depth} (q, v), {int(args.drop * 100)}% drop "
          "after masking; SecAgg time is all parties in one process, one after another")
    print("| devices | degree k | t | vector | plain up MB | SecAgg up MB | down MB | up x | "
          "plain s | SecAgg s | DP s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['degree']} | {r['threshold']} | {r['vector_len']} | "
              f"{r['plain_up_mb']:.1f} | {r['secagg_up_mb']:.1f} | {r['secagg_down_mb']:.1f} | "
              f"{r['up_ratio']:.2f} | {r['plain_s']:.2f} | {r['secagg_s_all_parties']:.2f} | "
              f"{r['dp_s']:.2f} | {r['rel_err']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
