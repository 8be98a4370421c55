"""FlexLoRA aggregation: factored / streaming against the dense + full-SVD reference.

Shapes of Qwen2.5-0.5B (24 blocks, hidden 896, MLP 4864, 14 heads / 2 KV heads of
64, LoRA on q,k,v,o,gate,up,down), client ranks drawn from {4, 8, 16, 32, 64}, random
factors. Two regimes: 10 clients a round (stacked rank R mostly below the hidden size)
and 100 clients (R far above it). Each (regime, path, module type) runs in a forked
child so its peak memory (VmHWM after a reset, minus the inputs) is its own.

The 24 blocks have identical shapes, so by default one block is measured and the round
figures are x24 (pass --blocks 24 for all of them).

    python scripts/bench_aggregate.py --clients 10 100 [--blocks 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one thread, as torch below; before scipy
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.adapter import LoRAWeights  # noqa: E402
from edge_runtime.config import FlexLoRAConfig  # noqa: E402
from edge_runtime.fl.flexlora import FlexLoRAAccumulator, best_rank_r  # noqa: E402
from edge_runtime.fl.types import ClientUpdate  # noqa: E402

HIDDEN, MLP, KV = 896, 4864, 128
TARGETS = {  # name -> (d_out, d_in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
RANKS = (4, 8, 16, 32, 64)
R_MAX = 64
ALPHA = 16.0


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(name: str, shape: tuple[int, int], n_clients: int, seed: int):
    d_out, d_in = shape
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ranks = [rng.choice(RANKS) for _ in range(n_clients)]
    glob = {name: LoRAWeights(torch.zeros(R_MAX, d_in), torch.zeros(d_out, R_MAX), ALPHA)}
    ups = []
    for k, r in enumerate(ranks):
        a = torch.randn(r, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen) / r**0.5
        ups.append(ClientUpdate(f"d{k}", {name: LoRAWeights(a, b, ALPHA)}, rng.randint(50, 500)))
    return glob, ups, ranks


def _run(mode: str, name: str, shape, n_clients: int, seed: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    glob, ups, ranks = _inputs(name, shape, n_clients, seed)
    base = _vm("VmRSS")
    _reset_peak()
    cfg = FlexLoRAConfig(mode=mode)
    acc = FlexLoRAAccumulator(glob, cfg)
    t0 = time.perf_counter()
    for u in ups:
        acc.add(u)
    t1 = time.perf_counter()
    out = acc.result()[name]
    t2 = time.perf_counter()
    peak = _vm("VmHWM") - base
    rep = acc.report[name]
    # (d_out, R_MAX) and (R_MAX, d_in) SVD-form factors of the aggregate
    save_file({"b": (out.lora_b.double() * out.scale).contiguous(),
               "a": out.lora_a.double().contiguous()}, str(out_dir / "factors.safetensors"))
    (out_dir / "meta.json").write_text(json.dumps(
        {"add_s": t1 - t0, "close_s": t2 - t1, "peak_mb": peak / 2**20, "path": rep.path,
         "stacked_rank": rep.stacked_rank, "power_iters": rep.power_iters, "ranks": ranks}))


def _child(mode, name, shape, n_clients, seed):
    """Run one measurement in a forked child; results come back as JSON + safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run(mode, name, shape, n_clients, seed, out_dir)
            except BaseException as e:  # report and leave the child without cleanup handlers
                print(f"child failed: {e!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"measurement {mode} {name} failed")
        res = json.loads((out_dir / "meta.json").read_text())
        res.update(load_file(str(out_dir / "factors.safetensors")))
        return res


def _dense_aggregate(name: str, shape, n_clients: int, seed: int) -> torch.Tensor:
    """dW = sum_k p_k s_k B_k A_k in float64 (the exact aggregate)."""
    _, ups, _ = _inputs(name, shape, n_clients, seed)
    tot = sum(u.num_samples for u in ups)
    d = torch.zeros(shape, dtype=torch.float64)
    for u in ups:
        w = u.adapter[name]
        d += (u.num_samples / tot) * w.scale * (w.lora_b.double() @ w.lora_a.double())
    return d


def _errors(fast: dict, full: dict, d: torch.Tensor, ranks) -> dict:
    """Fast vs the full-SVD reference, and each redistribution against Eckart-Young on dW."""
    pf = fast["b"] @ fast["a"]  # (d_out, d_in)
    pr = full["b"] @ full["a"]
    rel = float(torch.linalg.norm(pf - pr) / torch.linalg.norm(pr))
    s_true = torch.linalg.svdvals(d)  # exact spectrum of the aggregate
    s_fast = torch.linalg.svdvals(pf)[:R_MAX]
    top = float(((s_fast - s_true[:R_MAX]).abs() / s_true[:R_MAX]).max())
    out = {"rel_diff": rel, "top_sv_rel": top}
    for key, res in (("ey_excess", fast), ("ey_excess_full", full)):
        w = LoRAWeights(res["a"], res["b"] * (R_MAX / ALPHA), ALPHA)
        worst = 0.0
        for r in sorted(set(ranks)):
            loc = best_rank_r(w, r, ALPHA)  # what a client of rank r receives
            err = float(torch.linalg.norm(d - loc.delta()))
            opt = float((s_true[r:] ** 2).sum().sqrt())
            worst = max(worst, err / opt - 1.0)
        out[key] = worst
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for n in args.clients:
        for name, shape in TARGETS.items():
            for blk in range(args.blocks):
                full_name = f"model.layers.{blk}.{name}"
                seed = args.seed + 1000 * blk + n
                fast = _child("auto", full_name, shape, n, seed)
                full = _child("full", full_name, shape, n, seed)
                dense = _dense_aggregate(full_name, shape, n, seed)
                err = _errors(fast, full, dense, fast["ranks"])
                row = {"clients": n, "module": name, "block": blk, "shape": list(shape),
                       "path": fast["path"], "R": fast["stacked_rank"],
                       "power_iters": fast["power_iters"],
                       "fast_total_s": fast["add_s"] + fast["close_s"],
                       "fast_close_s": fast["close_s"],
                       "full_total_s": full["add_s"] + full["close_s"],
                       "full_close_s": full["close_s"],
                       "fast_peak_mb": fast["peak_mb"], "full_peak_mb": full["peak_mb"], **err}
                rows.append(row)
                print(f"{n:>4} {name:<17} {row['path']:<10} R={row['R']:<5} "
                      f"fast {row['fast_total_s']:.3f}s (close {row['fast_close_s']:.3f}s) "
                      f"full {row['full_total_s']:.3f}s  rel {err['rel_diff']:.1e} "
                      f"top-sv {err['top_sv_rel']:.1e} EY+ {err['ey_excess']:.1e} "
                      f"(full {err['ey_excess_full']:.1e})",
                      file=sys.stderr, flush=True)
    scale = 24 / args.blocks
    print(f"\nFlexLoRA round at Qwen2.5-0.5B shapes (x{scale:g} from {args.blocks} block(s), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread)\n")
    hdr = ("| clients | path (per module) | round time fast / full | speed-up | "
           "round close fast / full | close speed-up | peak MB fast / full (max module) | "
           "max rel diff | max top-sv rel err | max EY excess fast / full |")
    print(hdr)
    print("|" + "---|" * 10)
    for n in args.clients:
        rs = [r for r in rows if r["clients"] == n]
        ft = sum(r["fast_total_s"] for r in rs) * scale
        fu = sum(r["full_total_s"] for r in rs) * scale
        fc = sum(r["fast_close_s"] for r in rs) * scale
        uc = sum(r["full_close_s"] for r in rs) * scale
        paths = ", ".join(sorted({f"{r['module'].split('.')[-1]}:{r['path']}" for r in rs}))
        print(f"| {n} | {paths} | {ft:.1f} s / {fu:.1f} s | {fu / ft:.1f}x | "
              f"{fc:.1f} s / {uc:.1f} s | {uc / fc:.1f}x | "
              f"{max(r['fast_peak_mb'] for r in rs):.0f} / {max(r['full_peak_mb'] for r in rs):.0f} | "
              f"{max(r['rel_diff'] for r in rs):.1e} | {max(r['top_sv_rel'] for r in rs):.1e} | "
              f"{max(r['ey_excess'] for r in rs):.1e} / "
              f"{max(r['ey_excess_full'] for r in rs):.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
