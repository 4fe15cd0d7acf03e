"""Reranker variants on the same candidates, compared in one table.

A comparison (scripts/compare_labels.py, scripts/compare_training.py) is a config whose
`analysis.variants` maps a name to reranker overrides. Every variant shares the data, the
retriever's candidates, the model, the seed and every other setting, so the table isolates what
the overrides change. Each variant is a complete reranker run directory (<out>/<name>/, the same
files train_reranker.py writes); finished variants are kept when the comparison is run again, so
adding a third scheme to the config trains only that one.

Candidates come from `retriever_run` when the config sets it, else a retriever is trained once
into <out>/retriever/.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import yaml

from pipeline.candidates import candidates_path, rankings_path, raw_scores, read_rows
from pipeline.config import Config, variant_config
from pipeline.errors import PipelineError
from pipeline.markdown import markdown_table
from pipeline.metrics import candidate_rank, per_user_metrics
from pipeline.run_files import ADAPTER_DIR, CONFIG_YAML, METRICS_JSON
from pipeline.rundir import RunDir
from pipeline.significance import paired_tests
from rerank.prompting.style import PromptStyle, style_difference
from rerank.training.pretrain import PRETRAIN_SUMMARY

RETRIEVER_DIR = "retriever"
SPLIT = "test"  # the split compared (the paper's tables are test)
TABLE_COLUMNS = ("NDCG@5", "Recall@5", "NDCG@10", "Recall@10", "MRR@10")


def candidates_source(cfg: Config, out: Path) -> Path:
    """The retriever run whose candidates every variant reranks: `retriever_run`, or one trained
    into <out>/retriever (kept when already finished)."""
    if cfg.retriever_run:
        src = Path(cfg.retriever_run)
        if not candidates_path(src, SPLIT).is_file():
            raise PipelineError(f"retriever_run {src} holds no {candidates_path(src, SPLIT).name}: run scripts/train_retriever.py first")
        return src
    from retrieval.run import train_retriever  # only when this comparison trains its own retriever

    src = out / RETRIEVER_DIR
    # Resumed: a finished retriever is kept, an unfinished one (a killed comparison) continues.
    run = RunDir(src).start(cfg, resume=True)
    train_retriever(cfg, run, resume=True)
    run.finish()
    return src


def run_variants(cfg: Config, out: Path, argv: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Train and rank every variant of `cfg.analysis.variants` into <out>/<name>; returns name -> dir."""
    from rerank.run import rerank_run

    if not cfg.analysis.variants:
        raise PipelineError("analysis.variants is empty: list the variants to compare (name: {reranker overrides})")
    source = candidates_source(cfg, out)
    dirs = {}
    for name in cfg.analysis.variants:
        vcfg = variant_config(cfg, name)
        vdir = out / name
        dirs[name] = vdir
        if _finished_variant(vdir, vcfg):
            print(f"variant {name}: kept the finished run in {vdir}")
            continue
        # An unfinished variant (a killed comparison) continues from its checkpoints and partial
        # rankings; RunDir refuses one started with another config.
        resume = vdir.is_dir() and any(vdir.iterdir())
        print(f"variant {name}: {'resuming' if resume else 'training'} into {vdir}")
        run = RunDir(vdir).start(vcfg, list(argv) if argv is not None else None, resume=resume)
        rerank_run(vcfg, run, source, resume=resume)
        run.finish()
    return dirs


def _finished_variant(vdir: Path, vcfg: Config) -> bool:
    """True when `vdir` holds a finished run of exactly this variant config. A finished run made
    with another config is an error (RunDir's resume check), never silently reused."""
    if not (vdir / METRICS_JSON).is_file() or not rankings_path(vdir, SPLIT).is_file():
        return False
    RunDir(vdir).check(vcfg, resume=True)
    # The same config can mean another prompt once the code's formats change: the saved style decides.
    diff = style_difference(PromptStyle.load(vdir / ADAPTER_DIR), vcfg.reranker)
    if diff is not None:
        field_name, old, new = diff
        raise PipelineError(
            f"{vdir} was trained on other prompts ({field_name}: {old!r} there, {new!r} in this code): "
            f"delete {vdir} to retrain it under the current prompts, or check out the code that made it"
        )
    return True


# ----------------------------------------------------------------------------------------
# What a variant run measured


def valid_label_mass(rankings: Sequence[dict[str, Any]]) -> list[float]:
    """Per user, the probability the model puts on the labels in use: each score is the log-prob
    of one label's complete token sequence (a label that another extends is scored with its end
    token, so the events are disjoint) and the mass is the sum of their exponentials, <= 1. The rest
    went to tokens that are not a label. Only meaningful with rank_permutations = 1 (averaged
    log-probs are not log-probs). The scores are the LLM's raw ones (`raw_scores`: before
    calibration and fusion, which are no log-probs)."""
    return [sum(math.exp(s) for s in raw_scores(row)) for row in rankings]


@dataclass
class VariantResult:
    name: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]  # metrics.json[SPLIT]
    train: dict[str, Any]  # train_summary.json
    mass: Optional[list[float]]  # valid_label_mass per ranked user; None when scores are averaged or no log-probs
    k: int  # candidates per ranked prompt (the labels in use are the scheme's first k)
    pretrain: Optional[dict[str, Any]] = None  # pretrain_summary.json of a two-stage run
    llm_ranks: Optional[dict[str, Optional[int]]] = None  # user -> the target's rank by the LLM alone (`llm_rank`)

    @property
    def train_seconds(self) -> Optional[float]:
        """Training time of both stages (stage 1 only in two-stage runs)."""
        secs = self.train.get("train_runtime_s")
        if secs is not None and self.pretrain and self.pretrain.get("train_runtime_s") is not None:
            secs += self.pretrain["train_runtime_s"]
        return secs

    def label_summary(self) -> dict[str, Any]:
        """The variant's labels as its tokenizer sees them at the answer position: how many take
        more than one token, which are scored with the end token, and the valid-label mass."""
        from rerank.model.adapter import resolve_adapter_dir
        from rerank.model.sources import load_tokenizer
        from rerank.prompting.prompts import label_tokens
        from rerank.prompting.style import PromptStyle

        rr = self.config["reranker"]
        style = PromptStyle.load(resolve_adapter_dir(self.path))
        tokens = label_tokens(load_tokenizer(rr["model"], rr["model_cache_dir"]), style).for_k(self.k)
        ended = [lab for lab, ids in zip(tokens.labels, tokens.scored_ids) if ids[-1:] == (tokens.terminator_id,)]
        mass = sorted(self.mass) if self.mass is not None else None
        return {
            "scheme": style.scheme.name,
            "labels": list(tokens.labels),
            "multi_token_labels": list(tokens.multi_token_labels),
            "scored_with_end_token": ended,
            "valid_mass_mean": sum(mass) / len(mass) if mass else None,
            "valid_mass_median": mass[len(mass) // 2] if mass else None,
            "valid_mass_min": mass[0] if mass else None,
        }


def load_variant(name: str, path: Path) -> VariantResult:
    for f in ("config.yaml", "metrics.json", "train_summary.json"):
        if not (path / f).is_file():
            raise PipelineError(f"{path} has no {f}: it is not a finished reranker run; train it first")
    config = yaml.safe_load((path / CONFIG_YAML).read_text())
    metrics = json.loads((path / METRICS_JSON).read_text())
    if SPLIT not in metrics or "subset" not in metrics[SPLIT]:
        raise PipelineError(f"{path}/metrics.json has no reranker {SPLIT} metrics: the run did not finish; train it again")
    rankings = read_rows(rankings_path(path, SPLIT))
    if not rankings:
        raise PipelineError(f"{rankings_path(path, SPLIT)} is empty: no covered users were ranked; check the candidates")
    # Label-token scores are log-probs; a readout head's are not, and averaged orders' are not either.
    log_probs = config["reranker"].get("head", "label_tokens") == "label_tokens" and config["reranker"]["rank_permutations"] == 1
    mass = valid_label_mass(rankings) if log_probs else None
    train = json.loads((path / "train_summary.json").read_text())
    k = max(len(row["candidates"]) for row in rankings)
    pre = path / PRETRAIN_SUMMARY
    pretrain = json.loads(pre.read_text()) if pre.is_file() else None
    llm_ranks = {rk["user"]: llm_rank(rk) for rk in rankings}
    return VariantResult(name, path, config, metrics[SPLIT], train, mass, k, pretrain, llm_ranks)


def llm_rank(row: dict[str, Any]) -> Optional[int]:
    """The target's rank by the LLM alone: `llm_scores` (calibrated, before fusion) when the run
    fused, else the final `scores` (then the LLM's own)."""
    return candidate_rank(row.get("llm_scores", row["scores"]), row["candidates"], row["target"])


def llm_vs_first(results: Sequence["VariantResult"], metric: str = "NDCG@10") -> dict[str, dict[str, Any]]:
    """Paired bootstrap (`pipeline.significance.paired_tests`) of each later variant's LLM-alone
    subset `metric` minus the first variant's, over the users both ranked: {name: {n, mean_diff,
    ci_low, ci_high}}. The label comparison's own question (e.g. numbers vs letters), apart from
    fusion with the retriever, which hides the LLM when its weight is large."""
    if not results or results[0].llm_ranks is None:
        return {}
    k = int(metric.split("@")[1])
    first = results[0].llm_ranks
    out = {}
    for r in results[1:]:
        users = [u for u in first if u in (r.llm_ranks or {})]
        if not users:
            continue
        a = per_user_metrics([first[u] for u in users], [k])[metric]
        b = per_user_metrics([r.llm_ranks[u] for u in users], [k])[metric]
        res = paired_tests({metric: np.asarray(a)}, {metric: np.asarray(b)}, [metric])[metric]
        out[r.name] = {"n": res.n, "mean_diff": res.mean_diff, "ci_low": res.ci_low, "ci_high": res.ci_high}
    return out


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def comparison_table(
    results: Sequence[VariantResult],
    extra: Sequence[tuple[str, Callable[[VariantResult], str]]] = (),
    retriever_row: bool = True,
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison: the variant's `extra` columns, then the covered-subset
    metrics (paper Table 3), overall NDCG@10 (paper Table 1), best validation NDCG@10 and training
    time. With `retriever_row`, the retriever's own order on the same users comes first."""
    first = results[0].name if results else ""
    header = ["variant", *[h for h, _ in extra], *[f"{c} (subset)" for c in TABLE_COLUMNS],
              "NDCG@10 (overall)", "LLM alone NDCG@10 (subset)", "LLM alone - retriever [95%]",
              "final - retriever [95%]", f"LLM alone - {first} [95%]", "best val NDCG@10", "train s"]
    rows = []
    if retriever_row and results:
        m = results[0].metrics
        rows.append(["retriever order", *["" for _ in extra], *[f"{m['retriever_subset'][c]:.4f}" for c in TABLE_COLUMNS],
                     f"{m['retriever']['NDCG@10']:.4f}", "", "", "", "", "", ""])
    vs_first = llm_vs_first(results)
    for r in results:
        best = next(iter((r.train.get("best_metric") or {}).values()), None)  # the metric best_by kept
        secs = r.train_seconds
        boot = r.metrics.get("bootstrap") or {}
        llm = r.metrics.get("llm_subset", r.metrics["subset"])["NDCG@10"]

        def cell(key):
            b = boot.get(key)
            return "" if not b else _interval(b["mean"], b["ci_low"], b["ci_high"])

        vf = vs_first.get(r.name)
        rows.append([r.name, *[f(r) for _, f in extra], *[f"{r.metrics['subset'][c]:.4f}" for c in TABLE_COLUMNS],
                     f"{r.metrics['overall']['NDCG@10']:.4f}", f"{llm:.4f}",
                     cell("llm_minus_retriever") or cell("final_minus_retriever"),  # no fusion: the final score is the LLM's
                     cell("final_minus_retriever"), "" if vf is None else _interval(vf["mean_diff"], vf["ci_low"], vf["ci_high"]),
                     "" if best is None else f"{best:.4f}", "" if secs is None else f"{secs:.0f}"])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return markdown_table(header, rows) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
