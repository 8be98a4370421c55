"""Bounded microbenchmarks on this device: the real block, head, optimizer and whole step.

Time: `time.perf_counter` wall time, after `warmup` untimed calls, median of `repeats`.

Peak memory, and how it is measured (recorded in every profile as `rss_method`):
- `vmhwm`: Linux's own high-water mark of resident memory (VmHWM in /proc/self/status),
  reset to the current RSS before each measurement by writing 5 to /proc/self/clear_refs
  (Linux >= 4.0). Exact at page granularity; nothing is missed between samples.
- `psutil-sampler`: where clear_refs cannot be written, a background thread samples
  `psutil.Process().memory_info().rss` every millisecond; allocations that live shorter
  than that can be missed.
Before each measurement the garbage collector runs and glibc's `malloc_trim(0)` hands
freed heap pages back to the kernel, so RSS tracks live memory rather than what an earlier
benchmark left in the allocator. Activation memory kept for the backward is also counted
exactly, tensor by tensor, with autograd's saved-tensor hooks.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from edge_runtime.config import LoRAPlan
from edge_runtime.data import IGNORE
from edge_runtime.lora import apply_lora, remove_lora
from edge_runtime.losses import head_loss_sum, token_loss_sum
from edge_runtime.memory import hwm_mb, release_free_memory
from edge_runtime.model import CausalLM
from edge_runtime.profiler.cost_model import MB

__all__ = [
    "PeakRSS",
    "rss_mb",
    "release_memory",
    "device_info",
    "gemm_gflops",
    "time_call",
    "Timing",
    "measure_block_forward",
    "measure_block_train",
    "measure_head",
    "measure_optimizer",
    "measure_step",
    "random_batch",
    "warm_runtime",
    "start_load_window",
    "load_peak_mb",
]

log = logging.getLogger(__name__)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc only; else a no-op)."""
    gc.collect()
    release_free_memory()


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: peak resident memory (MB) of this process inside the `with` block.

    Attributes after exit: `start_mb` (RSS on entry), `peak_mb`, `delta_mb`, `method`.
    """

    def __init__(self, interval_s: float = 0.001, release: bool = True) -> None:
        self.interval_s = interval_s
        self.release = release
        self.method = ""
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._sampled = max(self._sampled, proc.memory_info().rss / MB)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        if self.release:
            release_memory()
        self.start_mb = rss_mb()
        if _reset_hwm() and hwm_mb() is not None:
            self.method = "vmhwm"
        else:
            self.method = "psutil-sampler"
            self._sampled = self.start_mb
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        end = rss_mb()
        if self.method == "vmhwm":
            hwm = hwm_mb()
            self.peak_mb = max(hwm if hwm is not None else end, end)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self._sampled, end)


def start_load_window() -> None:
    """Start measuring the peak RSS of loading a model (resets VmHWM where possible)."""
    release_memory()
    _reset_hwm()


def load_peak_mb() -> float:
    """Peak RSS since `start_load_window` (VmHWM), else this process's lifetime peak."""
    hwm = hwm_mb()
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (MB if platform.system() == "Darwin" else 1024.0)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip().lower()
                if key in ("model name", "hardware", "processor name", "cpu model"):
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    """CPU model, cores, RAM and software versions of this device."""
    vm = psutil.virtual_memory()
    try:
        freq = psutil.cpu_freq()
        mhz = round(freq.max or freq.current) if freq else None
    except (OSError, NotImplementedError, AttributeError):
        mhz = None
    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_max_mhz": mhz,
        "torch_threads": torch.get_num_threads(),
        "total_ram_mb": round(vm.total / MB),
        "available_ram_mb": round(vm.available / MB),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


@dataclass
class Timing:
    """Wall times and process CPU times (all threads) of the timed calls."""

    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)

    def to_json(self) -> dict[str, Any]:
        return {"time_s": self.median_s, "times_s": self.times_s,
                "cpu_s": self.median_cpu_s, "cpu_times_s": self.cpu_s}


def time_call(fn: Callable[[], object], warmup: int, repeats: int,
              mem: PeakRSS | None = None) -> Timing:
    """Wall time of `fn`: `warmup` untimed calls, then `repeats` timed ones; the last timed
    call runs inside `mem` (a `PeakRSS`) when given, so memory costs no extra call."""
    for _ in range(warmup):
        fn()
    out = Timing()
    n = max(1, repeats)
    for i in range(n):
        with mem if mem is not None and i == n - 1 else contextlib.nullcontext():
            t, c = time.perf_counter(), time.process_time()
            fn()
            out.times_s.append(time.perf_counter() - t)
            out.cpu_s.append(time.process_time() - c)
    return out


def gemm_gflops(m: int = 256, k: int = 576, n: int = 1536, min_time_s: float = 0.3
                ) -> tuple[float, float]:
    """Sustained fp32 matmul speed at a model-like shape, all torch threads.

    Returns (GFLOP per wall second, GFLOP per process CPU second).
    """
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    torch.mm(a, b)
    calls, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        torch.mm(a, b)
        calls += 1
        dt = time.perf_counter() - t0
        if dt >= min_time_s:
            flop = 2.0 * m * k * n * calls
            return flop / dt / 1e9, flop / max(time.process_time() - c0, 1e-9) / 1e9


def warm_runtime() -> None:
    """Touch what a training step loads lazily (autograd engine, SDPA, AdamW and the
    modules it imports on its first step, about 70 MB of RSS with torch 2.13), so the
    baseline RSS taken after this already contains it, as a real training run does."""
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-4)
    x = torch.randn(1, 2, 4, 8)
    y = F.scaled_dot_product_attention(lin(x), x, x, is_causal=True)
    F.cross_entropy(y.reshape(-1, 8), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    release_memory()


def _rope(model: CausalLM, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    model._ensure_rope(seq_len)
    cos, sin = model.rope_cos, model.rope_sin
    assert isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
    return cos[:seq_len], sin[:seq_len]  # (T, head_dim) each


def measure_block_forward(model: CausalLM, batch: int, seq_len: int, warmup: int, repeats: int
                          ) -> dict[str, Any]:
    """A frozen block's forward (no autograd graph), as in the frozen prefix."""
    layer = model.model.layers[model.config.n_layers // 2]
    cos, sin = _rope(model, seq_len)
    x = torch.randn(batch, seq_len, model.config.dim)  # (B, T, dim)

    def run() -> None:
        with torch.no_grad():
            layer(x, cos, sin, None)

    mem = PeakRSS()
    timing = time_call(run, warmup, repeats, mem)
    return {"batch": batch, "seq_len": seq_len, **timing.to_json(),
            "transient_mb": mem.delta_mb}


class _SavedBytes:
    """Bytes autograd keeps for the backward, excluding the model's own weights and buffers."""

    def __init__(self, model: CausalLM) -> None:
        self.exclude = {t.untyped_storage().data_ptr()
                        for t in list(model.parameters()) + list(model.buffers())}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += st.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def measure_block_train(model: CausalLM, targets: tuple[str, ...], rank: int, batch: int,
                        seq_len: int, warmup: int, repeats: int, stack: int = 4
                        ) -> dict[str, Any]:
    """Forward + backward of one block carrying LoRA at `rank` on `targets`.

    The block's input requires a gradient (every trained block but the lowest passes one
    down). Activation memory is measured twice: `saved_mb`, the exact bytes autograd keeps
    for one block's backward; and `retained_mb`, the resident memory a forward through
    `stack` trained blocks keeps until the backward, per block. The second includes what
    the allocator does with those tensors (about 1.5x the first for SmolLM2-135M with
    glibc), so it is what the memory model is fitted on.
    """
    n = model.config.n_layers
    k = max(1, min(stack, n))
    wrapped = apply_lora(model, LoRAPlan(rank=rank, depth=k, targets=targets))
    try:
        layers = list(model.model.layers[n - k:])
        top = layers[-1]
        cos, sin = _rope(model, seq_len)
        x = torch.randn(batch, seq_len, model.config.dim, requires_grad=True)  # (B, T, dim)
        grad = torch.randn(batch, seq_len, model.config.dim)
        params = [p for m in wrapped.values() for p in (m.lora_a, m.lora_b)]

        def run() -> None:
            out = top(x, cos, sin, None)
            out.backward(grad)
            x.grad = None
            for p in params:
                p.grad = None

        mem = PeakRSS()
        timing = time_call(run, warmup, repeats, mem)
        saved = _SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = top(x, cos, sin, None)
        del out
        release_memory()
        before = rss_mb()
        h = x
        for layer in layers:
            h = layer(h, cos, sin, None)
        retained = max(0.0, rss_mb() - before) / k
        del h
    finally:
        remove_lora(model)
    width = rank * sum(m.d_in + m.d_out for m in wrapped.values()) // k
    return {"batch": batch, "seq_len": seq_len, "rank": rank, "rank_width": width,
            **timing.to_json(), "saved_mb": saved.total / MB, "retained_mb": retained,
            "stack": k, "peak_delta_mb": mem.delta_mb}


def measure_head(model: CausalLM, label_tokens: int, warmup: int, repeats: int
                 ) -> dict[str, Any]:
    """Final norm + LM head + cross-entropy, forward and input-gradient backward.

    The same maths as `losses.token_loss_sum` after the blocks: logits only at labelled
    positions, fp32, summed cross-entropy.
    """
    dim, vocab = model.config.dim, model.config.vocab_size
    h = torch.randn(1, label_tokens + 1, dim, requires_grad=True)  # (1, N+1, dim)
    target = torch.randint(0, vocab, (label_tokens,))

    def run() -> None:
        hidden = model.model.norm(h)[:, :-1].reshape(-1, dim)  # (N, dim)
        head_loss_sum(model.lm_head, hidden, target).backward()
        h.grad = None

    mem = PeakRSS()
    timing = time_call(run, warmup, repeats, mem)
    return {"label_tokens": label_tokens, **timing.to_json(),
            "peak_delta_mb": mem.delta_mb}


def measure_optimizer(shapes: list[tuple[int, int]], warmup: int, repeats: int
                      ) -> dict[str, Any]:
    """One AdamW step (as the trainer's) over LoRA factors of the given shapes."""
    params = [torch.nn.Parameter(torch.randn(*s) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    timing = time_call(opt.step, max(1, warmup), repeats)
    count = sum(p.numel() for p in params)
    return {"params": count, "tensors": len(params), **timing.to_json()}


def random_batch(vocab: int, batch: int, seq_len: int, label_fraction: float,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, T) and labels with the first (1 - label_fraction) of every row
    ignored, like a prompt followed by its response."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels = ids.clone()
    prompt = min(seq_len - 1, int(round((seq_len - 1) * (1.0 - label_fraction))))
    labels[:, : prompt + 1] = IGNORE
    labels[:, 0] = IGNORE
    return ids, labels


def measure_step(model: CausalLM, plan: LoRAPlan, batch: int, seq_len: int,
                 label_fraction: float, warmup: int, repeats: int) -> dict[str, Any]:
    """Whole training steps of a plan, as the trainer runs them: loss over the labelled
    tokens (`token_loss_sum`), backward, AdamW step, gradients set to None.

    Peak RSS covers the warm-up step, which allocates the AdamW moments.
    """
    apply_lora(model, plan)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids, labels = random_batch(model.config.vocab_size, batch, seq_len, label_fraction)

        def run() -> None:
            loss_sum, n = token_loss_sum(model, ids, labels)
            (loss_sum / max(n, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        with PeakRSS() as mem:
            timing = time_call(run, warmup, repeats)
        model.eval()
    finally:
        remove_lora(model)
    return {"plan": plan.to_json(), "batch": batch, "seq_len": seq_len,
            "label_fraction": label_fraction, **timing.to_json(), "peak_rss_mb": mem.peak_mb, "start_rss_mb": mem.start_mb,
            "rss_method": mem.method}
