"""Shared writer of the benchmark tables: ``<name>.md`` (Markdown) and ``<name>.csv``."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_table(name: str, title: str, notes: str, rows: Sequence[Mapping[str, object]],
                columns: Sequence[str] | None = None, out: str | Path = RESULTS) -> Path:
    """Write ``rows`` as ``out/name.csv`` and ``out/name.md`` (title, notes, table); returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(columns or (rows[0].keys() if rows else []))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
