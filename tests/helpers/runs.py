"""Hand-written run directories for the table builders."""
import json
import math
from pathlib import Path

import yaml

L3, L4 = math.log2(3), math.log2(4)  # NDCG gains of ranks 2 and 3 are 1/L3 and 1/L4


# Candidates rows (retriever order) and the reranker's scores for the covered users.
ROWS = [
    {"user": "u1", "history": ["h"], "candidates": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0], "target": "b"},
    {"user": "u2", "history": ["h"], "candidates": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0], "target": "a"},
    {"user": "u3", "history": ["h"], "candidates": ["d", "e", "f"], "scores": [3.0, 2.0, 1.0], "target": "f"},
    {"user": "u4", "history": ["h"], "candidates": ["d", "e", "f"], "scores": [3.0, 2.0, 1.0], "target": "z"},
]


RERANKER_SCORES = {"u1": [0.1, 0.9, 0.5], "u2": [0.2, 0.9, 0.1], "u3": [0.1, 0.2, 0.9]}  # ranks 1, 2, 1


# Sums over users of each metric (every rank is <= 3, so @5 and @10 agree).
RET = {"NDCG": 1 / L3 + 1 + 1 / L4, "Recall": 3.0, "MRR": 1 / 2 + 1 + 1 / 3}  # ranks 2, 1, 3


RER = {"NDCG": 1 + 1 / L3 + 1, "Recall": 3.0, "MRR": 1 + 1 / 2 + 1}  # ranks 1, 2, 1


def section(sums: dict, n: int) -> dict:
    return {f"{m}@{k}": sums[m] / n for k in (1, 5, 10, 20) for m in ("NDCG", "Recall", "MRR")}


def write_run(path: Path, *, retriever: str = "lrurec", reranker: str | None = None, data: dict | None = None,
              candidates: bool = True, rankings: list | None = None, retriever_run: str | None = None,
              metrics: dict | None = None) -> Path:
    """A run directory as the scripts write it (only the files the tables read)."""
    path.mkdir(parents=True)
    cfg = {"seed": 0, "data": data or {"dataset": "ml-100k", "max_users": None, "cache_dir": ".cache/data"},
           "retriever": {"model": retriever}, "retriever_run": retriever_run}
    if reranker:
        cfg["reranker"] = {"model": reranker, "label_scheme": "letters"}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    test = {"retriever": section(RET, 4), "coverage": 0.75, "n_users": 4, "n_covered": 3}
    if reranker:
        test.update(retriever_subset=section(RET, 3), subset=section(RER, 3), overall=section(RER, 4))
    (path / "metrics.json").write_text(json.dumps(metrics or {"val": test, "test": test}))
    if candidates:
        (path / "candidates_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    if reranker:
        if rankings is None:
            rankings = [{**r, "scores": RERANKER_SCORES[r["user"]], "label_scheme": "letters"} for r in ROWS[:3]]
        (path / "rankings_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    return path
