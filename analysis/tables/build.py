"""The paper's Table 1 and Table 3, rebuilt from run directories, with its published numbers beside ours.

- Table 1 (all test users): one row per retriever (metrics.json `retriever`: full catalogue,
  history masked) and one per reranker run (`overall`: coverage-weighted), MRR/NDCG/Recall @5 and
  @10. The paper's baselines that were not given get a "not run" row, so a gap is visible.
- Table 3 (covered users): per reranker run, its retriever's order (`retriever_subset`) -> the
  reranker (`subset`), with the relative improvement.
- Significance: per reranker run, a paired bootstrap over users of reranker - retriever
  (analysis/significance.py), on the covered subset and overall.

Runs are grouped by their data section (different data, different table). Within a dataset, runs
of one method with different seeds form one row, with mean ± sample standard deviation (n - 1)
and n: retriever runs whose retriever section is the same but for `seed` (and `device`), and
reranker runs whose retriever is such a method and whose reranker section is the same but for
bookkeeping keys (`RERANKER_BOOKKEEPING`). Two runs of one method with the same seed are refused
(one would count twice). Table 3's relative improvement is that of the means; the significance
tests stay per run. Every number comes from the runs' metrics.json, except the per-user values of
the significance test, which come from rankings_<split>.jsonl and are checked against
metrics.json. Inputs are read only; nothing is written until every run has been read and checked.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import yaml

from analysis import paper
from analysis.convergence import convergence, convergence_markdown
from analysis.significance import CONFIDENCE, N_RESAMPLES, SEED, paired_tests, paired_user_values
from pipeline.atomic import write_text
from pipeline.candidates import candidates_path, rankings_path, read_rows
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON

SPLIT = "test"  # the paper's tables report the test split
# The paper's columns, in its order: MRR, NDCG, Recall at 5 then at 10.
TABLE_METRICS = tuple(f"{m}@{k}" for k in (5, 10) for m in ("MRR", "NDCG", "Recall"))
# Tested for significance: the cut-off the paper's text and our early stopping use.
SIGNIFICANCE_KS = (10,)
SIGNIFICANCE_METRICS = tuple(f"{m}@{k}" for k in SIGNIFICANCE_KS for m in ("NDCG", "Recall", "MRR"))
SCOPES = ("subset", "overall")  # significance scopes (analysis/significance.py)
# Row order of Table 1: weakest to strongest as in the paper, our extra baselines first.
RETRIEVER_ORDER = ("Popularity", "GRU4Rec", *paper.PAPER_RETRIEVERS)
# Agreement required between the per-user values from the rankings and metrics.json (both are
# means of the same numbers; anything larger means the files come from different runs).
_TOLERANCE = 1e-9
MISSING = "–"  # a cell with no number: not run, or not published in our sources
# Config keys that do not change what a run measures, left out when runs are grouped into one
# method's seeds (`seed` itself is what the runs of a method vary).
RETRIEVER_BOOKKEEPING = ("device",)
RERANKER_BOOKKEEPING = ("resume", "device", "model_cache_dir", "dataloader_workers", "save_total_limit", "logging_steps")
OUTPUT_FILES = ("table1.md", "table1.csv", "table3.md", "table3.csv", "significance.json", "significance.csv",
                "convergence.md", "convergence.csv", "tables.md")


@dataclass(frozen=True)
class Run:
    """One run directory, read and checked: what the tables need from it."""

    path: Path
    data: Mapping[str, Any]  # the config's data section
    retriever: str  # paper name of the retriever whose candidates/metrics this run holds (LRURec, ...)
    retriever_source: str  # the directory that produced those candidates (dedupes retriever rows)
    section: Mapping[str, Any]  # metrics.json[split]
    reranker_model: Optional[str] = None  # None for a retriever-only run
    label_scheme: Optional[str] = None
    seed: Any = None  # the run's config seed
    retriever_seed: Any = None  # the seed of the run that produced the candidates
    retriever_key: str = ""  # the retriever's method: runs with equal keys are seeds of one method
    reranker_key: str = ""  # reranker runs only: retriever_key + the reranker's settings

    @property
    def is_reranker(self) -> bool:
        return self.reranker_model is not None

    @property
    def reranker_name(self) -> str:
        return f"LLM reranker ({self.reranker_model}, {self.label_scheme}) on {self.retriever}"


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
        return mean_std(self.values(key, metric))[0]

    def std(self, key: str, metric: str) -> float:
        return mean_std(self.values(key, metric))[1]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
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


@dataclass
class Tables:
    """Everything reproduce_tables.py writes, as data frames plus the groups they came from."""

    split: str
    groups: list[Group]
    table1: pd.DataFrame
    table3: pd.DataFrame
    significance: pd.DataFrame
    settings: dict[str, Any]
    convergence: pd.DataFrame  # how each retriever's training ended (analysis/convergence.py)


# --- reading runs -------------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid YAML ({type(e).__name__}): regenerate the run") from None
    if not isinstance(cfg, dict):
        raise PipelineError(f"{path} is not a config mapping: regenerate the run")
    return cfg


def _config_value(cfg: Mapping[str, Any], path: Path, section: str, key: str) -> str:
    """cfg[section][key], which must be a non-empty string."""
    sec = cfg.get(section)
    value = sec.get(key) if isinstance(sec, dict) else None
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{path} has no {section}.{key}: pass a run directory written by this pipeline's scripts")
    return value


def _method_key(section: Any, leave_out: Sequence[str]) -> str:
    """A config section as canonical JSON without the keys in `leave_out`."""
    section = section if isinstance(section, dict) else {}
    return json.dumps({k: v for k, v in section.items() if k not in leave_out}, sort_keys=True, default=str)


def _retriever_of(path: Path, cfg: Mapping[str, Any], split: str) -> tuple[str, str, str, Any]:
    """(paper name, source directory, method key, seed) of the retriever behind a run. A run
    holding its own candidates (train_retriever.py, run_experiment.py) is its own source; a
    train_reranker.py run reranked `retriever_run`, whose config names the model (its own config's
    retriever section is whatever the reranker config said, not necessarily what produced the
    candidates). The key is the source's retriever section without `seed` and bookkeeping."""
    cfg_path = path / CONFIG_YAML
    model = _config_value(cfg, cfg_path, "retriever", "model")
    source, source_cfg = path, cfg
    retriever_run = cfg.get("retriever_run")
    if not candidates_path(path, split).is_file() and retriever_run:
        source = Path(retriever_run)
        if (source / CONFIG_YAML).is_file():
            source_cfg = _load_yaml(source / CONFIG_YAML)
            model = _config_value(source_cfg, source / CONFIG_YAML, "retriever", "model")
    key = _method_key(source_cfg.get("retriever"), RETRIEVER_BOOKKEEPING)
    return paper.METHOD_NAMES.get(model, model), str(source.resolve()), key, source_cfg.get("seed")


def load_run(path: str | Path, split: str = SPLIT) -> Run:
    """Read one run directory; a one-line PipelineError names what is missing and the fix."""
    path = Path(path)
    if not (path / CONFIG_YAML).is_file():
        raise PipelineError(
            f"{path} is not a run directory (no config.yaml): pass directories written by "
            "train_retriever.py, train_reranker.py or run_experiment.py"
        )
    cfg = _load_yaml(path / CONFIG_YAML)
    data = cfg.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        raise PipelineError(f"{path / 'config.yaml'} has no data.dataset: pass a run directory written by this pipeline's scripts")
    metrics_file = path / METRICS_JSON
    if not metrics_file.is_file():
        raise PipelineError(f"{path} has no metrics.json (the run did not finish): rerun it or leave it out of --runs")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{metrics_file} is not valid JSON: rerun the run") from None
    section = metrics.get(split) if isinstance(metrics, dict) else None
    if not isinstance(section, dict):
        raise PipelineError(f"{metrics_file} has no {split!r} split: pass finished runs (they measure val and test)")
    required = ["retriever"]
    is_reranker = "subset" in section
    if is_reranker:
        required += ["retriever_subset", "subset", "overall", "n_users", "n_covered"]
    for key in required:
        if key not in section:
            raise PipelineError(f"{metrics_file} [{split}] has no {key!r}: rerun the run with the current scripts")
    if is_reranker:
        n_users, n_covered = section["n_users"], section["n_covered"]
        if not (isinstance(n_users, int) and isinstance(n_covered, int) and 0 <= n_covered <= n_users and n_users > 0):
            raise PipelineError(f"{metrics_file} [{split}] has n_users {n_users!r}, n_covered {n_covered!r}: rerun the run")
    for key in ("retriever", *(("retriever_subset", "subset", "overall") if is_reranker else ())):
        missing = [m for m in TABLE_METRICS if not isinstance(section[key].get(m), (int, float))]
        if missing:
            raise PipelineError(f"{metrics_file} [{split}][{key}] has no {missing[0]}: rerun the run with the current scripts")
    retriever, source, retriever_key, retriever_seed = _retriever_of(path, cfg, split)
    seeds = dict(seed=cfg.get("seed"), retriever_seed=retriever_seed, retriever_key=retriever_key)
    if not is_reranker:
        return Run(path, data, retriever, source, section, **seeds)
    if not rankings_path(path, split).is_file():
        raise PipelineError(f"{path} has reranker metrics but no {rankings_path(path, split).name}: rerun train_reranker.py")
    return Run(
        path, data, retriever, source, section,
        reranker_model=_config_value(cfg, path / CONFIG_YAML, "reranker", "model"),
        label_scheme=_config_value(cfg, path / CONFIG_YAML, "reranker", "label_scheme"),
        reranker_key=retriever_key + "\n" + _method_key(cfg.get("reranker"), RERANKER_BOOKKEEPING),
        **seeds,
    )


def load_runs(paths: Sequence[str | Path], split: str = SPLIT) -> list[Run]:
    if not paths:
        raise PipelineError("no runs given: pass --runs RUN_DIR [RUN_DIR ...]")
    runs = [load_run(p, split) for p in paths]
    seen: dict[Path, Path] = {}
    for run in runs:
        key = run.path.resolve()
        if key in seen:
            raise PipelineError(f"run {run.path} is given twice (also as {seen[key]}): pass each run once")
        seen[key] = run.path
    return runs


# --- grouping -----------------------------------------------------------------------------------


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


# --- the tables ---------------------------------------------------------------------------------


def relative_improvement(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """(after - before) / before in percent; None when either is missing or before is 0."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before * 100.0


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
        for m in TABLE_METRICS:
            out[m] = seeds.mean(key, m) if seeds else None
        out["n"] = seeds.n if seeds else 0
        for m in TABLE_METRICS:
            out[f"{m} std"] = seeds.std(key, m) if seeds else None
        for m in TABLE_METRICS:
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
    numbers = [*TABLE_METRICS, *(f"{m} std" for m in TABLE_METRICS), *(f"paper {m}" for m in TABLE_METRICS)]
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
        coverage = mean_std([r.section["n_covered"] / r.section["n_users"] for r in s.runs])
        n_covered = mean_std([r.section["n_covered"] for r in s.runs])[0]
        for m in TABLE_METRICS:
            before, after = mean_std(s.values("retriever_subset", m)), mean_std(s.values("subset", m))
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
    settings = {
        "split": split, "runs": [str(Path(p)) for p in paths],
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": confidence,
                      "interval": "percentile", "p_value": "bootstrap shifted to the null of no difference",
                      "unit": "user (paired: the same users for reranker and retriever)"},
        "paper": {"title": paper.PAPER, "url": paper.PAPER_URL, "numbers_from": paper.NUMBERS_SOURCE},
    }
    return Tables(split, groups, t1, t3, sig, settings, conv)


# --- rendering ----------------------------------------------------------------------------------


def _num(x: Any) -> str:
    return MISSING if pd.isna(x) else f"{x:.4f}"


def _mean_std(mean: Any, std: Any) -> str:
    """"0.1234 ± 0.0056" over several seeds; one run (std NaN): its value alone."""
    return _num(mean) if pd.isna(std) else f"{_num(mean)} ± {std:.4f}"


def _run_cell(runs: str) -> str:
    """The Run column: the run directory's name; several seeds: "n=3: a, b, c"."""
    if not runs:
        return "not run"
    names = [Path(p).name for p in runs.split(";")]
    return names[0] if len(names) == 1 else f"n={len(names)}: " + ", ".join(names)


def _pct(x: Any) -> str:
    return MISSING if pd.isna(x) else f"{x:+.1f}%"


def _p(x: Any) -> str:
    return MISSING if pd.isna(x) else "<0.0001" if x < 1e-4 else f"{x:.4f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """A GitHub markdown table; columns from `align_right_from` on (the numbers) right-aligned."""
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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
    header = ["Method", "Run", "Users", *[f"{m} ours / paper" if with_paper else m for m in TABLE_METRICS]]
    rows = []
    for r in d.to_dict("records"):
        cells = [_mean_std(r[m], r[f"{m} std"]) + (f" / {_num(r[f'paper {m}'])}" if with_paper else "") for m in TABLE_METRICS]
        users = MISSING if pd.isna(r["users"]) else str(int(r["users"]))
        rows.append([r["method"], _run_cell(r["run"]), users, *cells])
    out = [f"### Table 1: all {d['split'].iloc[0]} users", "", markdown_table(header, rows, align_right_from=2)]
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
    header = ["Method", "Run", "Covered", *TABLE_METRICS]
    rows = []
    for run, r in d.groupby("run", sort=False):
        first = r.iloc[0]
        cells = {x["metric"]: f"{_mean_std(x['retriever'], x['retriever std'])} → {_mean_std(x['reranker'], x['reranker std'])} "
                 f"({_pct(x['improvement %'])})" for x in r.to_dict("records")}
        if first["n"] == 1:
            covered = f"{int(first['n_covered'])}/{int(first['n_users'])} ({first['coverage']:.1%})"
        else:
            covered = f"{first['n_covered']:.1f}/{first['n_users']} ({first['coverage']:.1%} ± {first['coverage std']:.1%})"
        rows.append([first["method"], _run_cell(run), covered, *[cells[m] for m in TABLE_METRICS]])
    if group.match.paper_dataset:
        pcells = []
        for m in TABLE_METRICS:
            before = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RETRIEVER, m)
            after = paper.published(paper.TABLE3, group.match.paper_dataset, paper.PAPER_RERANKER, m)
            pcells.append(MISSING if before is None and after is None else
                          f"{_num(before)} → {_num(after)} ({_pct(relative_improvement(before, after))})")
        rows.append([f"paper: {paper.PAPER_RETRIEVER} → {paper.PAPER_RERANKER}", MISSING, MISSING, *pcells])
    note = (["Several seeds of a method: mean ± sample standard deviation over its n runs; the improvement is that of the means.\n"]
            if (d["n"] > 1).any() else [])
    return "\n".join([
        f"### Table 3: covered {d['split'].iloc[0]} users (retriever order → reranker, relative improvement)", "",
        markdown_table(header, rows, align_right_from=2), *note,
    ])


def significance_markdown(df: pd.DataFrame, group: Group, confidence: float) -> str:
    d = df[df["dataset"] == group.label]
    if d.empty:
        return ""
    header = ["Method", "Run", "Scope", "Users", "Metric", "Retriever", "Reranker", "Difference",
              f"{confidence:.0%} CI", "CI excludes 0", "p (bootstrap)", "p (t-test)"]
    rows = [[r["method"], Path(r["run"]).name, r["scope"], str(int(r["n"])), r["metric"], _num(r["retriever"]),
             _num(r["reranker"]), f"{r['mean_diff']:+.4f}", f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
             "yes" if r["excludes_zero"] else "no", _p(r["p_bootstrap"]), _p(r["p_ttest"])] for r in d.to_dict("records")]
    return "\n".join([
        "### Significance: reranker - retriever, paired over users", "",
        markdown_table(header, rows, align_right_from=3),
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
        t1 += [intro, p1]
        t3 += [intro, p3]
        conv += [intro, pc or "No retriever run on this dataset.\n"]
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
        "tables.md": "\n".join(both),
    }


def write_outputs(tables: Tables, out: str | Path) -> dict[str, str]:
    """Render everything first, then write each file atomically into `out`."""
    texts = render(tables)
    for name, text in texts.items():
        write_text(Path(out) / name, text)
    return texts
