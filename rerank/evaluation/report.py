"""The run's results as markdown (metrics.md)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.config import Config
from pipeline.data import SPLITS
from pipeline.markdown import markdown_table

TABLE_KS = (5, 10)  # the paper's tables report @5 and @10
TABLE_METRICS = ("NDCG", "Recall", "MRR")


def results_table(section: Mapping[str, Any], ks: Sequence[int] = TABLE_KS) -> str:
    """Retriever vs reranker on the covered subset and overall (NDCG/Recall/MRR @5 and @10), as
    a markdown table for one split's metrics section. Sections with the LLM-alone entries
    (`llm_subset`, ...: `llm_evidence`) show them side by side, with the fusion weight, the paired
    bootstrap intervals and the LLM's top-1 slot figures below the table."""
    cols = [f"{m}@{k}" for k in ks for m in TABLE_METRICS]
    calibrated = "llm_raw_subset" in section
    llm_name = "LLM calibrated" if calibrated else "LLM alone"
    table = [("Retriever (subset)", "retriever_subset")]
    if calibrated:
        table.append(("LLM raw (subset)", "llm_raw_subset"))
    if "llm_subset" in section:
        table.append((f"{llm_name} (subset)", "llm_subset"))
    table += [("Reranker (subset)", "subset"), ("Retriever (overall)", "retriever")]
    if "llm_overall" in section:
        table.append((f"{llm_name} (overall)", "llm_overall"))
    table.append(("Reranker (overall)", "overall"))
    rows = [[name, *(f"{section[key][c]:.4f}" for c in cols)] for name, key in table]
    lines = [
        f"coverage {section['coverage']:.4f} ({section['n_covered']}/{section['n_users']} users)",
        "",
        markdown_table(["", *cols], rows),
    ]
    notes = _evidence_notes(section, llm_name)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _evidence_notes(section: Mapping[str, Any], llm_name: str) -> list[str]:
    notes = []
    fusion = section.get("fusion")
    if fusion is not None:
        if fusion.get("grid"):
            grid = ", ".join(f"w={w} {v:.4f}" for w, v in fusion["grid"].items())
            notes.append(f"- Reranker = z(LLM) + w * z(retriever), w = {fusion['w']:g} chosen on val NDCG@10 ({grid})")
        else:
            notes.append("- Reranker = LLM alone (fusion off, w = 0)")
    cal = section.get("calibration")
    if cal is not None and cal.get("method", "none") != "none":
        for k, prior in cal["prior"].items():
            notes.append(f"- Calibration {cal['method']}: position prior (K={k}, slot 1 first) " + " ".join(f"{p:+.3f}" for p in prior))
    boot = section.get("bootstrap")
    if boot is not None and boot.get("n"):
        notes.append(
            f"- Paired bootstrap, subset {boot['metric']} minus the retriever's order ({boot['n']} users, "
            f"{boot['resamples']} resamples, {boot['confidence']:.0%} interval):"
        )
        for key, name in (("final_minus_retriever", "Reranker"), ("llm_minus_retriever", llm_name), ("llm_raw_minus_retriever", "LLM raw")):
            if key in boot:
                b = boot[key]
                notes.append(f"  - {name}: {b['mean']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")
    for key, name in (("llm_raw_top1_slots", "LLM raw"), ("llm_top1_slots", llm_name)):
        t = section.get(key)
        if t is not None and t.get("n"):
            notes.append(
                f"- {name} top-1 by retriever slot (1..{len(t['counts'])}, {t['n']} users): " + " ".join(map(str, t["counts"]))
                + f"; max share {t['max_share']:.3f} (slot {t['max_slot'] + 1})"
            )
    if "llm_top1_slots" in section and section["llm_top1_slots"].get("n"):
        notes.append("- Targets by retriever slot: " + " ".join(map(str, section["llm_top1_slots"]["target_counts"])))
    hit = section.get("llm_top1_hit_non_top1")
    if hit is not None and hit.get("n"):
        notes.append(
            f"- {llm_name} top-1 is the target when the retriever's top-1 is not: {hit['share']:.3f} "
            f"({hit['hits']}/{hit['n']} users; chance 1/(K-1) = {hit['chance']:.3f})"
        )
    return notes


def results_markdown(metrics: dict, cfg: Config) -> str:
    parts = [f"# {cfg.retriever.model} -> {cfg.reranker.model} ({cfg.reranker.label_scheme}), {cfg.data.dataset}"]
    for split in SPLITS:
        if split in metrics:
            parts += ["", f"## {split}", "", results_table(metrics[split])]
    return "\n".join(parts) + "\n"
