"""Independent references for the real model: transformers and PEFT.

- transformers' own GGUF loader vs ours: logits and greedy tokens, and its GGUF
  tokenizer conversion vs ours.
- An adapter made here (per-layer ranks) loads in PEFT on transformers' LlamaForCausalLM
  (from our HF folder) and gives our logits; an adapter made by PEFT loads here and gives
  PEFT's logits.
"""

from __future__ import annotations

from pathlib import Path

import peft  # dev extra; missing it is an error, not a skip
import pytest
import torch
import transformers

from edge_runtime.adapter_io import load_adapter, save_adapter
from edge_runtime.checkpoints import LoadedModel, load_model
from edge_runtime.config import LoRAPlan
from edge_runtime.lora import apply_lora, get_adapter, lora_modules, set_adapter

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

QUESTION = "What is the capital of France?"
TOL = 1e-4


def _prompt_ids(lm: LoadedModel, text: str = QUESTION) -> list[int]:
    return lm.tokenizer.encode(lm.tokenizer.chat_prompt([{"role": "user", "content": text}]))


def _ours(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def _theirs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _greedy_ours(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    x = list(ids)
    for _ in range(n):
        x.append(int(_ours(model, x)[-1].argmax()))
    return x[len(ids):]


@pytest.fixture(scope="module")
def hf_folder(real_hf_folder: Path) -> Path:
    return real_hf_folder


@pytest.fixture(scope="module")
def hf_model(hf_folder: Path) -> torch.nn.Module:
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    return model.eval()


def test_transformers_gguf_loader_agrees(real_gguf: Path, real_lm: LoadedModel) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32).eval()
    ids = _prompt_ids(real_lm)
    ours, theirs = _ours(real_lm.model, ids), _theirs(ref, ids)
    assert ours.abs().max() > 1.0  # real logits, not zeros
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    n = 12
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=real_lm.tokenizer.pad_id)
    theirs_tokens = out[0, len(ids):].tolist()
    assert _greedy_ours(real_lm.model, ids, n) == theirs_tokens
    assert real_lm.tokenizer.decode(theirs_tokens).startswith("The capital of France is Paris")


def test_transformers_gguf_tokenizer_agrees(real_gguf: Path, real_lm: LoadedModel) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent),
                                                     gguf_file=real_gguf.name)
    texts = ["Hello world!", "In 2024, 1234 + 5678 = 6912.", "  spaces\tand\nnewlines  ",
             "Ünïcödé ✓ 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n", "don't you'll I'M"]
    for text in texts:
        assert real_lm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
        ids = real_lm.tokenizer.encode(text)
        assert real_lm.tokenizer.decode(ids, skip_special=False) == text


def _randomize_b(adapter: dict, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for w in adapter.values():
        w.lora_b = torch.randn(w.lora_b.shape, generator=gen) * std


def test_our_adapter_in_peft(real_lm: LoadedModel, hf_folder: Path, hf_model: torch.nn.Module,
                             tmp_path: Path) -> None:
    ours = load_model(str(hf_folder))
    plan = LoRAPlan(rank=4, depth=3, targets=("q", "v", "down"), alpha=8.0,
                    layer_ranks={27: 2, 29: 8})
    apply_lora(ours.model, plan)
    adapter = get_adapter(ours.model)
    _randomize_b(adapter, seed=1, std=0.05)
    set_adapter(ours.model, adapter)
    save_adapter(tmp_path / "ad", adapter, fingerprint=ours.fingerprint, base_name="smollm2")
    tuned = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "ad")).eval()
    try:
        ids = _prompt_ids(ours)
        ranks = {n.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
                 for n, m in tuned.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        assert ranks == {n: w.rank for n, w in adapter.items()}
        mine, theirs = _ours(ours.model, ids), _theirs(tuned, ids)
        torch.testing.assert_close(mine, theirs, atol=TOL, rtol=0)
        with tuned.disable_adapter():
            plain = _theirs(tuned, ids)
        assert (plain - theirs).abs().max() > 0.1  # the adapter really acts
    finally:
        tuned.unload()


def test_peft_adapter_loads_here(real_lm: LoadedModel, hf_folder: Path,
                                 hf_model: torch.nn.Module, tmp_path: Path) -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"],
                          layers_to_transform=[26, 28, 29], rank_pattern={"o_proj": 6},
                          alpha_pattern={r"layers\.29\.mlp\.up_proj": 3}, task_type="CAUSAL_LM")
    tuned = peft.get_peft_model(hf_model, cfg).eval()
    try:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in tuned.modules():
                if hasattr(m, "lora_B") and m.lora_B:
                    w = m.lora_B["default"].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
        tuned.save_pretrained(str(tmp_path / "peft_ad"))
        ids = _prompt_ids(real_lm)
        theirs = _theirs(tuned, ids)
    finally:
        tuned.unload()
    adapter, meta = load_adapter(tmp_path / "peft_ad", expect_fingerprint=real_lm.fingerprint)
    assert meta.fingerprint is None
    assert adapter["model.layers.28.self_attn.o_proj"].rank == 6
    assert adapter["model.layers.29.mlp.up_proj"].scale == pytest.approx(3 / 4)
    ours = load_model(str(hf_folder))
    set_adapter(ours.model, adapter)
    assert len(lora_modules(ours.model)) == 9
    torch.testing.assert_close(_ours(ours.model, ids), theirs, atol=TOL, rtol=0)


def test_folder_written_by_transformers_loads_here(real_lm: LoadedModel, hf_folder: Path,
                                                   hf_model: torch.nn.Module,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "by_transformers"
    hf_model.save_pretrained(str(out), max_shard_size="100MB")  # sharded safetensors
    transformers.AutoTokenizer.from_pretrained(str(hf_folder)).save_pretrained(str(out))
    assert (out / "model.safetensors.index.json").is_file()
    lm = load_model(str(out))
    assert lm.fingerprint == real_lm.fingerprint
    ids = _prompt_ids(real_lm)
    assert _prompt_ids(lm) == ids  # tokenizer and chat template as transformers saved them
    torch.testing.assert_close(_ours(lm.model, ids), _theirs(hf_model, ids), atol=TOL, rtol=0)
