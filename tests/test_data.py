"""JSONL parsing errors name the line; tokenization masks the prompt."""

from pathlib import Path

import pytest

from edge_runtime.checkpoints import load_model
from edge_runtime.data import IGNORE, load_jsonl, pack, tokenize
from edge_runtime.errors import DataError

FIX = Path(__file__).parent / "fixtures"


def test_malformed_line_reports_its_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"prompt": "a", "response": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"d.jsonl:4: malformed JSON"):
        load_jsonl(p)


@pytest.mark.parametrize("content,msg", [
    ("", "has no rows"),
    ('{"prompt": "x"}\n', "'response' must be a string"),
    ('{"foo": 1}\n', "needs 'text'"),
    ('[1, 2]\n', "JSON object"),
    ('{"prompt": "q", "choices": ["a"], "answer": 3}\n', "index into 'choices'"),
])
def test_bad_rows(tmp_path, content, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_jsonl(p)


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl("/nonexistent/file.jsonl")


def test_prompt_tokens_carry_no_loss_and_response_does():
    tok = load_model("tiny").tokenizer
    ex = load_jsonl(FIX / "qa.jsonl")[:2]
    data = tokenize(tok, ex, seq_len=128)
    for t, e in zip(data, ex, strict=True):
        n_prompt = sum(1 for lab in t.labels if lab == IGNORE)
        prompt_text = tok.chat_prompt([{"role": "user", "content": e.prompt}])
        assert n_prompt == len(tok.encode(prompt_text))
        learned = tok.decode([lab for lab in t.labels if lab != IGNORE])
        assert learned.startswith(e.response)


def test_truncation_keeps_the_response_and_packing_fills_rows():
    tok = load_model("tiny").tokenizer
    ex = load_jsonl(FIX / "qa.jsonl")
    data = tokenize(tok, ex, seq_len=24)
    assert all(len(t.input_ids) <= 24 and t.num_label_tokens > 0 for t in data)
    packed = pack(tokenize(tok, ex, seq_len=128), 64)
    assert all(len(r.input_ids) == 64 for r in packed[:-1])
