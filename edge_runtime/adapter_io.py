"""Adapter files: PEFT's LoRA folder format on disk, safetensors bytes on the wire.

A folder holds `adapter_config.json` (PEFT `LoraConfig` fields) and
`adapter_model.safetensors` with PEFT's key names
`base_model.model.<module>.lora_A.weight` (rank x d_in) and `.lora_B.weight`
(d_out x rank). The base model's fingerprint goes into the safetensors `__metadata__`
(PEFT ignores it), so a folder made here loads in PEFT and a PEFT folder made elsewhere
loads here. Per-module ranks and alphas use PEFT's `rank_pattern`/`alpha_pattern`,
matched the way PEFT matches them (a key matches a module name when the name ends with
it after a dot, the key read as a regular expression; first key wins).

Scale: PEFT's non-rsLoRA scale is `lora_alpha / r`, ours is `alpha / rank`, the same.
An rsLoRA adapter (PEFT scale `alpha / sqrt(r)`) is loaded with alpha `alpha * sqrt(r)`,
which gives the same scale under our rule.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_runtime.adapter import Adapter, LoRAWeights, layer_index
from edge_runtime.errors import AdapterMismatchError, UserError

__all__ = ["AdapterMeta", "AdapterFormatError", "save_adapter", "load_adapter",
           "CONFIG_FILE", "WEIGHTS_FILE",
           "FINGERPRINT_KEY"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "edge_rt.base_fingerprint"
BASE_NAME_KEY = "edge_rt.base_name"
_ALPHAS_KEY = "edge_rt.alphas"  # wire format: JSON {module: alpha}
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterFormatError(UserError):
    """An adapter file is missing, corrupt, or uses a PEFT feature we do not support."""


@dataclass
class AdapterMeta:
    """What an adapter file says about itself.

    Attributes:
        fingerprint: base-model fingerprint, None for adapters made elsewhere.
        base_name: `base_model_name_or_path`.
        config: the full `adapter_config.json`.
        path: the folder it was read from.
    """

    fingerprint: str | None
    base_name: str | None
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))  # ties: the larger value


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _peft_config(adapter: Adapter, base_name: str) -> dict[str, Any]:
    names = sorted(adapter, key=lambda n: (layer_index(n), n))
    r = _most_common([adapter[n].rank for n in names])
    alpha = _most_common([adapter[n].alpha for n in names])
    targets = sorted({_short(n) for n in names})
    layers = sorted({layer_index(n) for n in names})
    # PEFT wraps every (target, layer) pair; if ours is not that product, name modules exactly.
    full_product = len(names) == len(targets) * len(layers)
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets if full_product else
        "|".join(re.escape(n) for n in names),
        "layers_to_transform": layers if full_product else None,
        "layers_pattern": "layers" if full_product else None,
        "rank_pattern": {n: adapter[n].rank for n in names if adapter[n].rank != r},
        "alpha_pattern": {n: adapter[n].alpha for n in names if adapter[n].alpha != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return cfg


def save_adapter(out_dir: str | Path, adapter: Adapter, *, fingerprint: str,
                 base_name: str) -> Path:
    """Write `adapter` as a PEFT LoRA folder; returns the folder."""
    if not adapter:
        raise AdapterFormatError("the adapter is empty: there is nothing to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in adapter.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = w.lora_a.detach().float().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = w.lora_b.detach().float().contiguous()
    meta = {"format": "pt", FINGERPRINT_KEY: fingerprint, BASE_NAME_KEY: base_name}
    save_file({k: v.clone() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata=meta)
    (out / CONFIG_FILE).write_text(json.dumps(_peft_config(adapter, base_name), indent=2))
    return out


def _pattern_value(patterns: dict[str, Any], name: str, default: Any, where: str) -> Any:
    """PEFT's rule: the first key k with re.match(rf"(.*\\.)?({k})$", name) wins."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise AdapterFormatError(f"{where}: pattern {key!r} is not a valid regex: {e}") from None
    return default


def _safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    if len(data) < 8:
        raise AdapterFormatError(f"{where} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFormatError(f"{where} has a corrupt safetensors header") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _check_supported(cfg: dict[str, Any], where: str) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = [
        ("use_dora", cfg.get("use_dora"), "DoRA"),
        ("fan_in_fan_out", cfg.get("fan_in_fan_out"), "Conv1D (fan_in_fan_out) layers"),
        ("modules_to_save", cfg.get("modules_to_save"), "extra trained modules"),
        ("bias", cfg.get("bias", "none") != "none", "trained biases"),
    ]
    for key, flag, what in unsupported:
        if flag:
            raise AdapterFormatError(
                f"{where}: {key}={cfg.get(key)!r} ({what}) is not supported; "
                "re-train the adapter as plain LoRA"
            )


def load_adapter(path: str | Path, *, expect_fingerprint: str | None = None
                 ) -> tuple[Adapter, AdapterMeta]:
    """Read a PEFT LoRA folder (made here or by PEFT).

    Raises:
        AdapterFormatError: missing/corrupt files or unsupported PEFT features.
        AdapterMismatchError: the file records another base model's fingerprint.
    """
    folder = Path(path)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist; pass the --out "
                                 "folder of `edge-rt train` or a PEFT adapter folder")
    if not weights_path.is_file():
        hint = (" (adapter_model.bin is a pickle and is never loaded; re-save it with "
                "safe_serialization=True)") if (folder / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{weights_path} is missing{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(f"{cfg_path} is missing; the adapter folder is incomplete") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path} must hold a JSON object")
    _check_supported(cfg, str(cfg_path))
    raw = weights_path.read_bytes()
    meta_kv = _safetensors_metadata(raw, str(weights_path))
    fingerprint = meta_kv.get(FINGERPRINT_KEY)
    if expect_fingerprint is not None and fingerprint is not None \
            and fingerprint != expect_fingerprint:
        raise AdapterMismatchError(
            f"adapter {folder} was trained on base model {fingerprint} "
            f"({meta_kv.get(BASE_NAME_KEY) or cfg.get('base_model_name_or_path')}), but the "
            f"loaded base model is {expect_fingerprint}; load the base it was trained on, "
            "or train a new adapter for this one"
        )
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as e:
        raise AdapterFormatError(f"{weights_path} is corrupt: {e}") from None
    adapter = _adapter_from_peft(tensors, cfg, str(weights_path))
    meta = AdapterMeta(fingerprint=fingerprint,
                       base_name=meta_kv.get(BASE_NAME_KEY) or cfg.get("base_model_name_or_path"),
                       config=cfg, path=str(folder))
    return adapter, meta


def _adapter_from_peft(tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                       where: str) -> Adapter:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterFormatError(f"{where}: tensor {key!r} is not a LoRA A/B weight; "
                                     "only plain LoRA adapters are supported")
        factors.setdefault(m.group(1), {})[m.group(2)] = t
    if not factors:
        raise AdapterFormatError(f"{where} holds no LoRA weights")
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    adapter: Adapter = {}
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{where}: module {name} lacks lora_{'AB'[('A' in ab)]}")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{where}: {name} has lora_A {tuple(a.shape)} and "
                                     f"lora_B {tuple(b.shape)}, which do not form a LoRA pair")
        rank = int(a.shape[0])
        want = int(_pattern_value(rank_pattern, name, r_default, where))
        if rank != want:
            raise AdapterFormatError(f"{where}: {name} has rank {rank} but the config says {want}")
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default, where))
        if rslora:  # PEFT scale alpha/sqrt(r) == (alpha*sqrt(r))/r
            alpha *= math.sqrt(rank)
        adapter[name] = LoRAWeights(a.contiguous(), b.contiguous(), alpha)
    return adapter
