"""Benchmark one LoRA training step on SmolLM2-135M against PEFT + transformers.

Each configuration runs in its own process so its peak RSS is its own. A step is one
forward + backward + AdamW update on a batch of 4 x 128 tokens, LoRA rank 8 on q,v.
Anchor: the same step in PEFT + transformers (LlamaForCausalLM, fp32) *at the same depth*
(`layers_to_transform` = the same top blocks; autograd then stops at the lowest trainable
block in PEFT too, so depth saves PEFT the same backward work), installed by this script
if missing (torch is left as it is). Every row's ratio is against PEFT at its own depth.

    python scripts/bench_train.py [--model smollm2-135m] [--steps 3] [--threads N]
        [--depths 0,8,4] [--quants none,int8,int4] [--rounds K]

"x anchor" for time is on CPU seconds. CPU seconds are not immune to other load (a busy
SMT sibling or noisy neighbour slows every instruction), so anchor and ours alternate
(`--rounds`) and only the same-run ratio is meaningful; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ, RANK = 4, 128, 8


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's own peak RSS (VmHWM; see `edge_runtime.memory.hwm_mb`)."""
    from edge_runtime.memory import hwm_mb

    hwm = hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_tokens(vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (BATCH, SEQ), generator=g)


def child_ours(model: str, quant: str, depth: int, steps: int, threads: int) -> dict:
    """Cold steps see a new batch each (the frozen prefix computed); warm steps revisit
    the first batch, whose frozen-prefix states the trainer's `PrefixCache` kept (what
    every epoch after the first over a device's local data costs)."""
    import torch

    from edge_runtime.checkpoints import load_model
    from edge_runtime.config import LoRAPlan, QuantMode
    from edge_runtime.lora import apply_lora
    from edge_runtime.losses import token_loss_sum
    from edge_runtime.prefix_cache import PrefixCache

    torch.set_num_threads(threads)
    loaded = load_model(model, QuantMode.parse(quant))
    m = loaded.model
    n_layers = m.config.n_layers
    depth = n_layers if depth == 0 else depth
    apply_lora(m, LoRAPlan(rank=RANK, depth=depth, targets=("q", "v"), alpha=16))
    cache = PrefixCache.of_mb(64) if m.frozen_prefix > 0 else None
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    base = rss_mb()

    def one_step(ids: torch.Tensor) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        prefix = (cache.states(m, ids.tolist(), ids) if cache is not None else None)
        s, n = token_loss_sum(m, ids, ids, prefix=prefix)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c

    one_step(batch_tokens(m.config.vocab_size, 0))  # warm-up; its batch is now cached
    cold = [one_step(batch_tokens(m.config.vocab_size, i + 1)) for i in range(steps)]
    warm = [one_step(batch_tokens(m.config.vocab_size, 0)) for _ in range(steps)]
    return {"impl": "edge-runtime", "quant": quant, "depth": depth,
            "step_s": statistics.median(t for t, _ in cold),
            "cpu_s": statistics.median(c for _, c in cold),
            "warm_cpu_s": statistics.median(c for _, c in warm) if cache else None,
            "peak_rss_mb": peak_mb(), "step_extra_mb": peak_mb() - base, "loaded_rss_mb": base}


def child_peft(hf_dir: str, steps: int, threads: int, depth: int = 0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    n = hf_model.config.num_hidden_layers
    layers = list(range(n - depth, n)) if 0 < depth < n else None
    m = get_peft_model(hf_model, LoraConfig(r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                     lora_dropout=0.0, layers_to_transform=layers))
    ids = batch_tokens(m.config.vocab_size)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    base = rss_mb()
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"impl": "peft+transformers", "quant": "none", "depth": len(layers) if layers else n,
            "step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_rss_mb": peak_mb(),
            "step_extra_mb": peak_mb() - base, "loaded_rss_mb": base}


def ensure_peft() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("installing transformers and peft (torch left as is)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "transformers", "peft"],
                       check=True)


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=False, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_row(results: list[dict]) -> dict:
    """One row from repeated runs: medians of the numbers, the run count."""
    row = dict(results[0])
    for key in ("step_s", "cpu_s", "warm_cpu_s", "peak_rss_mb", "step_extra_mb",
                "loaded_rss_mb"):
        vals = [r[key] for r in results if r.get(key) is not None]
        row[key] = statistics.median(vals) if vals else None
    row["runs"] = len(results)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="bench_train.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads per run (CPU seconds are robust to other load at 1)")
    ap.add_argument("--depths", default="0,8,4", help="LoRA depths (0 = every block)")
    ap.add_argument("--quants", default="none,int8,int4,int8+lowmem",
                    help="bases of our rows (+lowmem: with EDGE_RT_LOW_MEMORY=1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every configuration, anchor and ours alternating; medians")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = (child_peft(a.hf_dir, a.steps, a.threads, a.depth) if a.impl == "peft"
               else child_ours(a.model, a.quant, a.depth, a.steps, a.threads))
        print(json.dumps(res))
        return

    ensure_peft()
    from edge_runtime.checkpoints import load_model
    from edge_runtime.checkpoints.hf import save_hf_folder

    depths = [int(d) for d in a.depths.split(",")]
    quants = a.quants.split(",")
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(a.model)
        n_layers = loaded.model.config.n_layers
        save_hf_folder(loaded, Path(tmp))
        del loaded
        common = ["--steps", str(a.steps), "--threads", str(a.threads)]
        # Rounds alternate anchor and ours, so load from other jobs hits both alike.
        for _ in range(a.rounds):
            for depth in depths:
                d = n_layers if depth == 0 else depth
                r = run_child(["--impl", "peft", "--hf-dir", tmp, "--depth", str(d), *common])
                runs.setdefault(("peft", "none", d), []).append(r)
                for quant in quants:
                    # "int8+lowmem": the same with EDGE_RT_LOW_MEMORY=1 (edge_runtime/memory.py)
                    base, _, lowmem = quant.partition("+")
                    r = run_child(["--model", a.model, "--quant", base, "--depth", str(d),
                                   *common], env={"EDGE_RT_LOW_MEMORY": "1"} if lowmem else None)
                    r["quant"] = quant
                    runs.setdefault(("ours", quant, d), []).append(r)
    rows = [_median_row(v) for v in runs.values()]
    anchors = {r["depth"]: r for r in rows if r["impl"].startswith("peft")}
    print(f"one LoRA step, batch {BATCH} x {SEQ} tokens, rank {RANK} on q,v, "
          f"{a.threads} threads; anchor = PEFT + transformers fp32 at the same depth; "
          "cold = a batch seen for the first time, warm = a batch seen before (frozen "
          f"prefix from the cache); medians of {a.rounds} run(s) each")
    print("| impl | base | depth | CPU s/step cold | x PEFT | CPU s/step warm | x PEFT | "
          "peak RSS MB | x PEFT | step +MB |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        anc = anchors[r["depth"]]
        r["x_anchor_cpu"] = r["cpu_s"] / anc["cpu_s"]
        warm = r.get("warm_cpu_s")
        r["x_anchor_warm_cpu"] = warm / anc["cpu_s"] if warm else None
        r["x_anchor_peak"] = r["peak_rss_mb"] / anc["peak_rss_mb"]
        warm_cols = (f"{warm:.2f} | {r['x_anchor_warm_cpu']:.2f}" if warm else "- | -")
        print(f"| {r['impl']} | {r['quant']} | {r['depth']} | {r['cpu_s']:.2f} | "
              f"{r['x_anchor_cpu']:.2f} | {warm_cols} | {r['peak_rss_mb']:.0f} | "
              f"{r['x_anchor_peak']:.2f} | {r['step_extra_mb']:.0f} |")
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
