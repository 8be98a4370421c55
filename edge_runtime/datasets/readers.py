"""Raw source files -> rows in the project's JSONL format, each tagged with group and label.

Row formats (`edge_runtime.data`): `{"prompt", "response"}`, `{"text"}`, and for
classification-style data also `"choices"` and `"answer"` (an index) so held-out rows
can be scored by the log-likelihood of each choice.

- sentiment: UCI sentences from imdb/yelp/amazon; group = domain, label = sentiment.
- fortunes: fortune-mod categories with >= 500 entries except `ethnic` and `men-women`
  (DATA.md); group = label = category; the task is naming the category.
- chatterbot: question/answer pairs; group = the YAML file's category.
- bigbench: one task per group; prompt = task_prefix + input (with the task's own
  input/output prefixes), response = target or the best of target_scores; choices when
  the task has target_scores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import DataError

__all__ = ["Record", "read_sentiment", "read_fortunes", "read_chatterbot", "read_bigbench",
           "FORTUNE_MIN_ENTRIES", "FORTUNE_EXCLUDE"]

FORTUNE_MIN_ENTRIES = 500
FORTUNE_EXCLUDE = ("ethnic", "men-women")
SENTIMENT_CHOICES = ["negative", "positive"]


@dataclass
class Record:
    row: dict[str, Any]
    group: str
    label: str


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e}); delete the cache entry and pull again"
                        ) from None


def read_sentiment(raw: Path) -> list[Record]:
    out: list[Record] = []
    for dom in ("amazon", "imdb", "yelp"):
        path = raw / f"{dom}.json"
        if not path.is_file():
            raise DataError(f"{path} is missing; run `edge-rt data pull sentiment`")
        for item in _load_json(path):
            text = str(item.get("text") or "").strip()
            if not text or item.get("class") not in (0, 1):
                continue  # each file ends with an empty {"text": "", "class": null} row
            y = int(item["class"])
            prompt = f"Review: {text}\nIs this review positive or negative?"
            out.append(Record({"prompt": prompt, "response": SENTIMENT_CHOICES[y],
                               "choices": SENTIMENT_CHOICES, "answer": y}, dom,
                              SENTIMENT_CHOICES[y]))
    return out


def _fortune_entries(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [e.strip() for e in text.split("\n%\n") if e.strip() and e.strip() != "%"]


def read_fortunes(raw: Path, min_entries: int = FORTUNE_MIN_ENTRIES) -> list[Record]:
    cats = {p.name: _fortune_entries(p) for p in sorted(raw.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in FORTUNE_EXCLUDE}
    kept = sorted(c for c, e in cats.items() if len(e) >= min_entries)
    if len(kept) < 2:
        raise DataError(f"{raw}: fewer than 2 fortune categories with >= {min_entries} entries")
    out: list[Record] = []
    for c in kept:
        for e in cats[c]:
            prompt = f"Which fortune-file category is this quote from?\n{e}"
            out.append(Record({"prompt": prompt, "response": c, "choices": kept,
                               "answer": kept.index(c)}, c, c))
    return out


def read_chatterbot(raw: Path) -> list[Record]:
    try:
        import yaml
    except ImportError:
        raise DataError("chatterbot data is YAML: pip install pyyaml") from None
    out: list[Record] = []
    files = sorted(raw.glob("*.yml"))
    if not files:
        raise DataError(f"{raw} has no .yml files; run `edge-rt data pull chatterbot`")
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        cat = path.stem
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            for q, a in zip(turns[::2], turns[1::2], strict=False):
                if q and a:
                    out.append(Record({"prompt": q, "response": a}, cat, cat))
    return out


def _task_rows(task: str, d: dict[str, Any]) -> list[dict[str, Any]]:
    prefix = d.get("task_prefix", "") or ""
    in_p = d.get("example_input_prefix", "") or ""
    out_p = d.get("example_output_prefix", "") or ""
    rows: list[dict[str, Any]] = []
    for ex in d.get("examples", []):
        prompt = f"{prefix}{in_p}{ex['input']}{out_p}".strip()
        scores = ex.get("target_scores")
        if scores:
            choices = [str(c) for c in scores]
            vals = [float(v) for v in scores.values()]
            ans = max(range(len(vals)), key=lambda i: vals[i])
            rows.append({"prompt": prompt, "response": choices[ans], "choices": choices,
                         "answer": ans})
            continue
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0] if target else None
        if target is None:
            continue
        rows.append({"prompt": prompt, "response": str(target)})
    if not rows:
        raise DataError(f"BIG-bench task {task} has no usable examples")
    return rows


def read_bigbench(raw: Path, tasks: tuple[str, ...], max_per_task: int = 1000,
                  seed: int = 0) -> list[Record]:
    """Rows of each task (subtasks merged), at most `max_per_task` per task (seeded sample)."""
    out: list[Record] = []
    for task in tasks:
        files = sorted((raw / task).rglob("task.json"))
        if not files:
            raise DataError(f"{raw / task} has no task.json; run `edge-rt data pull bigbench:{task}`")
        rows: list[dict[str, Any]] = []
        for f in files:
            rows.extend(_task_rows(task, _load_json(f)))
        if len(rows) > max_per_task:
            rows = random.Random(seed).sample(rows, max_per_task)
        out.extend(Record(r, task, task) for r in rows)
    return out
