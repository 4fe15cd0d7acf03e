"""`--dry-run` of scripts/run_experiment.py and scripts/train_reranker.py: what a run would cost,
counted by the code the run itself uses, without loading a model or training anything.

It preprocesses the data (`load_dataset`), builds the reranker's training prompts
(`rerank.run.training_samples`, the very call training makes), tokenizes them with the model's
tokenizer (`rerank.training.collate.TrainingTexts`, the training encoder: prompt + answer label + end of
turn) and counts the validation / test prompts where candidates files exist. It prints the figures
and writes them to <out>/dry_run.json (nothing else; --out need not be empty).

What cannot be counted before the retriever has run is said so, never guessed:
- run_experiment.py trains no retriever here, so the val/test prompt counts (covered users only)
  are unknown; the upper bound (every user) is given. An --out that already holds the retriever's
  candidates files (a run to --resume) is read instead.
- retriever/mix negatives come from the retriever's candidates_train(_prefixes).jsonl: the prompt
  count does not depend on the negatives (one prompt per kept prefix), but the token statistics are
  then taken with random negatives in their place, and marked approximate.
The tokenizer: `rerank.model.sources.load_tokenizer`. A Qwen2/Qwen2.5 hub id that cannot be loaded (no
hub, not cached) falls back to the bundled Qwen2 tokenizer (tiny-qwen2's, the same token ids and
ChatML template), said in the output; Qwen3 falls back too, marked approximate (its template adds
an empty think block); other models must load.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline import rng_streams
from pipeline.atomic import write_json
from pipeline.candidates import candidates_path, read_rows
from pipeline.config import Config, RerankerConfig, to_dict
from pipeline.data import SPLITS, load_dataset
from pipeline.errors import PipelineError
from rerank.training.samples import USES_RETRIEVER

OUT_FILE = "dry_run.json"
# Prompts tokenized for the per-prompt statistics when there are more: a seeded uniform sample.
# Tokenizing costs ~11 ms a prompt on one CPU core (ML-100K, 20 candidates), so all ~96K prompts of
# an every-prefix recipe would take ~18 min; 2,000 take ~25 s and pin the mean to ~1%.
DEFAULT_SAMPLE = 2000
# Hub ids whose tokenizer the bundled Qwen2 one reproduces exactly (token ids and ChatML template).
_QWEN2 = re.compile(r"^qwen2(\.5)?([-_.]|$)", re.IGNORECASE)
_QWEN3 = re.compile(r"^qwen3([-_.]|$)", re.IGNORECASE)  # same ids; its template adds <think></think>


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--dry-run and --dry-run-sample on a script's parser."""
    p.add_argument(
        "--dry-run", action="store_true",
        help=f"count users, items, training prompts, tokens and optimizer steps; load no model, train nothing; writes <out>/{OUT_FILE}",
    )
    p.add_argument(
        "--dry-run-sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
        help=f"tokenize a seeded sample of N training prompts for the token statistics (default {DEFAULT_SAMPLE}; 0 = all)",
    )


def dry_run(
    cfg: Config,
    out: str | Path,
    candidates_dir: Optional[str | Path],
    sample: int = DEFAULT_SAMPLE,
    command: Optional[list[str]] = None,
) -> dict[str, Any]:
    """Count what the reranker stage of `cfg` would do; print it and write <out>/dry_run.json.
    `candidates_dir`: the retriever run whose candidates files the reranker reads, or None when the
    retriever has not run yet (run_experiment.py)."""
    from rerank.run import check_labels_fit, training_samples  # torch / transformers load here, after --help

    if sample < 0:
        raise PipelineError(f"--dry-run-sample must be >= 0 (got {sample}): 0 tokenizes every training prompt")
    start = time.perf_counter()
    rcfg = cfg.reranker
    ds = load_dataset(cfg.data)
    known = set(ds.item_ids[1:])
    have = candidates_dir is not None
    # Read and checked as the run reads them: a missing or bad file stops the dry run as it would the run.
    rows = {split: read_rows(candidates_path(candidates_dir, split), known) for split in SPLITS} if have else {}
    check_labels_fit(cfg, rows, candidates_dir or ".")

    notes: list[str] = []
    sample_cfg = cfg
    negatives_exact = True
    if rcfg.train_negatives in USES_RETRIEVER and not have:
        # The prompt count is the kept prefixes', whatever the negatives; their titles change the tokens.
        sample_cfg = dataclasses.replace(cfg, reranker=dataclasses.replace(rcfg, train_negatives="random"))
        negatives_exact = False
        notes.append(
            f"train_negatives {rcfg.train_negatives} needs the retriever run's candidates_train.jsonl (run the retriever first): "
            "the prompt count is exact, the token statistics use random negatives in their place"
        )
    samples = training_samples(sample_cfg, ds, candidates_dir or ".")

    tokenizer, tok_info = dry_run_tokenizer(rcfg)
    if tok_info.get("note"):
        notes.append(tok_info["note"])
    lengths, counted = _token_lengths(samples, ds, tokenizer, rcfg, sample, cfg.seed)
    training = _training_figures(rcfg, len(samples), lengths, counted, negatives_exact)
    evaluation = _evaluation_figures(cfg, rows, ds.n_users, training["optimizer_steps"])
    if not have:
        notes.append("no candidates files yet (the retriever has not run): val/test prompts are at most one per user")

    result = {
        "command": [sys.executable, *(sys.argv if command is None else ["<api>", *command])],  # as run.json records it
        "model": rcfg.model,
        "tokenizer": tok_info,
        "dataset": {k: ds.stats.get(k) for k in ("dataset", "users", "items", "interactions", "avg_length")},
        "candidates_dir": str(candidates_dir) if have else None,
        "training": training,
        **evaluation,
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
        "config": to_dict(cfg),
    }
    path = Path(out) / OUT_FILE
    write_json(path, result)
    print(summary_text(result))
    print(f"dry run: wrote {path}")
    return result


def dry_run_tokenizer(rcfg: RerankerConfig) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, what was used): the model's own (`load_tokenizer`), else for Qwen2/2.5/3 hub ids
    the bundled Qwen2 tokenizer with a note; other models that do not load stop with the loader's error."""
    from rerank.model.sources import hub_unreachable, load_tokenizer
    from rerank.model.standins import TINY_QWEN2

    try:
        return load_tokenizer(rcfg.model, rcfg.model_cache_dir), {"name": rcfg.model, "exact": True}
    except PipelineError:
        base = rcfg.model.rstrip("/").rsplit("/", 1)[-1]
        exact = bool(_QWEN2.match(base))
        if not exact and not _QWEN3.match(base):
            raise
        why = hub_unreachable() or "not on the hub"
        note = (
            f"tokenizer of {rcfg.model} not loadable here ({why}): counted with the bundled Qwen2 tokenizer "
            f"({TINY_QWEN2}'s), " + (
                "which has Qwen2.5's token ids and chat template, so the counts are the real ones"
                if exact else "which has Qwen3's token ids but not its chat template (an empty think block, a few tokens "
                "per prompt, is missing): the counts are approximate"
            )
        )
        return load_tokenizer(TINY_QWEN2, rcfg.model_cache_dir), {"name": TINY_QWEN2, "exact": exact, "note": note}


def _token_lengths(samples: list, ds: Any, tokenizer: Any, rcfg: RerankerConfig, sample: int, seed: int) -> tuple[np.ndarray, int]:
    """Token counts of the training texts (prompt + label + end of turn) of all samples, or of a
    seeded uniform sample of `sample` of them; (lengths, how many were tokenized)."""
    from rerank.prompting.prompts import check_labels_shown, label_tokens
    from rerank.prompting.style import style_from_config
    from rerank.training.collate import TrainingTexts

    style = style_from_config(rcfg, tokenizer)
    if rcfg.head == "label_tokens":
        check_labels_shown(tokenizer, style)  # what training would refuse, before any GPU time
    texts = TrainingTexts(samples, ds.titles, tokenizer, style, rcfg.supervise_end_of_turn, label_tokens(tokenizer, style))
    idx = range(len(samples))
    if sample and len(samples) > sample:
        idx = sorted(np.random.default_rng([seed, rng_streams.DRY_RUN_SAMPLE]).choice(len(samples), size=sample, replace=False).tolist())
    lengths = np.array([len(texts[i]["input_ids"]) for i in idx], dtype=np.int64)
    return lengths, len(lengths)


def optimizer_steps(n_prompts: int, batch_size: int, grad_accum: int, epochs: float, processes: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) as the transformers Trainer counts them: ceil(prompts / (batch x
    processes)) batches, ceil(batches / grad_accum) steps an epoch, ceil(epochs x that) in all."""
    batches = math.ceil(n_prompts / (batch_size * processes))
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    return per_epoch, math.ceil(epochs * per_epoch)


def _training_figures(rcfg: RerankerConfig, n: int, lengths: np.ndarray, counted: int, negatives_exact: bool) -> dict[str, Any]:
    per_epoch, steps = optimizer_steps(n, rcfg.train_batch_size, rcfg.grad_accum_steps, rcfg.num_epochs)
    exact = counted == n
    per_prompt = {
        "mean": round(float(lengths.mean()), 1),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }
    total = int(lengths.sum()) if exact else int(round(float(lengths.mean()) * n))
    return {
        "prompts": n,
        "candidates_per_prompt": rcfg.train_candidates,
        "negatives": rcfg.train_negatives,
        "tokens_per_prompt": per_prompt,
        "tokenized_prompts": counted,  # all of them, or the seeded sample the statistics come from
        "tokens_exact": exact and negatives_exact,  # every prompt tokenized, with its real negatives
        "real_negatives": negatives_exact,  # false: random negatives stood in for the retriever's (see notes)
        "tokens_per_epoch": total,  # the exact sum, or the sample mean x prompts
        "training_tokens": int(round(total * rcfg.num_epochs)),
        "max_prompt_tokens": rcfg.max_prompt_tokens,
        "epochs": rcfg.num_epochs,
        "batch_size": rcfg.train_batch_size,
        "grad_accum_steps": rcfg.grad_accum_steps,
        "processes": 1,  # under accelerate launch with N processes: ceil(prompts / (batch x N)) batches
        "steps_per_epoch": per_epoch,
        "optimizer_steps": steps,
        "pretrain_steps": rcfg.pretrain_steps,
    }


def _evaluation_figures(cfg: Config, rows: dict, n_users: int, steps: int) -> dict[str, Any]:
    """Validation during training, calibration and the final ranking, in prompts (one forward pass
    each). Exact from the candidates rows; without them, upper bounds (every user covered)."""
    from pipeline.candidates import is_covered
    from rerank.inference.calibration import permuted_rows, sample_users
    from rerank.training.validation import select_val_rows

    rcfg = cfg.reranker
    out: dict[str, Any] = {"ranking": {}}
    for split in SPLITS:
        covered = sum(is_covered(r) for r in rows[split]) if rows else None
        out["ranking"][split] = {
            "users": len(rows[split]) if rows else n_users,
            "covered_users": covered,  # only these are sent to the LLM
            "prompts": covered * rcfg.rank_permutations if rows else None,
            "max_prompts": n_users * rcfg.rank_permutations,
        }
    passes = 2 if rcfg.val_shuffled else 1  # retriever order, then a shuffled order
    val_users = len(select_val_rows(rows["val"], rcfg.val_max_users, cfg.seed)) if rows else None
    bound = min(n_users, rcfg.val_max_users) if rcfg.val_max_users else n_users
    out["validation"] = {
        "max_validations": math.ceil(steps / rcfg.eval_steps),  # every eval_steps and at the end; early stopping may end sooner
        "users": val_users,
        "prompts_per_validation": val_users * passes if rows else None,
        "max_prompts_per_validation": bound * passes,
    }
    if rcfg.calibration == "permuted":  # calibration_users covered val users x calibration_orders shuffles
        users = sample_users(rows["val"], rcfg.calibration_users, cfg.seed) if rows else None
        calib = len(permuted_rows(users, rcfg.calibration_orders, cfg.seed)) if rows else None
        bound = min(n_users, rcfg.calibration_users or n_users) * rcfg.calibration_orders
    elif rcfg.calibration == "content_free":  # one prompt per candidate count K in the files
        calib = len({len(r["candidates"]) for s in SPLITS for r in rows[s]}) if rows else None
        bound = cfg.retriever.top_k
    else:
        calib = bound = 0
    out["calibration"] = {"method": rcfg.calibration, "prompts": calib, "max_prompts": bound}
    return out


def summary_text(r: dict[str, Any]) -> str:
    """The dry run's figures as the lines it prints."""
    d, t, v = r["dataset"], r["training"], r["validation"]
    tp = t["tokens_per_prompt"]
    sampled = t["tokenized_prompts"] < t["prompts"]
    how = (f"a seeded sample of {t['tokenized_prompts']:,} of {t['prompts']:,} prompts" if sampled else f"all {t['prompts']:,} prompts")
    lines = [
        f"dry run of {r['model']} (no model loaded, nothing trained):",
        f"  data {d['dataset']}: {d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions",
        f"  tokenizer: {r['tokenizer']['name']}" + ("" if r["tokenizer"]["name"] == r["model"] else f" standing in for {r['model']}'s (see notes)"),
        f"  training prompts: {t['prompts']:,} ({t['candidates_per_prompt']} candidates, {t['negatives']} negatives)",
        f"  tokens per training prompt ({how}): mean {tp['mean']:,.1f}, p50 {tp['p50']:,.0f}, p95 {tp['p95']:,.0f}, "
        f"max {tp['max']:,}" + (" (of the sample)" if sampled else ""),
        f"  training tokens: {t['training_tokens']:,} ({t['epochs']:g} epoch(s) x {t['tokens_per_epoch']:,}"
        + (", the sample's mean x prompts)" if sampled else ")") + ("" if t["real_negatives"] else ": approximate, see notes"),
        f"  optimizer steps: {t['optimizer_steps']:,} = ceil({t['epochs']:g} x {t['steps_per_epoch']:,}); "
        f"{t['steps_per_epoch']:,} = ceil(ceil({t['prompts']:,} / batch {t['batch_size']}) / accum {t['grad_accum_steps']}), one process",
        f"  validation: at most {v['max_validations']:,} validations of "
        + (f"{v['prompts_per_validation']:,} prompts ({v['users']:,} covered val users)" if v["prompts_per_validation"] is not None
           else f"at most {v['max_prompts_per_validation']:,} prompts (covered users: known after the retriever)"),
    ]
    for split, s in r["ranking"].items():
        lines.append(
            f"  ranking {split}: " + (f"{s['prompts']:,} prompts ({s['covered_users']:,} of {s['users']:,} users covered)"
                                      if s["prompts"] is not None else f"at most {s['max_prompts']:,} prompts (covered users: known after the retriever)")
        )
    c = r["calibration"]
    lines.append(f"  calibration {c['method']}: " + (f"{c['prompts']:,} prompts" if c["prompts"] is not None else f"at most {c['max_prompts']:,} prompts"))
    lines += [f"  note: {n}" for n in r["notes"]]
    lines.append(f"  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
