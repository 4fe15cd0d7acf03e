"""The tables' cells as text (numbers, mean ± std, percentages, p-values, run names) and their
markdown table style: shared by the paper's tables (render.py) and the convergence table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from pipeline.markdown import markdown_table

MISSING = "–"  # a cell with no number: not run, or not published in our sources


def number_cell(x: Any) -> str:
    return MISSING if pd.isna(x) else f"{x:.4f}"


def mean_std_cell(mean: Any, std: Any, digits: int = 4) -> str:
    """"0.1234 ± 0.0056" over several seeds; one run (std NaN): its value alone; no value: MISSING."""
    if pd.isna(mean):
        return MISSING
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def run_cell(runs: str) -> str:
    """The Run column: the run directory's name; several seeds: "n=3: a, b, c"."""
    if not runs:
        return "not run"
    names = [Path(p).name for p in runs.split(";")]
    return names[0] if len(names) == 1 else f"n={len(names)}: " + ", ".join(names)


def pct_cell(x: Any) -> str:
    return MISSING if pd.isna(x) else f"{x:+.1f}%"


def p_cell(x: Any) -> str:
    return MISSING if pd.isna(x) else "<0.0001" if x < 1e-4 else f"{x:.4f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """The tables' markdown table, ending in a newline: the first `text_columns` columns
    left-aligned, the numbers after them right-aligned; "|" in a cell escaped."""
    align = "l" * text_columns + "r" * (len(header) - text_columns)
    return markdown_table(header, rows, align, spaced_rule=True, escape_pipes=True) + "\n"
