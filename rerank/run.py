"""A whole reranker run: candidates files -> LoRA training -> rankings and metrics -> run dir.

Reads only the retriever run's files (candidates_<split>.jsonl, candidates_train_prefixes.jsonl when
written, metrics.json), never its code.

Resumable (`resume`, the scripts' --resume): finished stages are kept, interrupted ones continue.
- Training is finished when adapter/ and train_summary.json exist (the adapter is loaded, not
  trained again); otherwise it continues from the last complete checkpoint under checkpoints/
  (a checkpoint a kill cut short is deleted first), or starts afresh when there is none.
- A split's ranking is finished when rankings_<split>.jsonl exists; otherwise it continues from
  rankings_<split>.jsonl.partial (`PartialRankings`) without scoring a finished batch again. The
  partial file stays until the post-processing (calibration, fusion: `finalise`) has written the
  final file; a kept final file gives back the raw LLM scores and the post-processing is recomputed.

Under `accelerate launch` every process trains (the Trainer's data parallelism) and ranks its
share of the batches (`pipeline.distributed`); only the main process writes files.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.atomic import write_text
from pipeline.candidates import ROW_FIELDS, candidates_path, prefix_candidates_path, rankings_path, raw_scores, read_prefix_rows, read_rows
from pipeline.config import Config, RerankerConfig
from pipeline.data import SPLITS, load_dataset
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.distributed import barrier, from_main, is_main, main_first, on_main, processes
from pipeline.errors import PipelineError
from pipeline.run_files import ADAPTER_DIR, CHECKPOINT_DIR, METRICS_JSON, METRICS_MD, TRAIN_SUMMARY
from pipeline.rundir import RunDir, check_same_data
from rerank.evaluation.evidence import llm_evidence
from rerank.evaluation.metrics import split_metrics
from rerank.evaluation.report import results_markdown
from rerank.inference.calibration import Prior, calibrate, estimate_prior, prior_json
from rerank.inference.fusion import fit_weight, fused_scores, retriever_scores
from rerank.inference.progress import PartialRankings
from rerank.inference.rank_split import check_scores, rank_split
from rerank.load_run import RerankerRun
from rerank.model.adapter import load_adapter, resolve_adapter_dir
from rerank.model.sources import load_from_config
from rerank.preflight import check_before_training, check_calibration_counts
from rerank.prompting.labels import check_candidates_fit, scheme_from_config
from rerank.prompting.style import PromptStyle, check_tokenizer, style_from_config
from rerank.prompting.titles import count_special_text
from rerank.training.samples import USES_RETRIEVER, TrainSample, samples_from_config
from rerank.training.stages import train_reranker

TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint


def start_run(out: str | Path, cfg: Config, argv: Optional[list[str]], resume: bool) -> RunDir:
    """The run directory of a reranker script, started once for all processes: each process checks
    it (a fresh run needs an --out without a run, a resumed one the same config), then the main
    process writes config.yaml and run.json. Joins `accelerate launch`'s processes first."""
    processes(cfg.reranker.device)
    run = RunDir(out)
    run.check(cfg, resume)
    barrier()  # nobody writes before every process has checked
    on_main(lambda: run.start(cfg, argv, resume=resume))
    return run


def finish_run(run: RunDir) -> None:
    """Stamp the end in run.json and print the metrics table (main process)."""
    if is_main():
        run.finish()
        print((run / METRICS_MD).read_text())


def rerank_run(cfg: Config, run: RunDir, candidates_dir: str | Path, resume: bool = False) -> dict:
    """Train the reranker on `cfg.data`, rank the val and test candidates of `candidates_dir`,
    write rankings_<split>.jsonl and the reranker sections of metrics.json; returns metrics.
    `resume`: keep what `run` already holds finished (see the module docstring)."""
    candidates_dir = Path(candidates_dir)
    if candidates_dir.resolve() != run.path.resolve():
        check_same_data(candidates_dir, cfg, f"the candidates in {candidates_dir} were made from other data")
    with main_first():  # the main process builds the caches (data, converted model) first
        ds = load_dataset(cfg.data)
        known = set(ds.item_ids[1:])
        # Bad candidates files stop the run here, before the model is loaded or anything trained.
        rows = {split: read_rows(candidates_path(candidates_dir, split), known) for split in SPLITS}
        check_labels_fit(cfg, rows, candidates_dir)
        model, tokenizer = load_from_config(cfg.reranker)

    special = count_special_text(ds.titles[1:], tokenizer)
    if special:
        _say(f"prompts: {special} item titles hold the tokenizer's special-token text, removed from their prompts (rerank/prompts.plain_text)")
    if resume and from_main(lambda: training_finished(run.path)):
        style = PromptStyle.load(resolve_adapter_dir(run.path))  # the prompts the adapter was trained on
        check_tokenizer(style, tokenizer)
        model = load_adapter(model, run.path)
        check_before_training(cfg, rows, ds.titles[1:], tokenizer, style)  # the ranking's checks
        _say(f"reranker: kept the trained adapter in {run / ADAPTER_DIR} (--resume)")
    else:
        style = style_from_config(cfg.reranker, tokenizer)
        check_before_training(cfg, rows, ds.titles[1:], tokenizer, style)  # before the first training step
        train_cfg = cfg.reranker
        if resume:
            last = from_main(lambda: last_complete_checkpoint(run / CHECKPOINT_DIR))
            _say(f"reranker: resuming training from {last}" if last else "reranker: no checkpoint yet, training from the start")
            train_cfg = dataclasses.replace(cfg.reranker, resume=last is not None)
        samples = training_samples(cfg, ds, candidates_dir)
        _say(f"reranker: {len(samples)} training prompts, model {cfg.reranker.model}, labels {style.scheme.name}")
        train_reranker(model, tokenizer, style, ds, samples, rows["val"], train_cfg, run.path, seed=cfg.seed)
        on_main(lambda: run.stage_finished("reranker training"))  # a later failure of the run keeps the adapter
        # Ranking progress of an earlier adapter (its run was trained again) is not this one's.
        on_main(lambda: [PartialRankings(rankings_path(run.path, split)).discard() for split in SPLITS])

    return rank_splits(cfg, run, model, tokenizer, style, rows, titles_by_item(ds), candidates_dir, resume)


def check_labels_fit(cfg: Config, rows: Mapping[str, Sequence[Mapping[str, Any]]], candidates_dir: str | Path) -> None:
    """Stop before any model is loaded when the label scheme has fewer labels than a split's
    candidates rows or the training prompts (reranker.train_candidates) need."""
    scheme = scheme_from_config(cfg.reranker)
    for split, split_rows in rows.items():
        check_candidates_fit(scheme, split_rows, str(candidates_path(candidates_dir, split)))
    if cfg.reranker.train_candidates > len(scheme.labels):
        raise PipelineError(
            f"reranker.train_candidates {cfg.reranker.train_candidates} is more than label scheme "
            f"{scheme.name!r} has labels ({len(scheme.labels)}): lower it, or give more reranker.custom_labels"
        )


def training_samples(cfg: Config, ds: SplitDataset, candidates_dir: str | Path) -> list[TrainSample]:
    """The reranker's training prompts (`build_samples`) for `cfg`: random negatives need nothing
    else; retriever/mix negatives read `candidates_dir`'s candidates_train.jsonl and, when the
    retriever wrote it, candidates_train_prefixes.jsonl (per-prefix negatives). Training and
    `--dry-run` (`rerank.dry_run.dry_run`) both call this, so they count the same prompts."""
    candidates_dir = Path(candidates_dir)
    known = set(ds.item_ids[1:])
    train_rows = prefix_rows = None
    if cfg.reranker.train_negatives in USES_RETRIEVER:
        train_rows = read_rows(candidates_path(candidates_dir, "train"), known)
        prefix_file = prefix_candidates_path(candidates_dir)  # per-prefix negatives, when the retriever wrote them
        if prefix_file.is_file():
            prefix_rows = read_prefix_rows(prefix_file, known)
        _say(f"reranker: {cfg.reranker.train_negatives} negatives from {prefix_file.name if prefix_rows is not None else 'candidates_train.jsonl'}")
    return samples_from_config(ds, cfg.reranker, cfg.seed, retriever_rows=train_rows, prefix_rows=prefix_rows)


def rank_run(cfg: Config, run: RunDir, source: RerankerRun, resume: bool = False) -> dict:
    """Rank the val and test candidates of `source` (a finished reranker run) with its adapter, into
    `run` (rankings_<split>.jsonl, metrics.json, metrics.md); `cfg` is the source's config with the
    caller's overrides (e.g. rank_batch_size). No training."""
    with main_first():
        model, tokenizer, style = source.load_model()
        rows = {split: source.rows(split) for split in SPLITS}
    if cfg.reranker.calibration == "permuted":
        check_calibration_counts(rows, cfg.reranker, cfg.seed)  # before any split is ranked
    return rank_splits(cfg, run, model, tokenizer, style, rows, source.titles, source.candidates_dir, resume)


def rank_splits(
    cfg: Config,
    run: RunDir,
    model: Any,
    tokenizer: Any,
    style: PromptStyle,
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    titles: Mapping[str, str],
    candidates_dir: str | Path,
    resume: bool,
) -> dict:
    """Rank each split (kept when finished and `resume`), then post-process both (`finalise`:
    calibration with the prior from val, the fusion weight fitted on val), write
    rankings_<split>.jsonl, the reranker sections of metrics.json, metrics.md and the plots;
    returns metrics.json's content.

    A split's raw LLM scores come from its finished rankings file (`raw_rankings`: --resume) or
    from `rank_split`, whose progress file stays until the final file replaces it, so a kill at any
    point resumes without scoring a batch twice; the post-processing is recomputed (deterministic:
    the same bytes)."""
    model.eval()
    rcfg = cfg.reranker
    retriever_metrics = _retriever_metrics(Path(candidates_dir))
    stores = {split: PartialRankings(rankings_path(run.path, split)) for split in SPLITS}
    raw: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        store = stores[split]
        kept = from_main(lambda: read_rows(store.final) if resume and store.final.is_file() else None)
        if kept is not None:
            raw[split] = raw_rankings(kept, store.final)
            on_main(store.discard)  # a kill between the final file and the partial's removal
            _say(f"rankings {split}: kept {store.final.name} (--resume)")
        else:
            raw[split] = rank_split(
                model, tokenizer, style, rows[split], titles, rcfg, seed=cfg.seed, progress=is_main(), partial=store, split=split
            )
    ks = sorted({len(rk["candidates"]) for split in SPLITS for rk in raw[split]})  # counts only, for content_free
    prior = from_main(  # never from test rows: validation prompts, or content-free ones
        lambda: estimate_prior(rcfg.calibration, model, tokenizer, style, rows["val"], titles, rcfg, cfg.seed, ks, progress=is_main())
    )
    rankings, sections = finalise(rows, raw, prior, rcfg, cfg.seed)
    sec = sections[SPLITS[0]]
    if rcfg.calibration != "none":
        _say(f"calibration {rcfg.calibration}: prior " + "; ".join(
            f"K={k}: " + " ".join(f"{p:+.3f}" for p in v) for k, v in sec["calibration"]["prior"].items()
        ))
    if rcfg.fusion:
        _say(f"fusion: w = {sec['fusion']['w']:g} chosen on val NDCG@10 from " + ", ".join(
            f"{w}: {v:.4f}" for w, v in sec["fusion"]["grid"].items()
        ))
    metrics: dict = {}
    for split in SPLITS:
        on_main(lambda: stores[split].finish(rankings[split]))  # the final file, then the partial's removal
        # The retriever run's full-catalogue metrics (k up to 50) supersede the candidates-based
        # ones; they agree for k <= 20 because the candidates are the retriever's top 20.
        if split in retriever_metrics:
            sections[split]["retriever"] = retriever_metrics[split]
        metrics = from_main(lambda: run.update_metrics(split, sections[split]))
    on_main(lambda: write_text(run / METRICS_MD, results_markdown(metrics, cfg)))
    from rerank.evaluation.figures import write_plots  # matplotlib only when a run writes its plots

    on_main(lambda: write_plots(run.path, metrics))
    return metrics


def raw_rankings(kept: Sequence[Mapping[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Rankings rows with the LLM's raw scores as `scores`, from a finished rankings file: its
    `llm_raw_scores` (calibrated runs), else `llm_scores` (fused runs), else `scores`."""
    out = []
    for i, row in enumerate(kept, 1):
        scores = raw_scores(row)
        if (
            not isinstance(scores, list) or len(scores) != len(row["candidates"])
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)
            or not isinstance(row.get("label_scheme"), str)
        ):
            raise PipelineError(f"{path} line {i}: no raw scores (one per candidate) or no label_scheme: delete the file to rank this split afresh")
        out.append({**{key: row[key] for key in ROW_FIELDS}, "scores": list(scores), "label_scheme": row["label_scheme"]})
    return out


def finalise(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    raw: Mapping[str, Sequence[Mapping[str, Any]]],
    prior: Prior,
    rcfg: RerankerConfig,
    seed: int,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """(rankings rows, metrics.json section) per split from the raw rankings: each split calibrated
    with `prior` (estimated on val), fused with the retriever with the weight fitted on the val
    split alone, then measured. Pure and deterministic.

    Rankings rows: the candidates-file fields with `scores` = the final score, `llm_scores` the LLM
    alone (after calibration), `llm_raw_scores` before it (calibrated runs only), `label_scheme`."""
    calibrated = rcfg.calibration != "none"
    llm = {
        split: calibrate(raw[split], prior, rcfg.rank_permutations, seed) if calibrated else [list(rk["scores"]) for rk in raw[split]]
        for split in SPLITS
    }
    retriever = {split: retriever_scores(rows[split], raw[split]) for split in SPLITS}
    if rcfg.fusion:
        w, grid = fit_weight(raw["val"], llm["val"], retriever["val"], rcfg.fusion_weights)  # validation users only
    else:
        w, grid = 0.0, {}
    rankings: dict[str, list[dict[str, Any]]] = {}
    sections: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        check_scores(raw[split], llm[split], f"calibrated LLM scores ({split})")
        final = fused_scores(llm[split], retriever[split], w) if rcfg.fusion else llm[split]
        check_scores(raw[split], final, f"fused scores ({split})")
        rankings[split] = [
            {
                **{key: rk[key] for key in ROW_FIELDS},
                "scores": f,
                "llm_scores": s,
                **({"llm_raw_scores": list(rk["scores"])} if calibrated else {}),
                "label_scheme": rk["label_scheme"],
            }
            for rk, f, s in zip(raw[split], final, llm[split])
        ]
        section = split_metrics(rows[split], rankings[split])
        section.update(llm_evidence(rows[split], rankings[split], seed))
        section["fusion"] = {"w": float(w), "grid": dict(grid)}
        section["calibration"] = {"method": rcfg.calibration, "prior": prior_json(prior)}
        sections[split] = section
    return rankings, sections


def training_finished(run_dir: str | Path) -> bool:
    """True when `run_dir` holds a trained adapter and its train_summary.json (written last)."""
    run_dir = Path(run_dir)
    return (run_dir / ADAPTER_DIR / "adapter_config.json").is_file() and (run_dir / TRAIN_SUMMARY).is_file()


def last_complete_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """The newest checkpoint under `ckpt_dir` that the Trainer finished writing (its
    trainer_state.json, written last, is valid JSON); checkpoints a kill cut short are deleted, so
    the Trainer resumes from a whole one. None when there is none."""
    if not ckpt_dir.is_dir():
        return None
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        step = d.name.split("-", 1)[1]
        if not d.is_dir() or not step.isdigit():
            continue
        try:
            json.loads((d / TRAINER_STATE).read_text())
            complete.append((int(step), d))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            print(f"reranker: deleting {d}, a checkpoint a kill cut short")
            shutil.rmtree(d)
    return str(max(complete)[1]) if complete else None


def _say(message: str) -> None:
    if is_main():
        print(message)


def _retriever_metrics(candidates_dir: Path) -> dict:
    path = candidates_dir / METRICS_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PipelineError(f"{path} is not valid JSON: re-run the retriever") from None
    return {split: sec["retriever"] for split, sec in data.items() if isinstance(sec, dict) and "retriever" in sec}


