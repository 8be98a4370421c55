"""ExecuTorch export of `tiny`: parity with eager, adapters swapped through lora.ptd.

One fp32 export (rank-8 LoRA slots on q/v of both blocks) is shared by the module; it
lowers in ~30-60 s on one core. The quantized exports (8da8w, 8da4w) are `slow` lowerings.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from torchao.quantization import IntxUnpackedToInt8Tensor

from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.config import GenerateConfig
from edge_runtime.errors import AdapterMismatchError, ConfigError
from edge_runtime.generate import generate
from exporters.config import ExportConfig, ExportFormat, ExportQuant
from exporters.executorch_export import (
    QuantizedEmbedding,
    load_kernels,
    quantize_for_xnnpack,
    read_ptd,
)
from exporters.export import export_model, read_manifest
from exporters.runners import ExecuTorchRunner, generate_from_export, token_logits
from tests.exporters.helpers import TOKENS, eager_logits, eager_with, random_adapter, runner_rows

QV = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")]
FP32_ATOL = 1e-3  # the bound; measured ~5e-7


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    return load_model("tiny")


@pytest.fixture(scope="module")
def adapter0(base: LoadedModel) -> dict:
    return random_adapter(base.model, {n: 4 for n in QV}, alpha=8.0, seed=1)


@pytest.fixture(scope="module")
def et_dir(tmp_path_factory: pytest.TempPathFactory, adapter0: dict) -> Path:
    out = tmp_path_factory.mktemp("et_fp32")
    loaded = load_model("tiny")
    export_model(loaded, ExportConfig(format=ExportFormat.EXECUTORCH, max_seq_len=64, max_rank=8), out,
                 adapter=copy.deepcopy(adapter0))
    return out


def test_export_folder_layout(et_dir: Path, base: LoadedModel) -> None:
    manifest = read_manifest(et_dir)
    assert manifest["format"] == "executorch" and manifest["max_rank"] == 8
    assert sorted(manifest["slots"]) == sorted(QV)
    assert manifest["base_fingerprint"] == base.fingerprint
    assert (et_dir / "model.pte").stat().st_size > 0
    data = read_ptd((et_dir / "lora.ptd").read_bytes())
    assert set(data) == {f"model.{n}.{s}" for n in QV for s in ("lora_a", "lora_b", "lora_scale")}
    assert data["model.model.layers.0.self_attn.q_proj.lora_a"].shape == (8, 64)
    # the base weights are in the program, not in the adapter file
    assert (et_dir / "lora.ptd").stat().st_size < 40_000


def test_fp32_logits_match_eager(et_dir: Path, base: LoadedModel, adapter0: dict) -> None:
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    plain = eager_logits(eager_with(base, None), TOKENS)
    assert (ref - plain).abs().max() > 0.05  # the adapter changes the logits
    got, pos = runner_rows(ExecuTorchRunner(et_dir), TOKENS, prefill=6)
    err = (got - ref[pos]).abs().max().item()
    assert err <= FP32_ATOL, err


def test_adapter_swapped_without_reexport(et_dir: Path, base: LoadedModel, adapter0: dict
                                          ) -> None:
    """Heterogeneous ranks (1..8), another alpha, one slot left empty: no new .pte."""
    pte_hash = hashlib.sha256((et_dir / "model.pte").read_bytes()).hexdigest()
    new = random_adapter(base.model, dict(zip(QV[:3], [1, 3, 8], strict=True)), alpha=16.0,
                         seed=7)
    runner = ExecuTorchRunner(et_dir, adapter=new)
    ref = eager_logits(eager_with(base, new), TOKENS)
    old = eager_logits(eager_with(base, adapter0), TOKENS)
    got, pos = runner_rows(runner, TOKENS, prefill=4)
    assert (got - ref[pos]).abs().max().item() <= FP32_ATOL
    assert (got - old[pos]).abs().max().item() > 0.05
    # no adapter at all: zero slots give the base model
    got0, pos0 = runner_rows(ExecuTorchRunner(et_dir, adapter={}), TOKENS, prefill=4)
    plain = eager_logits(eager_with(base, None), TOKENS)
    assert (got0 - plain[pos0]).abs().max().item() <= FP32_ATOL
    assert hashlib.sha256((et_dir / "model.pte").read_bytes()).hexdigest() == pte_hash


def test_adapter_above_slot_rank_is_refused(et_dir: Path, base: LoadedModel) -> None:
    big = random_adapter(base.model, {QV[0]: 9})
    with pytest.raises(AdapterMismatchError, match="--max-rank 9"):
        ExecuTorchRunner(et_dir, adapter=big)


def test_generate_matches_torch_backend(et_dir: Path, base: LoadedModel, adapter0: dict
                                        ) -> None:
    cfg = GenerateConfig(max_new_tokens=24, temperature=0.0)
    want = generate(eager_with(base, adapter0), base.tokenizer,  # type: ignore[arg-type]
                    "hello there", cfg).text
    got = generate_from_export(et_dir, "hello there", backend="executorch", cfg=cfg)
    assert got == want
    sampled = GenerateConfig(max_new_tokens=16, temperature=0.8, top_k=20, seed=3)
    want_s = generate(eager_with(base, adapter0), base.tokenizer,  # type: ignore[arg-type]
                      "hi", sampled).text
    assert generate_from_export(et_dir, "hi", backend="executorch", cfg=sampled) == want_s
    with pytest.raises(ConfigError, match="--max-seq-len 64"):
        generate_from_export(et_dir, "x" * 60, cfg=GenerateConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="--backend executorch"):
        generate_from_export(et_dir, "hi", backend="onnx", cfg=cfg)


@pytest.mark.slow
def test_8da8w_export_within_tolerance(tmp_path: Path, base: LoadedModel, adapter0: dict
                                       ) -> None:
    """int8 per-channel weights, int8 dynamic activations: logits and loss near fp32."""
    loaded = load_model("tiny")
    export_model(loaded, ExportConfig(format=ExportFormat.EXECUTORCH, quant=ExportQuant.DA8W8, max_seq_len=64,
                                      max_rank=4), tmp_path, adapter=copy.deepcopy(adapter0))
    runner = ExecuTorchRunner(tmp_path)
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    got = token_logits(runner, TOKENS)
    err = (got - ref).abs().max().item()
    spread = ref.abs().max().item()
    assert err <= 0.05 * spread, (err, spread)
    targets = torch.tensor(TOKENS[1:])
    loss_ref = torch.nn.functional.cross_entropy(ref[:-1], targets).item()
    loss_q = torch.nn.functional.cross_entropy(got[:-1], targets).item()
    assert abs(loss_q - loss_ref) <= 0.01 * loss_ref, (loss_q, loss_ref)


@pytest.mark.parametrize("quant", [ExportQuant.DA8W4, ExportQuant.DA8W8])
def test_every_linear_and_the_embedding_quantized(base: LoadedModel, quant: ExportQuant) -> None:
    """The LM head too (its own copy of the tied matrix); the embedding on the same grid.

    The reference for the embedding rows is torchao's dequantized head weight: the two
    come from one fp32 matrix on one grid, so the quantized gather must return exactly
    those rows (this checks the 4-bit packing against the kernel's reference).
    """
    load_kernels()
    model = copy.deepcopy(base.model).eval()
    table = model.model.embed_tokens.weight.detach().clone()
    summary = quantize_for_xnnpack(model, quant)
    assert summary["linears"] == 7 * model.config.n_layers + 1 and summary["embeddings"] == 1
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m.weight, IntxUnpackedToInt8Tensor) for m in linears)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.bits == (4 if quant is ExportQuant.DA8W4
                                                                 else 8)
    rows = emb(torch.arange(model.config.vocab_size))
    head = model.lm_head.weight.dequantize()  # type: ignore[operator]
    assert torch.equal(rows, head)
    step = table.abs().max().item() / (7 if emb.bits == 4 else 127)
    assert (rows - table).abs().max().item() <= step


def test_narrow_linear_falls_back_to_int8_per_channel() -> None:
    """A linear whose width 32 does not divide still gets quantized (int8 per channel)."""
    model = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.Linear(8 * 4, 8))
    summary = quantize_for_xnnpack(model, ExportQuant.DA8W4)
    assert summary["int8_fallback"] == ["0"]
    assert all(isinstance(m.weight, IntxUnpackedToInt8Tensor) for m in model)
    assert model[0].weight.qdata.abs().max().item() > 7  # int8, not int4


@pytest.mark.slow
def test_8da4w_export_within_tolerance(tmp_path: Path, base: LoadedModel, adapter0: dict
                                       ) -> None:
    """8da4w, quantized embedding, llama custom ops; two adapters through one program.

    References: the eager model through the same quantization pass (torchao's reference
    int8-activation/int4-weight arithmetic, eager KV cache and SDPA), which the program
    must match closely, and fp32 eager, whose loss it must stay near (on this random tiny
    model int4 itself moves the logits by ~15 % of their range, the loss by ~0.1 %).
    """
    loaded = load_model("tiny")
    manifest = export_model(loaded, ExportConfig(format=ExportFormat.EXECUTORCH,
                                                 quant=ExportQuant.DA8W4, max_seq_len=64,
                                                 max_rank=4), tmp_path,
                            adapter=copy.deepcopy(adapter0))
    ops = manifest["undelegated_ops"]
    for op in ("llama::custom_sdpa", "llama::update_cache", "embedding_4bit"):
        assert any(op in name for name in ops), (op, ops)
    for adapter in (adapter0, random_adapter(base.model, {QV[1]: 3}, alpha=4.0, seed=5)):
        got, pos = runner_rows(ExecuTorchRunner(tmp_path, adapter=adapter), TOKENS, prefill=5)
        fp32 = eager_logits(eager_with(base, adapter), TOKENS)[pos]
        quantized = eager_with(base, adapter)
        quantize_for_xnnpack(quantized, ExportQuant.DA8W4)
        ref = eager_logits(quantized, TOKENS)[pos]
        err = (got - ref).abs().max().item()
        spread = ref.abs().max().item()
        assert err <= 0.03 * spread, (err, spread)
        targets = torch.tensor(TOKENS[pos[0] + 1:])
        loss_ref = torch.nn.functional.cross_entropy(fp32[:-1], targets).item()
        loss_q = torch.nn.functional.cross_entropy(got[:-1], targets).item()
        assert abs(loss_q - loss_ref) <= 0.01 * loss_ref, (loss_q, loss_ref)
