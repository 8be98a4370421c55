"""Checkpoint tensors into a model: strict keys, one tensor at a time, optional quantization.

Loaders build the model with `empty_model` (parameters on the meta device: nothing
allocated, no random init) and hand `load_weights` a stream of (name, tensor) pairs.
Each tensor becomes its parameter; with a quantization mode, a linear layer is replaced
by its `QuantLinear` as soon as its weights are in, so the fp32 copy of the whole model
never exists and peak memory stays near the quantized size plus one tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from edge_runtime.config import QuantMode
from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM, ModelConfig
from edge_runtime.quant import QuantLinear

__all__ = ["load_weights", "expected_keys", "base_state_dict", "empty_model", "QUANT_SKIP",
           "TensorHook"]

TensorHook = Callable[[str, torch.Tensor], None]
QUANT_SKIP = ("lm_head",)  # as quantize_linears: the (tied) head stays in full precision


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every new nn.Parameter is moved to the meta device (global hook:
    do not build other modules on other threads meanwhile)."""

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None
                ) -> nn.Parameter | None:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    # torch types the hook as returning None, its docs allow returning a new parameter.
    handle = register_module_parameter_registration_hook(to_meta)  # type: ignore[arg-type]
    try:
        yield
    finally:
        handle.remove()


def empty_model(cfg: ModelConfig) -> CausalLM:
    """A `CausalLM` whose parameters are unallocated (meta); its buffers are real."""
    with _parameters_on_meta():
        return CausalLM(cfg)


def expected_keys(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys the model needs, with shapes (`lm_head.weight` only when untied)."""
    keys = {k: tuple(v.shape) for k, v in model.named_parameters(remove_duplicate=False)}
    if model.config.tie_embeddings:
        keys.pop("lm_head.weight", None)
    return keys


def _ready_to_quantize(module: nn.Module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters())


def load_weights(model: CausalLM,
                 state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                 where: str, quant: QuantMode = QuantMode.NONE,
                 on_tensor: TensorHook | None = None) -> None:
    """Make each checkpoint tensor its parameter (fp32, frozen); quantize linears if asked.

    `state` is a dict or a stream of (name, tensor) pairs. `on_tensor(name, fp32 tensor)`
    sees every tensor before quantization (the fingerprint is taken there).

    Raises:
        CheckpointError: an extra, duplicate, misshapen or missing key, named with `where`.
    """
    want = expected_keys(model)
    modules = dict(model.named_modules())
    seen: set[str] = set()
    items = state.items() if isinstance(state, Mapping) else state
    for name, t in items:
        if name not in want:
            raise CheckpointError(
                f"{where} has a weight this architecture does not use: {name!r}; "
                "it is not a supported Llama-family checkpoint"
            )
        if name in seen:
            raise CheckpointError(f"{where} holds {name} twice")
        if tuple(t.shape) != want[name]:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(t.shape)}, the config says {want[name]}"
            )
        t = t.detach().to(torch.float32).contiguous()
        if on_tensor is not None:
            on_tensor(name, t)
        mod_name, _, attr = name.rpartition(".")
        module = modules[mod_name]
        setattr(module, attr, nn.Parameter(t, requires_grad=False))
        seen.add(name)
        short = mod_name.rpartition(".")[2]
        if (quant is not QuantMode.NONE and isinstance(module, nn.Linear)
                and short not in QUANT_SKIP and _ready_to_quantize(module)):
            parent_name = mod_name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else model
            quantized = QuantLinear(module, quant)
            setattr(parent, short, quantized)
            modules[mod_name] = quantized  # drop the last reference to the fp32 weights
    missing = sorted(set(want) - seen)
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or of another architecture"
        )
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def base_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The frozen base weights under checkpoint names (LoRA factors left out, `.base`
    unwrapped, the tied head omitted). Refuses a quantized model: its fp32 weights are gone.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[-1] in ("lora_a", "lora_b"):
            continue
        if parts[-1] in ("qweight", "scale", "zero"):
            raise ValueError(f"{name} is quantized; write the model loaded with --quant none")
        out[".".join(p for p in parts if p != "base")] = t
    if model.config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
