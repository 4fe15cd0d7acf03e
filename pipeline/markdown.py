"""Markdown tables, the one way every report of the project writes them (metrics.md, the paper's
tables, comparisons, benchmarks)."""
from __future__ import annotations

from typing import Sequence

RULES = {"l": "---", "r": "---:"}  # a column's alignment -> its cell in the rule under the header


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "", *, spaced_rule: bool = False,
    escape_pipes: bool = False,
) -> str:
    """A GitHub markdown table as lines joined by "\\n", without a final newline (callers place it
    among their own lines). `align`: one letter per column, "l" (left) or "r" (right, for numbers);
    columns past its end are left-aligned. `spaced_rule`: "| --- | ---: |" rather than "|---|---:|".
    `escape_pipes`: a "|" inside a row's cell is written "\\|" (header cells are ours, never escaped).
    An empty header cell (a column of row names) is written "| |"."""
    if any(a not in RULES for a in align) or len(align) > len(header):
        raise ValueError(f"align {align!r}: one of 'l', 'r' per column ({len(header)} columns)")
    rule = [RULES[a] for a in align.ljust(len(header), "l")]
    head = "|" + "|".join(f" {cell} " if cell else " " for cell in header) + "|"
    lines = [head, "| " + " | ".join(rule) + " |" if spaced_rule else "|" + "|".join(rule) + "|"]
    for row in rows:
        cells = [str(cell).replace("|", "\\|") for cell in row] if escape_pipes else [str(cell) for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
