"""Prompt sets: the shipped red-team and helpful prompts, a user's JSONL/CSV file, or a `datasets` name,
split once, seeded, into disjoint sl / prefs / rl / eval parts (and val, a validation split that selects
RL snapshots, when `data.fractions` gives it a share).
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
SPLITS = ("sl", "prefs", "rl", "val", "eval")  # val: optional (data.fractions.val), empty unless given


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str  # "red_team" | "helpful"
    # What a generated prompt probes (`cai redteam` writes them on each row): the constitution's principle
    # id and the attack style; None for prompts that do not say.
    principle: str | None = None
    style: str | None = None


def _probe_fields(row) -> dict:
    """A row's `principle` and `style` (text fields written by `cai redteam`), where it has them."""
    get = row.get if hasattr(row, "get") else (lambda key: None)
    return {key: get(key) for key in ("principle", "style") if isinstance(get(key), str) and get(key)}


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
    return list(load_prompt_rows(source, kind, column, split))


def load_prompt_rows(source: str, kind: str, column: str = "prompt", split: str = "train") -> dict[str, dict]:
    """{text: its principle/style fields} of one prompt source, in file order, empty texts dropped,
    duplicates removed. A row whose own `kind` names the other kind (a `cai redteam` file holds both) is
    left out, so one generated file serves as data.red_team and as data.helpful."""
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
    texts: dict[str, dict] = {}
    other_kind = 0
    for number, row in enumerate(rows, 1):
        if column not in row:
            columns = ", ".join(row.keys()) if hasattr(row, "keys") else type(row).__name__
            raise CaiError(f"data.{kind}: {name} has no column {column!r} (row {number} has: {columns})")
        row_kind = row.get("kind") if hasattr(row, "get") else None
        if row_kind in KINDS and row_kind != kind:
            other_kind += 1
            continue
        value = row[column]
        if isinstance(value, str) and value.strip():
            texts.setdefault(value.strip(), _probe_fields(row))
    if not texts:
        also = f"; {other_kind} rows say kind is not {kind}" if other_kind else ""
        raise CaiError(f"data.{kind}: {name} holds no prompts (column {column!r} is empty everywhere{also})")
    return texts


def split_prompts(data_cfg, seed: int) -> dict[str, dict[str, list[Prompt]]]:
    """{split: {kind: [Prompt]}} — shuffled with the run's seed, cut by `data.fractions`.

    Each kind is shuffled on its own, so adding helpful prompts does not move the red-team split.
    A prompt that appears in both sets is kept as red-team only, so no prompt is in two splits.
    """
    fields = {kind: load_prompt_rows(getattr(data_cfg, kind), kind, data_cfg.column, data_cfg.split) for kind in KINDS}
    texts = {kind: list(rows) for kind, rows in fields.items()}
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
            share = data_cfg.fractions.get(split, 0.0)
            end = len(items) if index == len(SPLITS) - 1 else start + round(share * len(items))
            out[split][kind] = [Prompt(prompt_id(t), t, kind, **fields[kind][t]) for t in items[start:end]]
            start = end
    return out


def prompt_files(entries) -> list[tuple[str, str]]:
    """(path, kind) of each `eval.prompts` entry: a path (kind custom) or {file, kind}."""
    return [(entry, "custom") if isinstance(entry, str) else (entry.file, entry.kind) for entry in entries]


def load_prompt_file(path: str, kind: str = "custom") -> list[Prompt]:
    """A user's eval prompts: JSONL rows with a `prompt` field; a row's own `kind` (red_team | helpful)
    overrides the file's `kind`. Red-team prompts get harmlessness grades, helpful ones refusal grades."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CaiError(f"eval.prompts: file {path} not found")
    prompts = []
    for number, _, row in numbered_jsonl(file.read_text(encoding="utf-8"), f"eval.prompts: {path}"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            has = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise CaiError(f"eval.prompts: {path} line {number} has no 'prompt' text field (it has: {has or 'nothing'})")
        row_kind = row.get("kind", kind)
        if row_kind not in ("red_team", "helpful", "custom"):
            raise CaiError(f"eval.prompts: {path} line {number}: kind must be red_team or helpful, got {row_kind!r}")
        if row["prompt"].strip():
            prompts.append(Prompt(prompt_id(row["prompt"].strip()), row["prompt"].strip(), row_kind, **_probe_fields(row)))
    if not prompts:
        raise CaiError(f"eval.prompts: {path} holds no prompts")
    return prompts


def training_overlap(splits: dict[str, dict[str, list[Prompt]]], prompts: list[Prompt]) -> list[Prompt]:
    """The `prompts` that also sit in a training split (sl, prefs, rl) or in val (which selects the RL
    policy): evaluating on them is not held out."""
    trained = {p.id for split in ("sl", "prefs", "rl", "val") for kind in splits[split].values() for p in kind}
    return [p for p in prompts if p.id in trained]
