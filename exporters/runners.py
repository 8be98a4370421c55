"""Runners for export folders: ExecuTorch (`executorch.runtime`) and ONNX Runtime.

Both expose `step(ids, start) -> logits (V,)`: feed tokens `ids` at positions
start..start+len-1 and get the last position's logits. Generation is the torch
backend's loop (`edge_runtime.generate`): same prompt formatting, same `sample_next`,
same stop rule, so `--backend` changes the engine and nothing else.

An adapter is applied without re-export: ExecuTorch gets a new `lora.ptd` with the
adapter's zero-padded factors (same names and shapes as the program's slots); ONNX
Runtime gets the factors as inputs at their own rank.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from edge_runtime.adapter import Adapter
from edge_runtime.config import GenerateConfig
from edge_runtime.data import format_prompt
from edge_runtime.errors import ConfigError
from edge_runtime.generate import decode_loop
from edge_runtime.tokenizer import Tokenizer
from exporters.export import ONNX_ADAPTER, ExportFolderError, read_manifest
from exporters.transforms import SlotShapes, slot_tensors

__all__ = ["Runner", "ExecuTorchRunner", "OnnxRunner", "open_runner", "generate_ids",
           "generate_from_export", "token_logits", "load_adapter_for_export"]


class Runner(Protocol):
    manifest: dict[str, Any]

    def step(self, ids: list[int], start: int) -> torch.Tensor: ...

    def reset(self) -> None: ...


def _slots(manifest: dict[str, Any]) -> SlotShapes:
    return {n: (int(s[0]), int(s[1])) for n, s in manifest["slots"].items()}


def _check_adapter(manifest: dict[str, Any], adapter: Adapter | None) -> None:
    if adapter and not manifest["slots"]:
        raise ConfigError(
            "this export has no LoRA slots, so it cannot take an adapter; re-export with "
            "--adapter DIR or --max-rank R"
        )


class ExecuTorchRunner:
    """A `.pte` program with its LoRA data file, run through `executorch.runtime`.

    The KV cache lives in the program's mutable buffers; stale positions beyond the
    current one are masked by `input_pos`, so a new sequence needs no reset.
    """

    def __init__(self, export_dir: str | Path, adapter: Adapter | None = None,
                 manifest: dict[str, Any] | None = None) -> None:
        from executorch.runtime import Runtime

        from exporters.executorch_export import load_kernels

        load_kernels()
        self.dir = Path(export_dir)
        self.manifest = manifest or read_manifest(self.dir)
        _check_adapter(self.manifest, adapter)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        data_path: Path | None = None
        if self.manifest["slots"]:
            data_path = self.dir / str(self.manifest["adapter_data"])
            if adapter is not None:
                from exporters.executorch_export import PTD_NAME, write_adapter_ptd

                self._tmp = tempfile.TemporaryDirectory(prefix="edge-rt-ptd-")
                data_path = Path(self._tmp.name) / PTD_NAME
                tensors = slot_tensors(adapter, _slots(self.manifest),
                                       int(self.manifest["max_rank"]))
                write_adapter_ptd(data_path, tensors)
            if not data_path.is_file():
                raise ExportFolderError(f"{data_path} is missing; re-run edge-rt export")
        pte = self.dir / str(self.manifest["program"])
        if not pte.is_file():
            raise ExportFolderError(f"{pte} is missing; re-run edge-rt export")
        self.program = Runtime.get().load_program(pte, data_path=data_path)
        self.method = self.program.load_method("forward")

    def step(self, ids: list[int], start: int) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long)  # (1, T)
        pos = torch.arange(start, start + len(ids), dtype=torch.long)  # (T,)
        out = self.method.execute([tokens, pos])[0]  # (1, V)
        return out[0]

    def reset(self) -> None:
        """Nothing to clear: positions overwrite the cache and the mask hides the rest."""


class OnnxRunner:
    """An ONNX step graph run by ONNX Runtime with its KV cache in preallocated buffers.

    Each block's past and present KV are bound (IOBinding) to one buffer of
    `max_seq_len` positions, allocated once: `GroupQueryAttention` writes the new
    positions in place and reads the first `seqlens_k + 1`, so a step copies no cache and
    a new sequence needs no clearing. The LoRA factors and the logits buffer are bound
    once too; a step binds only its token ids and positions.
    """

    def __init__(self, export_dir: str | Path, adapter: Adapter | None = None,
                 manifest: dict[str, Any] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        from exporters.onnx_export import KV_LAYOUT

        self.dir = Path(export_dir)
        self.manifest = manifest or read_manifest(self.dir)
        _check_adapter(self.manifest, adapter)
        path = self.dir / str(self.manifest["program"])
        if not path.is_file():
            raise ExportFolderError(f"{path} is missing; re-run edge-rt export")
        if self.manifest.get("kv_layout") != KV_LAYOUT:
            raise ExportFolderError(
                f"{self.dir} holds an ONNX graph of an older layout (KV cache "
                f"{self.manifest.get('kv_layout')!r}, this runner drives {KV_LAYOUT!r}); "
                "re-run edge-rt export"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        mc = self.manifest["model_config"]
        self.n_layers = int(mc["n_layers"])
        self.max_seq_len = int(self.manifest["max_seq_len"])
        head_dim = int(mc.get("head_dim") or mc["dim"] // mc["n_heads"])
        kv_shape = (1, int(mc["n_kv_heads"]), self.max_seq_len, head_dim)
        slots = _slots(self.manifest)
        if adapter is not None:
            tensors = slot_tensors(adapter, slots, None)
        elif slots:
            tensors = load_file(str(self.dir / ONNX_ADAPTER))
        else:
            tensors = {}
        self.io = self.session.io_binding()
        # numpy arrays whose memory the bound OrtValues use: kept alive with the runner
        self._kv = [np.zeros(kv_shape, np.float32) for _ in range(2 * self.n_layers)]
        self._logits = np.zeros((1, int(mc["vocab_size"])), np.float32)
        self._bound: list[Any] = []
        for i in range(self.n_layers):
            for j, kind in enumerate(("key", "value")):
                buf = ort.OrtValue.ortvalue_from_numpy(self._kv[2 * i + j])
                self.io.bind_ortvalue_input(f"past_{kind}_{i}", buf)
                self.io.bind_ortvalue_output(f"present_{kind}_{i}", buf)
                self._bound.append(buf)
        self._lora = {k: np.ascontiguousarray(v.numpy(), dtype=np.float32)
                      for k, v in tensors.items()}
        for name, arr in self._lora.items():
            self.io.bind_cpu_input(name, arr)
        logits = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self.io.bind_ortvalue_output("logits", logits)
        self._bound.append(logits)
        self.reset()

    def reset(self) -> None:
        """Start a new sequence (positions are overwritten; nothing to clear)."""
        self.n_past = 0

    def step(self, ids: list[int], start: int) -> torch.Tensor:
        if start != self.n_past:
            if start != 0:
                raise ValueError(f"ONNX runner holds {self.n_past} positions, asked for {start}")
            self.reset()
        total = start + len(ids)
        if total > self.max_seq_len:
            raise ConfigError(
                f"{total} positions exceed the export's --max-seq-len {self.max_seq_len}; "
                "shorten the prompt or re-export with a larger --max-seq-len"
            )
        self.io.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        self.io.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        self.io.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        self.session.run_with_iobinding(self.io)
        self.n_past = total
        return torch.from_numpy(self._logits[0].copy())


def open_runner(export_dir: str | Path, adapter: Adapter | None = None,
                backend: str | None = None, threads: int = 0) -> Runner:
    """The runner for an export folder; `backend` (if given) must match its format.
    `threads`: ONNX Runtime's intra-op threads (0: its default, one per core)."""
    manifest = read_manifest(export_dir)
    fmt = manifest["format"]
    if backend is not None and backend != fmt:
        raise ConfigError(
            f"{export_dir} holds a {fmt} export; pass --backend {fmt} (or export again "
            f"with --format {backend})"
        )
    if fmt == "executorch":
        return ExecuTorchRunner(export_dir, adapter, manifest)
    if fmt == "onnx":
        return OnnxRunner(export_dir, adapter, manifest, threads=threads)
    raise ExportFolderError(f"{export_dir}: unknown export format {fmt!r}; re-run edge-rt export")


@torch.no_grad()
def generate_ids(runner: Runner, prompt_ids: list[int], cfg: GenerateConfig,
                 stop_ids: set[int]) -> tuple[list[int], float, float]:
    """New token ids after `prompt_ids` (stop token excluded), prefill and decode seconds.

    The loop is `edge_runtime.generate.decode_loop`, with `runner.step` as the model.
    """
    limit = int(runner.manifest["max_seq_len"])
    if len(prompt_ids) + cfg.max_new_tokens > limit:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
            f"the export's --max-seq-len {limit}; shorten them or re-export with a larger one"
        )
    runner.reset()
    return decode_loop(runner.step, prompt_ids, cfg, stop_ids)


@torch.no_grad()
def token_logits(runner: Runner, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) at every position of `ids`, one decode step per token."""
    runner.reset()
    rows = [runner.step([t], i) for i, t in enumerate(ids)]
    return torch.stack(rows)


def load_adapter_for_export(adapter_dir: str | Path, manifest: dict[str, Any]) -> Adapter:
    """A PEFT adapter folder, refused if it was trained on another base model."""
    from edge_runtime.adapter_io import load_adapter

    adapter, _meta = load_adapter(adapter_dir, expect_fingerprint=manifest["base_fingerprint"])
    return adapter


def generate_from_export(export_dir: str | Path, prompt: str, *,
                         adapter: str | Path | Adapter | None = None,
                         backend: str | None = None, cfg: GenerateConfig | None = None,
                         max_new_tokens: int | None = None, temperature: float | None = None,
                         raw: bool | None = None) -> str:
    """Complete `prompt` with an export folder; the completion text (stdout contract)."""
    cfg = cfg or GenerateConfig()
    if max_new_tokens is not None:
        cfg.max_new_tokens = max_new_tokens
    if temperature is not None:
        cfg.temperature = temperature
    if raw is not None:
        cfg.raw = raw
    manifest = read_manifest(export_dir)
    if isinstance(adapter, (str, Path)):
        adapter = load_adapter_for_export(adapter, manifest)
    runner = open_runner(export_dir, adapter, backend)
    tok = Tokenizer.from_tokenizer_json(export_dir)
    text = format_prompt(tok, prompt, raw=cfg.raw)  # type: ignore[arg-type]
    prompt_ids = tok.encode(text)
    if not prompt_ids:
        prompt_ids = [min(tok.eos_ids)] if tok.eos_ids else [0]
    ids, _, _ = generate_ids(runner, prompt_ids, cfg, tok.eos_ids)
    return tok.decode(ids)
