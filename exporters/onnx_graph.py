"""The ONNX decoder step, written op by op with ONNX Runtime's fused LLM operators.

One graph runs prefill and decode of a Llama-family `CausalLM` (B = 1):

    inputs:  input_ids (1, T) int64; seqlens_k (1,) int32 = P + T - 1 (the index of the
             last position); total_sequence_length () int32 = P + T;
             past_key_i, past_value_i (1, KV, S, hd) for every block i: the KV buffers of
             S >= P + T positions, shared with the outputs (ONNX Runtime writes the new
             positions in place when present_* is bound to the same buffer);
             for every LoRA slot m: `m.lora_a` (r_m, d_in), `m.lora_b` (d_out, r_m),
             `m.lora_scale` (1,), r_m symbolic (any adapter, no re-export)
    outputs: logits (1, V) of the last position; present_key_i, present_value_i (1, KV, S, hd)

Per block (the layout of onnxruntime-genai's model builder):
`SkipSimplifiedLayerNormalization` (RMSNorm fused with the residual add) -> one linear
for q, k and v together -> `GroupQueryAttention` (rotary from cos/sin caches, grouped KV
heads, past and present sharing one buffer, so no cache is copied per step) -> o ->
`SkipSimplifiedLayerNormalization` -> one linear for gate and up -> SiLU(gate) * up ->
down. LoRA deltas `s ((x A^T) B^T)` are added to the output of the module they adapt,
after the fused linear is split. The LM head runs on the last position only.

Linears (`exporters.onnx_int4`): fp32 `MatMul`; `int8` `MatMulNBits` on Q8_0's grid;
`int4` `MatMulNBits` on the Q4_1 grid with its exact per-block correction, the
activations' block means computed once per input and shared by the fused linear. A tied
embedding of a quantized export is `GatherBlockQuantized` over the LM head's 8-bit bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edge_runtime.model import Block, CausalLM, rope_tables
from exporters.config import ExportQuant
from exporters.transforms import InputLoRALinear, SlotShapes

__all__ = ["GraphBuilder", "build_decoder", "KV_DIM", "input_names", "output_names"]

KV_DIM = "max_seq"  # the symbolic length of the shared KV buffers
HEAD = "lm_head"  # the LM head's initializer prefix (shared with a tied embedding)
OPSET = 17


class GraphBuilder:
    """Nodes, initializers and graph inputs/outputs of one ONNX graph under construction."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.block_means: dict[tuple[str, int], str] = {}  # (tensor, K) -> [x | means]
        self._consts: set[str] = set()
        self._n = 0

    def const(self, name: str, arr: np.ndarray) -> str:
        """An initializer (added once per name)."""
        from onnx import numpy_helper

        if name not in self._consts:
            self._consts.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1,
           domain: str = "", **attrs: Any) -> list[str]:
        """Append a node; `outputs` is a count (fresh names) or the names. Returns them."""
        self._n += 1
        if isinstance(outputs, int):
            outputs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs,
                                                name=f"{op_type}_{self._n}", domain=domain,
                                                **attrs))
        return outputs

    def input(self, name: str, elem: int, shape: list[int | str]) -> str:
        self.inputs.append(self.helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[int | str]) -> None:
        self.outputs.append(self.helper.make_tensor_value_info(name, elem, shape))

    def model(self, name: str) -> Any:
        h = self.helper
        graph = h.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=self.inits)
        return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET),
                                                  h.make_opsetid("com.microsoft", 1)],
                            producer_name="edge-runtime")


def input_names(n_layers: int, slot_names: list[str]) -> list[str]:
    names = ["input_ids", "seqlens_k", "total_sequence_length"]
    for i in range(n_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    for s in slot_names:
        names += [f"{s}.lora_a", f"{s}.lora_b", f"{s}.lora_scale"]
    return names


def output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def _weight(mod: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight (N, K), bias (N,) or None) of a linear, unwrapping an `InputLoRALinear`."""
    lin = mod.base if isinstance(mod, InputLoRALinear) else mod
    if not isinstance(lin, torch.nn.Linear):
        raise TypeError(f"{type(lin).__name__} is not an nn.Linear; run dequantize_base first")
    w = lin.weight.detach().float().numpy()
    b = lin.bias.detach().float().numpy() if lin.bias is not None else None
    return w, b


class _Decoder:
    """Emits the graph of `build_decoder` into a `GraphBuilder`."""

    def __init__(self, model: CausalLM, slots: SlotShapes, quant: ExportQuant,
                 max_seq_len: int) -> None:
        from onnx import TensorProto

        self.tp = TensorProto
        self.model, self.slots, self.quant = model, slots, quant
        self.cfg = model.config
        self.max_seq_len = max_seq_len
        self.g = GraphBuilder()
        self.slot_index = {name: j for j, name in enumerate(slots)}

    # --- pieces ---------------------------------------------------------------------
    def linear(self, x: str, prefix: str, names: list[str]) -> list[str]:
        """The modules `prefix.names[j]` of one input `x` as one fused linear, split back
        into one output per module, each with its LoRA delta if it is a slot."""
        from exporters.onnx_int4 import emit_linear

        parts = [_weight(self.model.get_submodule(f"{prefix}.{n}")) for n in names]
        w = np.concatenate([p[0] for p in parts], axis=0)  # (sum N_j, K)
        y = emit_linear(self.g, x, w, f"{prefix}.{'_'.join(names)}", self.quant)
        if any(p[1] is not None for p in parts):
            bias = np.concatenate([p[1] if p[1] is not None else np.zeros(p[0].shape[0],
                                                                          np.float32)
                                   for p in parts])
            y = self.g.op("Add", [y, self.g.const(f"{prefix}.{names[0]}.fused_bias",
                                                  bias.astype(np.float32))])[0]
        full = [f"{prefix}.{n}" for n in names]
        if len(names) == 1:
            return [self._lora(x, y, full[0])]
        if not any(f in self.slots for f in full):
            return [y]  # the caller takes the fused output as it is
        sizes = self.g.const(f"{prefix}.{'_'.join(names)}.split",
                             np.array([p[0].shape[0] for p in parts], np.int64))
        outs = self.g.op("Split", [y, sizes], len(names), axis=-1)
        return [self._lora(x, o, f) for o, f in zip(outs, full, strict=True)]

    def _lora(self, x: str, y: str, module: str) -> str:
        """y + s ((x A^T) B^T) if `module` is a LoRA slot (A, B, s graph inputs), else y."""
        j = self.slot_index.get(module)
        if j is None:
            return y
        d_in, d_out = self.slots[module]
        f = self.tp.FLOAT
        a = self.g.input(f"{module}.lora_a", f, [f"rank_{j}", d_in])
        b = self.g.input(f"{module}.lora_b", f, [d_out, f"rank_{j}"])
        s = self.g.input(f"{module}.lora_scale", f, [1])
        low = self.g.op("FusedMatMul", [x, a], domain="com.microsoft", transB=1)[0]
        low = self.g.op("FusedMatMul", [low, b], domain="com.microsoft", transB=1)[0]
        low = self.g.op("Mul", [low, s])[0]
        return self.g.op("Add", [y, low])[0]

    def attention(self, i: int, x: str, cos: str, sin: str) -> str:
        c = self.cfg
        prefix = f"model.layers.{i}.self_attn"
        qkv = self.linear(x, prefix, ["q_proj", "k_proj", "v_proj"])
        if len(qkv) == 1:
            qkv += ["", ""]  # packed QKV
        f = self.tp.FLOAT
        kv_shape: list[int | str] = [1, c.n_kv_heads, KV_DIM, c.hd]
        past = [self.g.input(f"past_key_{i}", f, kv_shape),
                self.g.input(f"past_value_{i}", f, kv_shape)]
        present = [f"present_key_{i}", f"present_value_{i}"]
        self.g.output(present[0], f, kv_shape)
        self.g.output(present[1], f, kv_shape)
        y = self.g.op("GroupQueryAttention",
                      [*qkv, *past, "seqlens_k", "total_sequence_length", cos, sin],
                      [f"{prefix}.out", *present], domain="com.microsoft",
                      num_heads=c.n_heads, kv_num_heads=c.n_kv_heads, do_rotary=1,
                      rotary_interleaved=0)[0]  # (1, T, H*hd)
        return self.linear(y, prefix, ["o_proj"])[0]

    def mlp(self, i: int, x: str) -> str:
        prefix = f"model.layers.{i}.mlp"
        gu = self.linear(x, prefix, ["gate_proj", "up_proj"])
        if len(gu) == 1:
            half = self.g.const("mlp_split", np.array([self.cfg.hidden_dim] * 2, np.int64))
            gu = self.g.op("Split", [gu[0], half], 2, axis=-1)
        gate, up = gu
        act = self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate])[0]])[0]  # SiLU
        act = self.g.op("Mul", [act, up])[0]  # (1, T, hidden)
        return self.linear(act, prefix, ["down_proj"])[0]

    def norm(self, x: str, skip: str | None, weight: torch.Tensor, name: str
             ) -> tuple[str, str]:
        """RMSNorm of x (+ skip): (normed, the residual sum x + skip)."""
        w = self.g.const(name, weight.detach().float().numpy())
        eps = float(self.cfg.norm_eps)
        if skip is None:
            return self.g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps)[0], x
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization", [x, skip, w],
                                        [f"{name}.out", "", "", f"{name}.residual"],
                                        domain="com.microsoft", epsilon=eps)
        return normed, total

    # --- the whole step ---------------------------------------------------------------
    def build(self) -> Any:
        from exporters.onnx_int4 import emit_linear, emit_tied_embedding

        c, g, tp = self.cfg, self.g, self.tp
        g.input("input_ids", tp.INT64, [1, "seq"])
        g.input("seqlens_k", tp.INT32, [1])
        g.input("total_sequence_length", tp.INT32, [])
        cos_t, sin_t = rope_tables(c, self.max_seq_len)  # (S, hd), halves repeated
        cos = g.const("rope_cos", cos_t[:, : c.hd // 2].numpy())
        sin = g.const("rope_sin", sin_t[:, : c.hd // 2].numpy())
        emb_w = self.model.model.embed_tokens.weight.detach().float().numpy()  # (V, dim)
        shared = self.quant is not ExportQuant.NONE and c.tie_embeddings
        if shared:  # the head's 8-bit blocks, no fp32 table
            h = emit_tied_embedding(g, "input_ids", emb_w, HEAD)  # (1, T, dim)
        else:
            emb = g.const("embed_tokens", emb_w)
            h = g.op("Gather", [emb, "input_ids"], axis=0)[0]  # (1, T, dim)
        blocks: list[Block] = self.model.blocks()
        down: str | None = None
        for i, blk in enumerate(blocks):
            x, h = self.norm(h, None, blk.input_layernorm.weight, f"model.layers.{i}.ln1") \
                if down is None else self.norm(down, h, blk.input_layernorm.weight,
                                               f"model.layers.{i}.ln1")
            attn = self.attention(i, x, cos, sin)
            x, h = self.norm(attn, h, blk.post_attention_layernorm.weight,
                             f"model.layers.{i}.ln2")
            down = self.mlp(i, x)
        assert down is not None
        x, _ = self.norm(down, h, self.model.model.norm.weight, "model.norm")
        last = g.op("Slice", [x, g.const("last_start", np.array([-1], np.int64)),
                              g.const("last_end", np.array([2**62], np.int64)),
                              g.const("last_axis", np.array([1], np.int64))])[0]
        last = g.op("Reshape", [last, g.const("last_shape", np.array([1, c.dim], np.int64))])[0]
        head_w = self.model.lm_head.weight.detach().float().numpy()  # (V, dim)
        if shared and not np.array_equal(head_w, emb_w):
            raise ValueError("tie_embeddings is set but lm_head.weight differs from "
                             "embed_tokens.weight; fix the checkpoint's config")
        if self.quant is ExportQuant.NONE and c.tie_embeddings:
            g.op("Gemm", [last, emb], ["logits"], transB=1)  # the tied table, no copy
        else:  # tied: the same initializer as the embedding (same name, same bytes)
            emit_linear(g, last, head_w, HEAD, self.quant, head=True, out="logits")
        g.output("logits", tp.FLOAT, [1, c.vocab_size])
        return g.model("edge_runtime_decoder")


@torch.no_grad()
def build_decoder(model: CausalLM, slots: SlotShapes, quant: ExportQuant,
                  max_seq_len: int) -> Any:
    """The decoder step graph (onnx.ModelProto) of `model` (plain base with
    `InputLoRALinear` at `slots`); see the module docstring for its signature."""
    for name in slots:
        if not isinstance(model.get_submodule(name), InputLoRALinear):
            raise ValueError(f"{name} is not an InputLoRALinear; run insert_input_lora")
    return _Decoder(model.eval(), slots, quant, max_seq_len).build()
