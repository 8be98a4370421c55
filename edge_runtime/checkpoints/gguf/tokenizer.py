"""Build a `Tokenizer` from GGUF metadata (`tokenizer.ggml.*`).

Supported: `tokenizer.ggml.model == "gpt2"` (byte-level BPE) with the pre-tokenizers
`smollm` (each digit alone, then GPT-2's byte-level split), `llama-bpe` (Llama 3) and
`qwen2`. Control tokens (token type 3) become special added tokens, user-defined ones
(type 4) plain added tokens, so both are matched whole in the text as llama.cpp does.
The split patterns are the ones llama.cpp's `llama-vocab.cpp` lists for these types.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from edge_runtime.errors import CheckpointError
from edge_runtime.tokenizer import Tokenizer

__all__ = ["tokenizer_from_gguf", "gguf_field", "SUPPORTED_PRE"]

TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3"):
        return _regex_then_bytes(_LLAMA3_SPLIT)
    if pre == "qwen2":
        return _regex_then_bytes(_QWEN2_SPLIT)
    raise CheckpointError(
        f"GGUF tokenizer pre-tokenizer {pre!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_PRE)}); load the model's HF folder with tokenizer.json instead"
    )


SUPPORTED_PRE = ("smollm", "llama-bpe", "qwen2")


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of a GGUF metadata key (scalars, strings, arrays), or `default`.

    `reader` is our `GGUFFile` or a `gguf.GGUFReader`.
    """
    if hasattr(reader, "metadata"):
        return reader.metadata.get(key, default)
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def tokenizer_from_gguf(reader: Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata."""
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError("the GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2'); "
            "load the model's HF folder with tokenizer.json instead"
        )
    pre = str(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    tokens: list[str] = list(gguf_field(reader, "tokenizer.ggml.tokens", []))
    merges: list[str] = list(gguf_field(reader, "tokenizer.ggml.merges", []))
    types: list[int] = list(gguf_field(reader, "tokenizer.ggml.token_type", []))
    if not tokens or len(types) not in (0, len(tokens)):
        raise CheckpointError("GGUF tokenizer.ggml.tokens/token_type are missing or inconsistent")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError("GGUF tokenizer.ggml.tokens has duplicate tokens")
    pairs: list[tuple[str, str]] = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF tokenizer merge {m!r} is not of the form 'a b'")
        pairs.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3"))
    tok = RustTokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError("GGUF tokenizer added tokens do not map onto its vocabulary")

    def opt_id(key: str) -> int | None:
        value = gguf_field(reader, key)
        return None if value is None else int(value)

    template = gguf_field(reader, "tokenizer.chat_template")
    return Tokenizer(
        tok,
        bos_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"),
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=str(template) if template is not None else None,
    )
