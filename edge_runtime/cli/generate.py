"""`edge-rt generate`: complete a prompt; only the completion goes to stdout."""

from __future__ import annotations

import argparse
import logging
import sys

from edge_runtime.cli.common import (
    add_model_args,
    apply_adapter_dir,
    load_from_args,
    positive_int,
)
from edge_runtime.config import GenerateConfig

log = logging.getLogger("edge_runtime.generate")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion (stdout: the completion only)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder to apply")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="feed the prompt as-is (no chat template)")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "torch", "executorch", "onnx", "llama.cpp"],
                   help="auto (default: an export folder's own runtime; a GGUF or pulled "
                   "name on llama.cpp when llama-cpp-python is installed, else torch), torch "
                   "(MODEL is a checkpoint), executorch|onnx (MODEL is an export folder made "
                   "by `edge-rt export`), or llama.cpp (MODEL is a GGUF or a pulled name; "
                   "needs llama-cpp-python; --adapter goes in as a LoRA GGUF)")
    p.set_defaults(func=run)


def pick_backend(model: str) -> tuple[str, str]:
    """(backend, why) for `--backend auto`: an export folder runs on its own runtime; a
    GGUF (or a pulled name) on llama.cpp when it is installed (its decode is the fastest
    measured here, docs in README "Runtime"); anything else on torch eager."""
    import importlib.util
    import json
    from pathlib import Path

    from edge_runtime.checkpoints import pull

    path = Path(model).expanduser()
    meta = path / "export.json"
    if path.is_dir() and meta.is_file():
        try:
            fmt = str(json.loads(meta.read_text()).get("format", ""))
        except (OSError, ValueError):
            fmt = ""
        if fmt in ("onnx", "executorch"):
            return fmt, f"{path} is an {fmt} export"
    gguf = model in pull.KNOWN_MODELS
    if not gguf and path.is_file():
        with path.open("rb") as f:
            gguf = f.read(4) == b"GGUF"
    if gguf and importlib.util.find_spec("llama_cpp") is not None:
        return "llama.cpp", "a GGUF with llama-cpp-python installed"
    hint = ("" if model == "tiny" else
            "; faster: pip install llama-cpp-python, or `edge-rt export "
            f"{model} --format onnx --quant int4 --out DIR` and `edge-rt generate DIR`")
    return "torch", f"torch eager{hint}"


def run(args: argparse.Namespace) -> int:
    if args.backend == "auto":
        args.backend, why = pick_backend(args.model)
        log.info("backend %s (%s)", args.backend, why)
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed, raw=args.raw)
    if args.backend == "llama.cpp":
        from exporters.llama_cpp_runner import generate_llama_cpp

        sys.stdout.write(generate_llama_cpp(args.model, args.prompt, cfg,
                                            adapter=args.adapter) + "\n")
        return 0
    if args.backend != "torch":
        from exporters.runners import generate_from_export

        text = generate_from_export(args.model, args.prompt, adapter=args.adapter,
                                    backend=args.backend, cfg=cfg)
        sys.stdout.write(text + "\n")
        return 0
    from edge_runtime.generate import generate

    loaded = load_from_args(args)
    if args.adapter:
        apply_adapter_dir(loaded, args.adapter)
    result = generate(loaded.model, loaded.tokenizer, args.prompt, cfg)
    log.info("prompt %d tokens, prefill %.3fs, %d new tokens at %.1f tok/s",
             result.prompt_tokens, result.prefill_s, len(result.token_ids),
             result.decode_tokens_per_s)
    sys.stdout.write(result.text + "\n")
    return 0
