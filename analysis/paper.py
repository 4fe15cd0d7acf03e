"""The LlamaRec paper's published numbers, with where each came from, and which of our datasets
they belong beside.

Only numbers found in a source are here; a cell the paper has but no source here gives is left
out and shows as "–" in the tables. The numbers below are the ones SPEC.md quotes from the paper
(Table 1: all test users; Table 3: the users whose ground truth the retriever covered). The full
tables (the other baselines, @5, Beauty and Games) are an image in the authors' repository
(github.com/Yueeeeeeee/LlamaRec, media/performance.png) and were not found as text in any source
searched, so they are not filled in from memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

PAPER = "Yue et al., 2023, LlamaRec: Two-Stage Recommendation using Large Language Models for Ranking"
PAPER_URL = "https://arxiv.org/abs/2311.02089"
# Where the numbers below were read: the project's spec, which quotes them from the paper.
NUMBERS_SOURCE = "the paper's Table 1 and Table 3 as quoted in SPEC.md ('Facts about the reference')"

# Our retriever.model -> the name the paper's tables use (Popularity and GRU4Rec are ours only).
METHOD_NAMES = {
    "narm": "NARM",
    "bert4rec": "BERT4Rec",
    "sasrec": "SASRec",
    "lrurec": "LRURec",
    "pop": "Popularity",
    "gru4rec": "GRU4Rec",
}
# The paper's Table 1 baselines, in its row order; any of them not given to reproduce_tables.py
# still gets a "not run" row so the reader sees what is missing.
PAPER_RETRIEVERS = ("NARM", "BERT4Rec", "SASRec", "LRURec")
PAPER_RETRIEVER = "LRURec"  # the retriever LlamaRec reranks (its published rows are LRURec -> LlamaRec)
PAPER_RERANKER = "LlamaRec"

# paper dataset -> method -> metric -> value. Table 1: all test users (our metrics "retriever" /
# "overall"); Table 3: the covered subset (our "retriever_subset" / "subset").
TABLE1: Mapping[str, Mapping[str, Mapping[str, float]]] = {
    "ML-100k": {
        "LRURec": {"NDCG@10": 0.0705, "Recall@10": 0.1426, "MRR@10": 0.0491},
        "LlamaRec": {"NDCG@10": 0.0759, "Recall@10": 0.1524, "MRR@10": 0.0529},
    },
}
TABLE3: Mapping[str, Mapping[str, Mapping[str, float]]] = {
    "ML-100k": {
        "LRURec": {"NDCG@10": 0.3367, "Recall@10": 0.6654},
        "LlamaRec": {"NDCG@10": 0.3766, "Recall@10": 0.7560},
    },
}

# What the paper's "ML-100k" is, and what our classic ML-100K is (SPEC.md), for the data note.
_CLASSIC_ML100K = (
    "our data differ from the paper's: `ml-100k` here is classic MovieLens 100K (943 users, 1,349 items "
    "after 5-core), while the paper's \"ML-100k\" is MovieLens ml-latest-small (610 users); the paper's "
    "numbers are shown for orientation, not as a target"
)
# Preprocessing the paper used (SPEC.md); a run that changed one of these is on different data.
_PAPER_PREPROCESS = {"min_rating": None, "min_user_count": 5, "min_item_count": 5, "max_users": None}


@dataclass(frozen=True)
class DataMatch:
    """How one of our data sections relates to the paper's datasets."""

    paper_dataset: Optional[str]  # "ML-100k", "Beauty", "Games", or None (no paper column)
    notes: tuple[str, ...]  # how our data differ from the paper's (empty when they match)


def match_dataset(data: Mapping[str, object]) -> DataMatch:
    """The paper dataset our `data` config section corresponds to, with every known difference.

    ml-latest-small is the paper's "ML-100k"; amazon Beauty / Video_Games are its Beauty / Games;
    our classic ml-100k gets the paper's ML numbers beside it but with a line saying the data
    differ; generic data (and other Amazon categories) get no paper column."""
    dataset, category = data.get("dataset"), data.get("category")
    notes: list[str] = []
    if dataset == "ml-latest-small":
        paper = "ML-100k"
    elif dataset == "ml-100k":
        paper = "ML-100k"
        notes.append(_CLASSIC_ML100K)
    elif dataset == "amazon" and category == "Beauty":
        paper = "Beauty"
    elif dataset == "amazon" and category == "Video_Games":
        paper = "Games"
    else:
        return DataMatch(None, ())
    for key, paper_value in _PAPER_PREPROCESS.items():
        value = data.get(key, paper_value)
        if value == paper_value:
            continue
        if key == "max_users":
            notes.append(f"data.max_users={value}: a slice of the first {value} users, not the whole dataset")
        else:
            notes.append(f"data.{key}={value}: the paper used {key}={paper_value}")
    return DataMatch(paper, tuple(notes))


def published(table: Mapping[str, Mapping[str, Mapping[str, float]]], paper_dataset: Optional[str], method: str, metric: str) -> Optional[float]:
    """A published cell, or None where the paper (as far as our sources go) gives none."""
    if paper_dataset is None:
        return None
    return table.get(paper_dataset, {}).get(method, {}).get(metric)
