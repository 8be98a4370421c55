"""Tokenizer: byte-level round trips, specials parsed from text, chat templates."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from edge_runtime.tokenizer import ChatTemplateError, Tokenizer, bytes_to_unicode


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256))
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord("A")] == "A" and m[ord(" ")] == "\u0120"  # GPT-2's 'Ġ'


def test_tiny_ids_are_utf8_bytes_and_round_trip():
    tok = Tokenizer.tiny()
    text = "héllo, wörld 42 ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tiny_specials_parsed_from_text_and_skipped_on_decode():
    tok = Tokenizer.tiny()
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (257, 258)
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids == [im_start, ord("h"), ord("i"), im_end]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>hi<|im_end|>"
    assert tok.eos_ids == {256, 258}
    assert tok.pad_id == 256
    assert tok.vocab_size == 259
    assert tok.bos_id is None and not tok.add_bos


def test_tiny_chat_prompt_is_chatml():
    tok = Tokenizer.tiny()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.chat_prompt(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.chat_prompt(msgs, add_generation_prompt=False).endswith("U<|im_end|>\n")


def _write_folder(tmp_path, tokenizer_config):
    b2u = bytes_to_unicode()
    rt = RustTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    rt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rt.decoder = decoders.ByteLevel()
    rt.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    rt.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


def test_from_tokenizer_json_bos_template_and_eot(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}"
        "{{ raise_exception('no bad roles') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    folder = _write_folder(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                      "add_bos_token": True, "chat_template": template})
    tok = Tokenizer.from_tokenizer_json(folder)
    bos, eos, eot = 256, 257, 258
    assert (tok.bos_id, tok.eos_id) == (bos, eos)
    assert tok.eos_ids == {eos, eot}
    assert tok.encode("ab") == [bos, ord("a"), ord("b")]
    assert tok.encode("ab", add_bos=False) == [ord("a"), ord("b")]
    prompt = tok.chat_prompt([{"role": "user", "content": "x"}])
    assert prompt == "<s>[user]x<|eot_id|>"
    # The template already wrote BOS: not doubled.
    assert tok.encode(prompt)[:2] == [bos, ord("[")]
    with pytest.raises(ChatTemplateError, match="no bad roles"):
        tok.chat_prompt([{"role": "bad", "content": "x"}])


def test_no_template_means_raw(tmp_path):
    tok = Tokenizer.from_tokenizer_json(_write_folder(tmp_path, {"eos_token": "</s>"}))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="--raw"):
        tok.chat_prompt([{"role": "user", "content": "x"}])


def test_save_round_trip_keeps_specials_bos_and_template(tmp_path):
    (tmp_path / "src").mkdir()
    folder = _write_folder(tmp_path / "src", {
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                         "<|eot_id|>{% endfor %}"})
    tok = Tokenizer.from_tokenizer_json(folder)
    tok.save(tmp_path / "dst", model_max_length=64)
    back = Tokenizer.from_tokenizer_json(tmp_path / "dst")
    text = "hé<|eot_id|>x"
    assert back.encode(text) == tok.encode(text) and back.encode(text)[0] == 256
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos)
    assert back.eos_ids == tok.eos_ids
    msgs = [{"role": "user", "content": "a"}]
    assert back.chat_prompt(msgs) == tok.chat_prompt(msgs) == "<s>a<|eot_id|>"
