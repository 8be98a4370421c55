"""Local training data: JSONL rows -> token ids with loss labels -> padded or packed batches.

Row formats (one JSON object per line):
  {"prompt": ..., "response": ...}        loss on the response tokens only
  {"text": ...}                            loss on every token
  {"prompt": ..., "choices": [...], "answer": i}   multiple choice (trains on the answer,
                                                   scored by log-likelihood of each choice)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edge_runtime.errors import DataError

__all__ = [
    "IGNORE",
    "Example",
    "TokenizedExample",
    "load_jsonl",
    "format_prompt",
    "tokenize",
    "tokenize_one",
    "collate",
    "pack",
    "batch_iterator",
]

IGNORE = -100  # label of a position that carries no loss


class TokenizerLike(Protocol):
    @property
    def pad_id(self) -> int: ...
    @property
    def eos_ids(self) -> set[int]: ...
    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                    ) -> str: ...


@dataclass
class Example:
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    choices: list[str] | None = None
    answer: int | None = None


def example_to_json(ex: Example) -> dict[str, object]:
    """A row as `load_jsonl` reads it back (absent fields left out)."""
    return {k: v for k, v in (("prompt", ex.prompt), ("response", ex.response),
                              ("text", ex.text), ("choices", ex.choices),
                              ("answer", ex.answer)) if v is not None}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _parse_row(obj: object, path: Path, lineno: int) -> Example:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return Example(text=obj["text"])
    if "prompt" not in obj:
        raise DataError(
            f"{where}: a row needs 'text', or 'prompt' with 'response' (or 'choices' + 'answer')"
        )
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string")
    choices = obj.get("choices")
    answer = obj.get("answer")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' must be an index into 'choices'")
    response = obj.get("response")
    if response is None and choices is not None and answer is not None:
        response = choices[answer]
    if not isinstance(response, str):
        raise DataError(f"{where}: 'response' must be a string")
    return Example(prompt=prompt, response=response, choices=choices, answer=answer)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL dataset. Raises DataError naming the file and line of any bad row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist; pass a JSONL file to --data")
    examples: list[Example] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON ({e.msg}); fix or remove the line"
                                ) from None
            examples.append(_parse_row(obj, p, lineno))
    if not examples:
        raise DataError(f"data file {p} has no rows; add JSONL rows like "
                        '{"prompt": "...", "response": "..."}')
    return examples


def format_prompt(tokenizer: TokenizerLike, prompt: str, *, raw: bool = False) -> str:
    """The prompt as the model sees it: the chat template's user turn, or as-is with `raw`."""
    if raw or not tokenizer.has_chat_template:
        return prompt
    return tokenizer.chat_prompt([{"role": "user", "content": prompt}], add_generation_prompt=True)


def tokenize_one(tokenizer: TokenizerLike, ex: Example, seq_len: int, *, raw: bool = False
                 ) -> TokenizedExample:
    """Token ids and labels for one example, at most `seq_len` tokens."""
    eos = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
    if ex.text is not None:
        ids = tokenizer.encode(ex.text)
        if eos is not None:
            ids = ids + [eos]
        ids = ids[:seq_len]
        return TokenizedExample(ids, list(ids))
    assert ex.prompt is not None and ex.response is not None
    if raw or not tokenizer.has_chat_template:
        p_ids = tokenizer.encode(ex.prompt)
        r_ids = tokenizer.encode(ex.response) + ([eos] if eos is not None else [])
    else:
        user = [{"role": "user", "content": ex.prompt}]
        prompt_text = tokenizer.chat_prompt(user, add_generation_prompt=True)
        full = tokenizer.chat_prompt(user + [{"role": "assistant", "content": ex.response}],
                                     add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of the "
                            "conversation; train with raw prompts")
        p_ids = tokenizer.encode(prompt_text)
        r_ids = tokenizer.encode(full[len(prompt_text):].rstrip("\n"))
    # Keep the whole response where possible: cut the prompt from the left first.
    room = seq_len - len(r_ids)
    if room < len(p_ids):
        p_ids = p_ids[max(0, len(p_ids) - max(room, 1)):] if room > 0 else p_ids[-1:]
    ids = (p_ids + r_ids)[:seq_len]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:seq_len]
    return TokenizedExample(ids, labels)


def tokenize(tokenizer: TokenizerLike, examples: list[Example], seq_len: int, *,
             raw: bool = False) -> list[TokenizedExample]:
    out = [tokenize_one(tokenizer, ex, seq_len, raw=raw) for ex in examples]
    out = [t for t in out if t.num_label_tokens > 0 and len(t.input_ids) >= 2]
    if not out:
        raise DataError("no example has a token to learn from after tokenization; "
                        "raise --seq-len or check the data")
    return out


def collate(batch: list[TokenizedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, labels), both (B, T) int64."""
    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[i, : len(t.labels)] = torch.tensor(t.labels)
    return ids, labels


def pack(examples: list[TokenizedExample], seq_len: int) -> list[TokenizedExample]:
    """Concatenate examples into rows of exactly `seq_len` tokens (the last row may be short).

    Attention crosses example boundaries inside a row (as in most packed LM training);
    the label of the first token of each example is kept, which teaches the model to
    start an example after the previous one's end token.
    """
    ids: list[int] = []
    labels: list[int] = []
    for t in examples:
        ids.extend(t.input_ids)
        labels.extend(t.labels)
    rows = []
    for s in range(0, len(ids), seq_len):
        chunk = TokenizedExample(ids[s: s + seq_len], labels[s: s + seq_len])
        if len(chunk.input_ids) >= 2 and chunk.num_label_tokens > 0:
            rows.append(chunk)
    return rows


def batch_iterator(examples: list[TokenizedExample], batch_size: int, seed: int
                   ) -> Iterator[list[TokenizedExample]]:
    """Endless shuffled batches; each epoch is a new permutation from `seed`."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            if len(idx) < batch_size and len(order) >= batch_size:
                # Fill the last batch from the start of the permutation: fixed batch shape.
                idx = idx + order[: batch_size - len(idx)]
            yield [examples[i] for i in idx]
        epoch += 1
