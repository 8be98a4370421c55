"""Put a name -> tensor dict into a model with every key accounted for (no strict=False)."""

from __future__ import annotations

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


def load_weights(model: CausalLM, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy `state` into `model` (fp32). Missing, extra or misshapen keys are errors.

    Raises:
        CheckpointError: naming the first offending keys and `where` they came from.
    """
    want = expected_keys(model)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or of another architecture"
        )
    if extra:
        raise CheckpointError(
            f"{where} has {len(extra)} weights this architecture does not use, e.g. "
            f"{extra[:3]}; it is not a supported Llama-family checkpoint"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, shape in want.items():
            t = state[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(t.shape)}, the config says {shape}"
                )
            params[name].copy_(t.to(torch.float32))


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
