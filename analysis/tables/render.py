"""The paper's tables as text: markdown per dataset (Table 1, Table 3, significance, convergence),
CSV and JSON, and writing them (every file rendered before the first is written)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis import paper
from analysis.tables.build import Tables, relative_improvement
from analysis.tables.cells import MISSING, mean_std_cell, number_cell, p_cell, pct_cell, run_cell, table
from analysis.tables.convergence import convergence_markdown, kept_curves_markdown
from analysis.tables.group import Group, not_run
from analysis.tables.read import PAPER_METRICS
from pipeline.atomic import write_text

OUTPUT_FILES = ("table1.md", "table1.csv", "table3.md", "table3.csv", "significance.json", "significance.csv",
                "convergence.md", "convergence.csv", "kept_curves.csv", "tables.md")


def _group_intro(group: Group) -> str:
    lines = [f"## {group.label}", ""]
    if group.match.paper_dataset:
        lines.append(f"Paper dataset: {group.match.paper_dataset}.")
    else:
        lines.append("Not one of the paper's datasets: no published numbers to compare with.")
    lines += [f"- Note: {note}." for note in group.match.notes]
    return "\n".join(lines) + "\n"


def table1_markdown(df: pd.DataFrame, group: Group) -> str:
    d = df[df["dataset"] == group.label]
    with_paper = group.match.paper_dataset is not None
    header = ["Method", "Run", "Users", *[f"{m} ours / paper" if with_paper else m for m in PAPER_METRICS]]
    rows = []
    for r in d.to_dict("records"):
        cells = [mean_std_cell(r[m], r[f"{m} std"]) + (f" / {number_cell(r[f'paper {m}'])}" if with_paper else "") for m in PAPER_METRICS]
        users = MISSING if pd.isna(r["users"]) else str(int(r["users"]))
        rows.append([r["method"], run_cell(r["run"]), users, *cells])
    out = [f"### Table 1: all {d['split'].iloc[0]} users", "", table(header, rows, text_columns=2)]
    if (d["n"] > 1).any():
        out.append("Several seeds of a method: mean ± sample standard deviation over its n runs (Run: n=<runs>: their directories).\n")
    missing = not_run(group)
    if missing:
        out.append(f"Not run: {', '.join(missing)} (the paper's baselines; pass their run directories with --runs to fill the rows).\n")
    out.append("Retrievers: full catalogue, the user's history masked. Rerankers: their 20 candidates, "
               "coverage-weighted (a user whose target is not a candidate scores 0).\n")
    return "\n".join(out)


def table3_markdown(df: pd.DataFrame, group: Group) -> str:
    d = df[df["dataset"] == group.label]
    if d.empty:
        return "### Table 3: covered users\n\nNo reranker run on this dataset.\n"
    header = ["Method", "Run", "Covered", *PAPER_METRICS]
    rows = []
    for run, r in d.groupby("run", sort=False):
        first = r.iloc[0]
        cells = {x["metric"]: f"{mean_std_cell(x['retriever'], x['retriever std'])} → {mean_std_cell(x['reranker'], x['reranker std'])} "
                 f"({pct_cell(x['improvement %'])})" for x in r.to_dict("records")}
        if first["n"] == 1:
            covered = f"{int(first['n_covered'])}/{int(first['n_users'])} ({first['coverage']:.1%})"
        else:
            covered = f"{first['n_covered']:.1f}/{first['n_users']} ({first['coverage']:.1%} ± {first['coverage std']:.1%})"
        rows.append([first["method"], run_cell(run), covered, *[cells[m] for m in PAPER_METRICS]])
    if group.match.paper_dataset:
        pcells = []
        for m in PAPER_METRICS:
            before = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RETRIEVER, m)
            after = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RERANKER, m)
            pcells.append(MISSING if before is None and after is None else
                          f"{number_cell(before)} → {number_cell(after)} ({pct_cell(relative_improvement(before, after))})")
        rows.append([f"paper: {paper.PAPER_RETRIEVER} → {paper.PAPER_RERANKER}", MISSING, MISSING, *pcells])
    note = (["Several seeds of a method: mean ± sample standard deviation over its n runs; the improvement is that of the means.\n"]
            if (d["n"] > 1).any() else [])
    return "\n".join([
        f"### Table 3: covered {d['split'].iloc[0]} users (retriever order → reranker, relative improvement)", "",
        table(header, rows, text_columns=2), *note,
    ])


def significance_markdown(df: pd.DataFrame, group: Group, confidence: float) -> str:
    d = df[df["dataset"] == group.label]
    if d.empty:
        return ""
    header = ["Method", "Run", "Scope", "Users", "Metric", "Retriever", "Reranker", "Difference",
              f"{confidence:.0%} CI", "CI excludes 0", "p (bootstrap)", "p (t-test)"]
    rows = [[r["method"], Path(r["run"]).name, r["scope"], str(int(r["n"])), r["metric"], number_cell(r["retriever"]),
             number_cell(r["reranker"]), f"{r['mean_diff']:+.4f}", f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
             "yes" if r["excludes_zero"] else "no", p_cell(r["p_bootstrap"]), p_cell(r["p_ttest"])] for r in d.to_dict("records")]
    return "\n".join([
        "### Significance: reranker - retriever, paired over users", "",
        table(header, rows, text_columns=3),
        "Paired bootstrap over users; \"overall\" counts every test user (an uncovered user scores 0 for both).\n",
    ])


def _preamble(tables: Tables) -> str:
    s = tables.settings
    b = s["bootstrap"]
    return "\n".join([
        f"Split: {tables.split}. Runs: {', '.join(s['runs'])}.",
        f"Published numbers: {paper.PAPER} ({paper.PAPER_URL}): {paper.NUMBERS_SOURCE}; "
        f"\"{MISSING}\" = not run, or not published in our sources.",
        f"Significance: paired bootstrap over users, {b['resamples']} resamples, seed {b['seed']}, "
        f"{b['confidence']:.0%} percentile interval; paired t-test where scipy is installed.",
    ]) + "\n"


def render(tables: Tables) -> dict[str, str]:
    """File name -> text of every output."""
    conf = tables.settings["bootstrap"]["confidence"]
    t1 = [f"# Table 1: all {tables.split} users", "", _preamble(tables)]
    t3 = [f"# Table 3: covered {tables.split} users", "", _preamble(tables)]
    both = ["# The paper's tables, reproduced", "", _preamble(tables)]
    conv = [f"# Retriever training: {tables.split} metrics", ""]
    for g in tables.groups:
        intro = _group_intro(g)
        p1, p3 = table1_markdown(tables.table1, g), table3_markdown(tables.table3, g)
        ps = significance_markdown(tables.significance, g, conf)
        pc = convergence_markdown(tables.convergence, g.label)
        pk = kept_curves_markdown(tables.kept_curves, g.label)
        t1 += [intro, p1]
        t3 += [intro, p3]
        conv += [intro, pc or "No retriever run on this dataset.\n"] + ([pk] if pk else [])
        both += [intro, p1] + ([pc] if pc else []) + [p3] + ([ps] if ps else [])
    sig = tables.significance.astype(object).where(tables.significance.notna(), None)
    return {
        "table1.md": "\n".join(t1),
        "table1.csv": tables.table1.to_csv(index=False),
        "table3.md": "\n".join(t3),
        "table3.csv": tables.table3.to_csv(index=False),
        "significance.csv": tables.significance.to_csv(index=False),
        "significance.json": json.dumps({**tables.settings, "tests": sig.to_dict("records")}, indent=2) + "\n",
        "convergence.md": "\n".join(conv),
        "convergence.csv": tables.convergence.to_csv(index=False),
        "kept_curves.csv": tables.kept_curves.to_csv(index=False),
        "tables.md": "\n".join(both),
    }


def write_outputs(tables: Tables, out: str | Path) -> dict[str, str]:
    """Render everything first, then write each file atomically into `out`."""
    texts = render(tables)
    for name, text in texts.items():
        write_text(Path(out) / name, text)
    return texts
