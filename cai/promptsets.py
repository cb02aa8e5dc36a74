"""Prompt sets: the shipped red-team and helpful prompts, a user's JSONL/CSV file, or a `datasets` name,
split once, seeded, into disjoint sl / prefs / rl / eval parts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError
from cai.records import numbered_jsonl

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
KINDS = ("red_team", "helpful")
SPLITS = ("sl", "prefs", "rl", "eval")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str  # "red_team" | "helpful"


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rows_from_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        return [row for _, _, row in numbered_jsonl(text, f"{path}:")]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise CaiError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .json, .csv or .tsv)")


def load_prompt_texts(source: str, kind: str, column: str = "prompt", split: str = "train") -> list[str]:
    """Texts of one prompt source, in file order, empty ones dropped, duplicates removed."""
    if source == "builtin":
        path, name = PACKAGE_DATA / f"{kind}.jsonl", f"builtin {kind} prompts"
        rows = _rows_from_file(path)
    elif Path(source).expanduser().exists():
        path, name = Path(source).expanduser(), source
        rows = _rows_from_file(path)
    elif source.endswith((".jsonl", ".json", ".csv", ".tsv")):
        raise CaiError(f"data.{kind}: file {source} not found")
    else:
        name = f"dataset {source}"
        try:
            import datasets

            rows = datasets.load_dataset(source, split=split)
        except Exception as err:  # the hub, a bad name, no network: one line either way
            raise CaiError(f"data.{kind}: could not load dataset {source!r} ({type(err).__name__}: {err})") from None
    texts = []
    for number, row in enumerate(rows, 1):
        if column not in row:
            columns = ", ".join(row.keys()) if hasattr(row, "keys") else type(row).__name__
            raise CaiError(f"data.{kind}: {name} has no column {column!r} (row {number} has: {columns})")
        value = row[column]
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise CaiError(f"data.{kind}: {name} holds no prompts (column {column!r} is empty everywhere)")
    return texts


def split_prompts(data_cfg, seed: int) -> dict[str, dict[str, list[Prompt]]]:
    """{split: {kind: [Prompt]}} — shuffled with the run's seed, cut by `data.fractions`.

    Each kind is shuffled on its own, so adding helpful prompts does not move the red-team split.
    A prompt that appears in both sets is kept as red-team only, so no prompt is in two splits.
    """
    texts = {kind: load_prompt_texts(getattr(data_cfg, kind), kind, data_cfg.column, data_cfg.split) for kind in KINDS}
    red = set(texts["red_team"])
    texts["helpful"] = [t for t in texts["helpful"] if t not in red]
    out: dict[str, dict[str, list[Prompt]]] = {split: {} for split in SPLITS}
    for kind in KINDS:
        items = list(texts[kind])
        random.Random(f"{seed}:{kind}").shuffle(items)
        if data_cfg.limit is not None:
            items = items[: data_cfg.limit]
        start = 0
        for index, split in enumerate(SPLITS):
            share = data_cfg.fractions[split]
            end = len(items) if index == len(SPLITS) - 1 else start + round(share * len(items))
            out[split][kind] = [Prompt(prompt_id(t), t, kind) for t in items[start:end]]
            start = end
    return out
