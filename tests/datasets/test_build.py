import json
import sys
from pathlib import Path

import pytest

from edge_runtime.data import load_jsonl
from edge_runtime.datasets.build import parse_data_name, pull_dataset
from edge_runtime.datasets.readers import read_bigbench, read_chatterbot, read_fortunes
from edge_runtime.datasets.sources import Artifact, DataPullError, fetch_artifact
from edge_runtime.errors import DataError

FIX = Path(__file__).parent / "fixtures"


def test_sentiment_domain_split_rows_load(tmp_path):
    man = pull_dataset("sentiment", tmp_path, n_clients=3, raw=FIX / "sentiment")
    assert man["num_records"] == 30  # the empty trailing rows are dropped
    assert [list(c["groups"]) for c in man["clients"]] == [["amazon"], ["imdb"], ["yelp"]]
    rows = load_jsonl(tmp_path / "client_000" / "train.jsonl")
    assert len(rows) == 8 and all(r.choices == ["negative", "positive"] for r in rows)
    assert all(r.response == r.choices[r.answer] for r in rows)
    assert len(load_jsonl(tmp_path / "test.jsonl")) == 6
    assert json.loads((tmp_path / "manifest.json").read_text())["pins"][0]["sha256"]


def test_bigbench_task_split_and_targets(tmp_path):
    man = pull_dataset("bigbench:navigate,word_sorting", tmp_path, n_clients=2,
                       raw=FIX / "bigbench")
    assert [list(c["groups"]) for c in man["clients"]] == [["navigate"], ["word_sorting"]]
    recs = read_bigbench(FIX / "bigbench", ("navigate", "word_sorting"))
    nav = [r.row for r in recs if r.group == "navigate"]
    assert all(r["choices"] == ["True", "False"] or r["choices"] == ["False", "True"]
               for r in nav)
    src = json.loads((FIX / "bigbench" / "navigate" / "task.json").read_text())["examples"]
    for row, ex in zip(nav, src, strict=True):  # the answer is the best-scored target
        best = max(ex["target_scores"], key=ex["target_scores"].get)
        assert row["response"] == best and row["prompt"].endswith(ex["input"])
    ws = [r.row for r in recs if r.group == "word_sorting"]
    assert "choices" not in ws[0] and ws[0]["prompt"].startswith("Sort the following words")
    with pytest.raises(DataError, match="no task.json"):
        read_bigbench(FIX / "bigbench", ("no_such_task",))


def test_chatterbot_and_fortunes_readers():
    qa = read_chatterbot(FIX / "chatterbot")
    assert {r.group for r in qa} == {"ai", "food"}
    assert all(r.row["prompt"] and r.row["response"] for r in qa)
    recs = read_fortunes(FIX / "fortunes", min_entries=3)
    cats = {r.group for r in recs}
    assert cats == {"computers", "people"}  # ethnic excluded, zippy too small
    assert recs[0].row["choices"] == ["computers", "people"]


def test_names_and_checksum_errors(tmp_path):
    assert parse_data_name("bigbench:a,b").tasks == ("a", "b")
    with pytest.raises(DataError, match="needs tasks"):
        parse_data_name("bigbench")
    with pytest.raises(DataError, match="unknown dataset"):
        parse_data_name("imagenet")
    art = Artifact((sys.executable, "-c", "open('x.bin','w').write('tampered')"), "x.bin",
                   "0" * 64)
    with pytest.raises(DataPullError, match="differs from the pinned"):
        fetch_artifact(art, tmp_path)
    assert not (tmp_path / "downloads" / "x.bin").exists()
