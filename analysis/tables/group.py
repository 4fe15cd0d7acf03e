"""Grouping runs: by dataset (`Group`, one data section), then by method (`Seeds`: the seed runs
of one table row), and the seed statistics (mean, sample standard deviation) of a row."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from analysis import paper
from analysis.tables.read import Run
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Seeds:
    """The runs of one method (one row of a table), its seeds, and their metric sections."""

    method: str
    kind: str  # "retriever" or "reranker"
    runs: tuple[Run, ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, key: str, metric: str) -> list[float]:
        return [float(r.section[key][metric]) for r in self.runs]

    def mean(self, key: str, metric: str) -> float:
        return mean_and_std(self.values(key, metric))[0]

    def std(self, key: str, metric: str) -> float:
        return mean_and_std(self.values(key, metric))[1]


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1); the deviation is NaN for a single value."""
    mean = math.fsum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class Group:
    """The runs on one dataset (one data section) and how that data relates to the paper's."""

    label: str
    data: Mapping[str, Any]
    match: paper.DataMatch
    runs: list[Run] = field(default_factory=list)


def _data_key(data: Mapping[str, Any]) -> str:
    """Runs on the same data have the same data section (the cache directory aside)."""
    return json.dumps({k: v for k, v in data.items() if k != "cache_dir"}, sort_keys=True, default=str)


def _data_label(data: Mapping[str, Any], match: paper.DataMatch) -> str:
    dataset = data["dataset"]
    if dataset == "ml-100k":
        label = "ml-100k (classic MovieLens 100K)"
    elif dataset == "amazon":
        label = f"amazon {data.get('category')}"
    elif dataset == "generic":
        label = f"generic ({data.get('path')})"
    else:
        label = str(dataset)
    if match.paper_dataset and not match.notes:
        label += f" = the paper's {match.paper_dataset}"
    if data.get("max_users"):
        label += f", first {data['max_users']} users"
    return label


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by data section, in the order their datasets first appear."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = _data_key(run.data)
        if key not in groups:
            match = paper.match_dataset(run.data)
            groups[key] = Group(_data_label(run.data, match), run.data, match)
        groups[key].runs.append(run)
    labels = [g.label for g in groups.values()]
    for i, g in enumerate(groups.values()):  # same label, different settings (e.g. min_rating)
        if labels.count(g.label) > 1:
            g.label += f" [data settings {i + 1}]"
    return list(groups.values())


def retriever_runs(group: Group) -> list[Run]:
    """One run per retriever source: the retriever's own run when given (full-catalogue metrics
    straight from it), else the first reranker run that reranked its candidates (its metrics.json
    holds a copy of the retriever's)."""
    chosen: dict[str, Run] = {}
    for run in sorted(group.runs, key=lambda r: r.retriever_source != str(r.path.resolve())):
        chosen.setdefault(run.retriever_source, run)
    return list(chosen.values())


def _by_method(runs: Sequence[Run], key, seed, method, kind: str) -> list[Seeds]:
    """`runs` grouped by key(run), in first-appearance order; one seed(run) twice is refused."""
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        same = grouped.setdefault(key(run), [])
        twin = next((r for r in same if seed(r) == seed(run)), None)
        if twin is not None:
            raise PipelineError(
                f"runs {twin.path} and {run.path} are both {method(run)} with seed {seed(run)!r} and the same settings: "
                "pass one of them (runs of one method are averaged over their seeds)"
            )
        same.append(run)
    return [Seeds(method(rs[0]), kind, tuple(rs)) for rs in grouped.values()]


def retriever_seeds(group: Group) -> list[Seeds]:
    """One row per retriever method (paper name + retriever settings but the seed), over its seed runs."""
    return _by_method(retriever_runs(group), lambda r: f"{r.retriever}\n{r.retriever_key}", lambda r: r.retriever_seed,
                      lambda r: r.retriever, "retriever")


def reranker_seeds(group: Group) -> list[Seeds]:
    """One row per reranker method (its retriever's method + reranker settings but the seeds), over
    its runs; a run's seed is the pair (retriever's seed, reranker's seed)."""
    runs = [r for r in group.runs if r.is_reranker]
    return _by_method(runs, lambda r: f"{r.reranker_name}\n{r.reranker_key}", lambda r: (r.retriever_seed, r.seed),
                      lambda r: r.reranker_name, "reranker")


def not_run(group: Group) -> list[str]:
    """The paper's Table 1 baselines with no run on this dataset."""
    have = {r.retriever for r in retriever_runs(group)}
    return [name for name in paper.PAPER_RETRIEVERS if name not in have]
