"""Text <-> token ids, and the model's chat template.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library HF uses) built from a
`tokenizer.json`, from GGUF metadata (see `checkpoints/gguf/tokenizer.py`), or the tiny byte-level
one used by the `tiny` test model. Control tokens written in the text (`<|im_start|>`)
are parsed as single special tokens. A BOS token is added only when the model asks for
one (`add_bos`) and the text does not already start with it (Llama 3 chat templates
write `<|begin_of_text|>` themselves).

Chat templates are Jinja, rendered in a sandboxed environment with the helpers
Hugging Face templates expect (`raise_exception`, `strftime_now`, `tojson`).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from edge_runtime.errors import CheckpointError, UserError

__all__ = ["Tokenizer", "ChatTemplateError", "bytes_to_unicode", "CHATML_TEMPLATE", "EOT_NAMES"]

# Tokens that end a turn or a document in the model families we load.
EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>",
             "</s>", "<end_of_turn>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(UserError):
    """The model's chat template failed to render the given messages."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points
    256, 257, ... in byte order (Radford et al. 2019, GPT-2 `encoder.py`).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the model's chat template does not parse: {e}") from None


class Tokenizer:
    """Encode/decode text and render the chat template of one model."""

    def __init__(self, tok: RustTokenizer, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, extra_eos: tuple[str, ...] = EOT_NAMES
                 ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        eos: set[int] = {eos_id} if eos_id is not None else set()
        for name in extra_eos:
            tid = tok.token_to_id(name)
            if tid is not None:
                eos.add(tid)
        self.eos_ids: set[int] = eos
        if pad_id is None:
            pad_id = eos_id if eos_id is not None else 0
        self.pad_id: int = pad_id

    # --- basic API ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids (including added/special tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def bos_token(self) -> str:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_id) if self.eos_id is not None else ""

    def id_to_token(self, tid: int) -> str:
        tok = self._tok.id_to_token(tid)
        return tok if tok is not None else ""

    def token_to_id(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are parsed as such.

        BOS is prepended when the model wants one (`add_bos`, overridable) and the
        text does not already begin with it.
        """
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                    ) -> str:
        """Render the chat template for `messages` ([{"role", "content"}, ...])."""
        if self._template is None:
            raise ChatTemplateError(
                "this model has no chat template; pass --raw to feed the prompt as-is"
            )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None

    # --- constructors ---------------------------------------------------------
    @classmethod
    def tiny(cls) -> Tokenizer:
        """Byte-level tokenizer: ids 0-255 are bytes, then three ChatML specials, no merges."""
        b2u = bytes_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
        return cls(tok, bos_id=None, eos_id=tok.token_to_id("<|im_end|>"),
                   pad_id=tok.token_to_id("<|endoftext|>"), chat_template=CHATML_TEMPLATE)

    @classmethod
    def from_tokenizer_json(cls, folder: str | Path) -> Tokenizer:
        """From a HF folder: `tokenizer.json` plus `tokenizer_config.json` (template, specials)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; a HF model folder needs its tokenizer.json")
        try:
            tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
        cfg = read_json_object(folder / "tokenizer_config.json")
        gen = read_json_object(folder / "generation_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        def special_id(key: str) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        bos_id = special_id("bos_token")
        eos_id = special_id("eos_token")
        if eos_id is None and isinstance(gen.get("eos_token_id"), int):
            eos_id = int(gen["eos_token_id"])
        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:  # does the post-processor put BOS in front?
            with_specials = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_specials) and with_specials[0] == bos_id
        out = cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=special_id("pad_token"),
                  add_bos=add_bos, chat_template=template if isinstance(template, str) else None)
        gen_eos = gen.get("eos_token_id")
        for tid in gen_eos if isinstance(gen_eos, list) else []:
            out.eos_ids.add(int(tid))
        return out

    def save(self, folder: str | Path, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`
        so `from_tokenizer_json` (and transformers) read back the same tokenizer."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token or None,
            "eos_token": self.eos_token or None,
            "pad_token": self.id_to_token(self.pad_id) or None,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            cfg["model_max_length"] = model_max_length
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        gen = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.eos_ids) or None,
               "pad_token_id": self.pad_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")

    @property
    def backend(self) -> RustTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for writing `tokenizer.json`)."""
        return self._tok


def read_json_object(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict ({} when optional and absent).

    Raises:
        CheckpointError: missing (when required), not JSON, or not an object.
    """
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing; a HF model folder needs it")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
