"""Put a name -> tensor dict into a model with every key accounted for (no strict=False)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from edge_runtime.errors import CheckpointError
from edge_runtime.model import CausalLM

__all__ = ["load_weights", "expected_keys", "base_state_dict"]


def expected_keys(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys the model needs, with shapes (`lm_head.weight` only when untied)."""
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        keys.pop("lm_head.weight", None)
    return keys


def load_weights(model: CausalLM,
                 state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                 where: str) -> None:
    """Copy checkpoint tensors into `model` (fp32), one at a time.

    `state` may be a dict or a stream of (name, tensor) pairs, so a loader can hand over
    each tensor as it is read and peak memory stays near the model's own size.

    Raises:
        CheckpointError: an extra, duplicate, misshapen or missing key, named with `where`.
    """
    want = expected_keys(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    items = state.items() if isinstance(state, Mapping) else state
    with torch.no_grad():
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
            params[name].copy_(t.to(torch.float32))
            seen.add(name)
    missing = sorted(set(want) - seen)
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or of another architecture"
        )


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
