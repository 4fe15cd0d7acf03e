"""The tables as data frames (nothing written): Table 1, Table 3 and the significance tests per
dataset, and `build_tables`, which reads every run first (see the package's doc for the rules)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from analysis import paper
from analysis.significance import CONFIDENCE, N_RESAMPLES, SEED, paired_tests, paired_user_values
from analysis.tables.convergence import convergence, kept_curves
from analysis.tables.group import Group, Seeds, group_runs, mean_and_std, not_run, reranker_seeds, retriever_seeds
from analysis.tables.read import PAPER_METRICS, SPLIT, load_runs
from pipeline.candidates import rankings_path, read_rows
from pipeline.errors import PipelineError

# Tested for significance: the cut-off the paper's text and our early stopping use.
SIGNIFICANCE_KS = (10,)
SIGNIFICANCE_METRICS = tuple(f"{m}@{k}" for k in SIGNIFICANCE_KS for m in ("NDCG", "Recall", "MRR"))
SCOPES = ("subset", "overall")  # significance scopes (analysis/significance.py)
# Row order of Table 1: weakest to strongest as in the paper, our extra baselines first.
RETRIEVER_ORDER = ("Popularity", "GRU4Rec", *paper.PAPER_RETRIEVERS)
# Agreement required between the per-user values from the rankings and metrics.json (both are
# means of the same numbers; anything larger means the files come from different runs).
_TOLERANCE = 1e-9


@dataclass
class Tables:
    """Everything reproduce_tables.py writes, as data frames plus the groups they came from."""

    split: str
    groups: list[Group]
    table1: pd.DataFrame
    table3: pd.DataFrame
    significance: pd.DataFrame
    settings: dict[str, Any]
    convergence: pd.DataFrame  # how each retriever's training ended (analysis.tables.convergence)
    kept_curves: pd.DataFrame  # each retriever seed run's validation curve around its kept epoch


def relative_improvement(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """(after - before) / before in percent; None when either is missing or before is 0."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before * 100.0


def _joined_runs(seeds: Optional[Seeds]) -> str:
    return ";".join(str(r.path) for r in seeds.runs) if seeds else ""


def _users(seeds: Optional[Seeds]) -> Optional[int]:
    """The runs' n_users when they agree (same data: they do), else None."""
    counts = {r.section.get("n_users") for r in seeds.runs} if seeds else {None}
    return counts.pop() if len(counts) == 1 else None


def table1(group: Group, split: str) -> pd.DataFrame:
    """Paper Table 1 for one dataset: every retriever method (all users, full catalogue), the
    paper's baselines not run, every reranker method (overall), each the mean over its seed runs
    (`run`: their paths joined by ";", `n`: how many, `<metric> std`: sample standard deviation,
    NaN for one run); `paper <metric>` columns hold the published numbers (NaN where none)."""
    pd_name = group.match.paper_dataset

    def row(method: str, kind: str, seeds: Optional[Seeds], key: str, paper_method: Optional[str]) -> dict:
        out: dict[str, Any] = {
            "dataset": group.label, "paper dataset": pd_name, "split": split, "method": method, "kind": kind,
            "run": _joined_runs(seeds), "users": _users(seeds),
        }
        for m in PAPER_METRICS:
            out[m] = seeds.mean(key, m) if seeds else None
        out["n"] = seeds.n if seeds else 0
        for m in PAPER_METRICS:
            out[f"{m} std"] = seeds.std(key, m) if seeds else None
        for m in PAPER_METRICS:
            out[f"paper {m}"] = paper.published(paper.TABLE1, pd_name, paper_method, m) if paper_method else None
        return out

    order = {name: i for i, name in enumerate(RETRIEVER_ORDER)}
    rows = [row(s.method, "retriever", s, "retriever", s.method) for s in retriever_seeds(group)]
    rows += [row(name, "not run", None, "", name) for name in not_run(group)]
    rows.sort(key=lambda r: order.get(r["method"], len(order)))  # stable: rows of one model keep their order
    for s in reranker_seeds(group):
        paper_method = paper.PAPER_RERANKER if s.runs[0].retriever == paper.PAPER_RETRIEVER else None
        rows.append(row(s.method, "reranker", s, "overall", paper_method))
    df = pd.DataFrame(rows)
    df["users"] = df["users"].astype("Int64")  # a count; "not run" rows have none
    numbers = [*PAPER_METRICS, *(f"{m} std" for m in PAPER_METRICS), *(f"paper {m}" for m in PAPER_METRICS)]
    df[numbers] = df[numbers].astype(float)  # NaN where there is no number
    return df


TABLE3_COLUMNS = (
    "dataset", "paper dataset", "split", "method", "run", "n", "coverage", "coverage std", "n_covered", "n_users", "metric",
    "retriever", "retriever std", "reranker", "reranker std", "improvement %", "paper retriever", "paper reranker",
    "paper improvement %",
)


def table3(group: Group, split: str) -> pd.DataFrame:
    """Paper Table 3 for one dataset, one row per (reranker method, metric): the retriever's order
    -> the reranker on the covered users, each the mean over the method's seed runs (`std`: sample
    standard deviation, NaN for one run; `coverage`, `n_covered`: means), the relative improvement
    of the means %, and the published numbers where the method is LRURec -> reranker (the paper's
    setting)."""
    rows = []
    for s in reranker_seeds(group):
        is_paper_setting = s.runs[0].retriever == paper.PAPER_RETRIEVER
        coverage = mean_and_std([r.section["n_covered"] / r.section["n_users"] for r in s.runs])
        n_covered = mean_and_std([r.section["n_covered"] for r in s.runs])[0]
        for m in PAPER_METRICS:
            before, after = mean_and_std(s.values("retriever_subset", m)), mean_and_std(s.values("subset", m))
            p_before = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RETRIEVER, m) if is_paper_setting else None
            p_after = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RERANKER, m) if is_paper_setting else None
            rows.append({
                "dataset": group.label, "paper dataset": group.match.paper_dataset, "split": split,
                "method": s.method, "run": _joined_runs(s), "n": s.n, "coverage": coverage[0], "coverage std": coverage[1],
                "n_covered": int(n_covered) if s.n == 1 else n_covered, "n_users": _users(s), "metric": m,
                "retriever": before[0], "retriever std": before[1], "reranker": after[0], "reranker std": after[1],
                "improvement %": relative_improvement(before[0], after[0]),
                "paper retriever": p_before, "paper reranker": p_after,
                "paper improvement %": relative_improvement(p_before, p_after),
            })
    df = pd.DataFrame(rows, columns=list(TABLE3_COLUMNS))
    numbers = ["coverage std", "retriever std", "reranker std", "improvement %", "paper retriever", "paper reranker", "paper improvement %"]
    df[numbers] = df[numbers].astype(float)  # NaN where there is no number
    return df


def significance(
    group: Group, split: str, n_resamples: int = N_RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Paired bootstrap (and t-test) of reranker - retriever per reranker run, on the covered
    users and on all users, from the run's rankings file (checked against its metrics.json)."""
    rows = []
    for run in group.runs:
        if not run.is_reranker:
            continue
        sec = run.section
        rankings = read_rows(rankings_path(run.path, split))
        if len(rankings) != sec["n_covered"]:
            raise PipelineError(
                f"{rankings_path(run.path, split)} has {len(rankings)} users but metrics.json says {sec['n_covered']} "
                "covered: the files come from different runs; rerun the reranker"
            )
        values = paired_user_values(rankings, int(sec["n_users"]), SIGNIFICANCE_KS)
        for system, key in (("retriever", "retriever_subset"), ("reranker", "subset")):
            for m in SIGNIFICANCE_METRICS:
                mean = float(values["subset"][system][m].mean()) if sec["n_covered"] else 0.0
                if not math.isclose(mean, float(sec[key][m]), rel_tol=0.0, abs_tol=_TOLERANCE):
                    raise PipelineError(
                        f"{rankings_path(run.path, split)} gives {key} {m} = {mean:.6f} but metrics.json says "
                        f"{float(sec[key][m]):.6f}: the files come from different runs; rerun the reranker"
                    )
        for scope in SCOPES:
            if scope == "subset" and sec["n_covered"] == 0:
                continue  # no covered users: nothing to compare (overall is then all zeros)
            tests = paired_tests(values[scope]["retriever"], values[scope]["reranker"], SIGNIFICANCE_METRICS, n_resamples, seed, confidence)
            for m, res in tests.items():
                rows.append({"dataset": group.label, "split": split, "method": run.reranker_name, "run": str(run.path),
                             "scope": scope, "metric": m, **res.to_dict()})
    return pd.DataFrame(rows, columns=[
        "dataset", "split", "method", "run", "scope", "metric", "n", "retriever", "reranker", "mean_diff",
        "ci_low", "ci_high", "excludes_zero", "p_bootstrap", "t", "p_ttest",
    ])


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The groups' frames stacked; groups without rows (no reranker run) add nothing."""
    filled = [f for f in frames if not f.empty]
    return pd.concat(filled, ignore_index=True) if filled else frames[0]


def build_tables(
    paths: Sequence[str | Path], split: str = SPLIT, n_resamples: int = N_RESAMPLES, seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Tables:
    """Read every run, build Table 1, Table 3 and the significance tests (nothing is written)."""
    groups = group_runs(load_runs(paths, split))
    frames = ([table1(g, split) for g in groups], [table3(g, split) for g in groups],
              [significance(g, split, n_resamples, seed, confidence) for g in groups])
    t1, t3, sig = (_concat(f) for f in frames)
    conv = _concat([convergence(g, split) for g in groups])
    curves = _concat([kept_curves(g, split) for g in groups])
    settings = {
        "split": split, "runs": [str(Path(p)) for p in paths],
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": confidence,
                      "interval": "percentile", "p_value": "bootstrap shifted to the null of no difference",
                      "unit": "user (paired: the same users for reranker and retriever)"},
        "paper": {"title": paper.PAPER, "url": paper.PAPER_URL, "numbers_from": paper.NUMBERS_SOURCE},
    }
    return Tables(split, groups, t1, t3, sig, settings, conv, curves)
