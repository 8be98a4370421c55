"""ONNX export of `tiny`: parity with eager, adapters of any rank on one graph, int4/int8."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import onnx
import pytest
import torch

from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.config import GenerateConfig
from edge_runtime.errors import ConfigError
from edge_runtime.generate import generate
from exporters.config import ExportConfig, ExportFormat, ExportQuant
from exporters.export import export_model, read_manifest
from exporters.runners import OnnxRunner, generate_from_export, token_logits
from tests.exporters.helpers import TOKENS, eager_logits, eager_with, random_adapter, runner_rows

QV = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")]
FP32_ATOL = 1e-3  # the bound; measured ~2e-7


@pytest.fixture(scope="module")
def base() -> LoadedModel:
    return load_model("tiny")


@pytest.fixture(scope="module")
def adapter0(base: LoadedModel) -> dict:
    return random_adapter(base.model, {n: 4 for n in QV}, alpha=8.0, seed=1)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory, adapter0: dict) -> Path:
    out = tmp_path_factory.mktemp("onnx_fp32")
    export_model(load_model("tiny"), ExportConfig(format=ExportFormat.ONNX, max_seq_len=64),
                 out, adapter=copy.deepcopy(adapter0))
    return out


def test_graph_has_symbolic_rank_and_kv_inputs(onnx_dir: Path) -> None:
    manifest = read_manifest(onnx_dir)
    assert manifest["format"] == "onnx" and sorted(manifest["slots"]) == sorted(QV)
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    a_rank = shapes[f"{QV[0]}.lora_a"][0]
    assert isinstance(a_rank, str) and a_rank == shapes[f"{QV[0]}.lora_b"][1]
    assert shapes["past_key_0"][2] == "past" and shapes["input_ids"][1] == "seq"


def test_fp32_logits_match_eager(onnx_dir: Path, base: LoadedModel, adapter0: dict) -> None:
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    assert (ref - eager_logits(eager_with(base, None), TOKENS)).abs().max() > 0.05
    got, pos = runner_rows(OnnxRunner(onnx_dir), TOKENS, prefill=6)
    assert (got - ref[pos]).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("ranks", [[1, 1, 1, 1], [3, 16, 2, 7], [32, 5, 9, 1]])
def test_any_rank_runs_on_one_graph(onnx_dir: Path, base: LoadedModel,
                                    ranks: list[int]) -> None:
    graph_hash = hashlib.sha256((onnx_dir / "model.onnx").read_bytes()).hexdigest()
    adapter = random_adapter(base.model, dict(zip(QV, ranks, strict=True)), alpha=16.0,
                             seed=sum(ranks))
    ref = eager_logits(eager_with(base, adapter), TOKENS)
    got, pos = runner_rows(OnnxRunner(onnx_dir, adapter=adapter), TOKENS, prefill=3)
    assert (got - ref[pos]).abs().max().item() <= FP32_ATOL
    assert hashlib.sha256((onnx_dir / "model.onnx").read_bytes()).hexdigest() == graph_hash


def test_generate_matches_torch_backend(onnx_dir: Path, base: LoadedModel, adapter0: dict
                                        ) -> None:
    cfg = GenerateConfig(max_new_tokens=24, temperature=0.0)
    want = generate(eager_with(base, adapter0), base.tokenizer,  # type: ignore[arg-type]
                    "hello there", cfg).text
    assert generate_from_export(onnx_dir, "hello there", backend="onnx", cfg=cfg) == want
    with pytest.raises(ConfigError, match="--backend onnx"):
        generate_from_export(onnx_dir, "hi", backend="executorch", cfg=cfg)


def test_export_without_adapter_has_no_lora_inputs(tmp_path: Path, base: LoadedModel) -> None:
    export_model(load_model("tiny"), ExportConfig(format=ExportFormat.ONNX, max_seq_len=32),
                 tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert not [i.name for i in graph.input if "lora" in i.name]
    ref = eager_logits(eager_with(base, None), TOKENS)
    got, pos = runner_rows(OnnxRunner(tmp_path), TOKENS, prefill=5)
    assert (got - ref[pos]).abs().max().item() <= FP32_ATOL
    with pytest.raises(ConfigError, match="no LoRA slots"):
        OnnxRunner(tmp_path, adapter=random_adapter(base.model, {QV[0]: 2}))


@pytest.mark.parametrize("quant,rel_logit,rel_loss", [(ExportQuant.INT8, 0.02, 0.002),
                                                      (ExportQuant.INT4, 0.25, 0.02)])
def test_quantized_within_tolerance(tmp_path: Path, base: LoadedModel, adapter0: dict,
                                    quant: ExportQuant, rel_logit: float, rel_loss: float
                                    ) -> None:
    """MatMulNBits weights: logits within `rel_logit` of their range, loss within `rel_loss`."""
    export_model(load_model("tiny"), ExportConfig(format=ExportFormat.ONNX, quant=quant,
                                                  max_seq_len=64),
                 tmp_path, adapter=copy.deepcopy(adapter0))
    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    # every base linear (2 blocks x 7) and the LM head; LoRA MatMuls read inputs, stay fp32
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 2 * 7 + 1
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    got = token_logits(OnnxRunner(tmp_path), TOKENS)
    err = (got - ref).abs().max().item()
    assert 0 < err <= rel_logit * ref.abs().max().item(), err
    targets = torch.tensor(TOKENS[1:])
    loss_ref = torch.nn.functional.cross_entropy(ref[:-1], targets).item()
    loss_q = torch.nn.functional.cross_entropy(got[:-1], targets).item()
    assert abs(loss_q - loss_ref) <= rel_loss * loss_ref, (loss_q, loss_ref)
