"""A benchmark's own section of benchmarks/RESULTS.md, between its markers, replaced in place on a rerun."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` between `<!-- name: begin -->` and `<!-- name: end -->` (appended the first time)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    current = path.read_text()
    section = f"{begin}\n{text}\n{end}"
    if begin in current:
        current = current.split(begin)[0] + section + current.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)
