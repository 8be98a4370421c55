"""ONNX export of `tiny`: parity with eager, adapters of any rank on one graph, int4/int8."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import onnx
import pytest
import torch

from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.config import GenerateConfig
from edge_runtime.errors import ConfigError
from edge_runtime.generate import generate
from edge_runtime.model import CausalLM
from exporters.config import ExportConfig, ExportFormat, ExportQuant
from exporters.export import ExportFolderError, export_model, read_manifest
from exporters.onnx_graph import KV_DIM
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
    assert shapes["past_key_0"][2] == KV_DIM and shapes["input_ids"][1] == "seq"
    ops = [n.op_type for n in graph.node]
    # fused attention with the KV buffer shared in place: no per-step cache concat
    assert ops.count("GroupQueryAttention") == 2 and "Concat" not in ops
    # RMSNorm fused with the residual add: 2 per block and the final one, less the first
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 2
    assert ops.count("SimplifiedLayerNormalization") == 1


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
    # per block qkv, o, gate+up and down, and the LM head; LoRA MatMuls read inputs, stay fp32
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 2 * 4 + 1
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    got = token_logits(OnnxRunner(tmp_path), TOKENS)
    err = (got - ref).abs().max().item()
    assert 0 < err <= rel_logit * ref.abs().max().item(), err
    targets = torch.tensor(TOKENS[1:])
    loss_ref = torch.nn.functional.cross_entropy(ref[:-1], targets).item()
    loss_q = torch.nn.functional.cross_entropy(got[:-1], targets).item()
    assert abs(loss_q - loss_ref) <= rel_loss * loss_ref, (loss_q, loss_ref)


def test_chunked_prefill_and_a_new_sequence_match_eager(onnx_dir: Path, base: LoadedModel,
                                                       adapter0: dict) -> None:
    """Positions come from seqlens_k: a prompt fed in chunks, then one token per step,
    equals eager; a shorter sequence after a longer one reads none of its stale KV."""
    ref = eager_logits(eager_with(base, adapter0), TOKENS)
    runner = OnnxRunner(onnx_dir)
    rows = [runner.step(TOKENS[:4], 0), runner.step(TOKENS[4:7], 4)]
    rows += [runner.step([t], i) for i, t in enumerate(TOKENS[7:], start=7)]
    got = torch.stack(rows)
    assert (got - ref[[3, 6, *range(7, len(TOKENS))]]).abs().max().item() <= FP32_ATOL
    short = TOKENS[::-1][:5]
    ref_short = eager_logits(eager_with(base, adapter0), short)
    got_short = runner.step(short, 0)  # start 0 = a new sequence, buffers not cleared
    assert (got_short - ref_short[-1]).abs().max().item() <= FP32_ATOL


def test_runner_refuses_past_max_seq_len_and_old_layouts(onnx_dir: Path, tmp_path: Path
                                                         ) -> None:
    runner = OnnxRunner(onnx_dir)
    runner.step(TOKENS, 0)
    with pytest.raises(ConfigError, match="--max-seq-len 64"):
        runner.step(list(range(60)), len(TOKENS))
    manifest = read_manifest(onnx_dir)
    del manifest["kv_layout"]  # what the traced graph (KV concatenated per step) wrote
    with pytest.raises(ExportFolderError, match="re-run edge-rt export"):
        OnnxRunner(onnx_dir, manifest=manifest)


def test_biased_attention_untied_head_and_scaled_rope_match_eager(tmp_path: Path,
                                                                    base: LoadedModel) -> None:
    """The graph builder's other branches: q/k/v biases (Qwen2), an untied LM head and
    Llama-3 RoPE scaling, fp32 against eager."""
    cfg = dataclasses.replace(base.model.config, attention_bias=True, tie_embeddings=False,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "original_max_position_embeddings": 64})
    torch.manual_seed(3)
    model = CausalLM(cfg).eval()
    loaded = LoadedModel(model=copy.deepcopy(model), tokenizer=base.tokenizer,
                         fingerprint="test", name="tiny-biased", source="test")
    export_model(loaded, ExportConfig(format=ExportFormat.ONNX, max_seq_len=64), tmp_path)
    ref = eager_logits(model, TOKENS)
    got, pos = runner_rows(OnnxRunner(tmp_path), TOKENS, prefill=4)
    assert (got - ref[pos]).abs().max().item() <= FP32_ATOL
