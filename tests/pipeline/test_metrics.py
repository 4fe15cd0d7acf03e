"""Metrics against values computed by hand."""
import math

import pytest
import torch

from pipeline.metrics import candidate_rank, coverage_weighted, full_catalogue_ranks, metrics_from_ranks


def test_metrics_from_ranks_hand_computed():
    # Four users: target at rank 1, 3, 12, and not ranked at all.
    m = metrics_from_ranks([1, 3, 12, None], ks=[1, 5, 10, 20])
    assert m["Recall@1"] == pytest.approx(1 / 4)
    assert m["NDCG@1"] == pytest.approx(1 / 4)
    assert m["MRR@1"] == pytest.approx(1 / 4)
    assert m["Recall@5"] == pytest.approx(2 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)  # (1 + 0.5) / 4 = 0.375
    assert m["NDCG@5"] == pytest.approx(0.375)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["Recall@10"] == pytest.approx(0.5)
    assert m["Recall@20"] == pytest.approx(0.75)
    assert m["NDCG@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(13)) / 4)
    assert m["MRR@20"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert list(m)[:3] == ["NDCG@1", "Recall@1", "MRR@1"]


def test_metrics_empty_and_all_missed():
    assert metrics_from_ranks([], ks=[10]) == {"NDCG@10": 0.0, "Recall@10": 0.0, "MRR@10": 0.0}
    assert metrics_from_ranks([None, 11], ks=[10])["Recall@10"] == 0.0


def test_full_catalogue_ranks_masks_history_and_breaks_ties_by_index():
    # items 0..5, 0 = padding. User 0: target 3, history {1}; item 1 scores highest but is masked.
    scores = torch.tensor([
        [9.0, 8.0, 1.0, 5.0, 7.0, 5.0],
        [0.0, 2.0, 2.0, 2.0, 1.0, 3.0],
    ])
    masked = torch.zeros_like(scores, dtype=torch.bool)
    masked[:, 0] = True
    masked[0, 1] = True
    targets = torch.tensor([3, 3])
    ranks = full_catalogue_ranks(scores, targets, masked)
    # user 0: ahead of item 3 (5.0): item 4 (7.0); item 5 ties at 5.0 but has a higher index -> rank 2
    # user 1: ahead of item 3 (2.0): item 5 (3.0), items 1 and 2 tie with lower index -> rank 4
    assert ranks.tolist() == [2, 4]


def test_candidate_rank():
    cands = ["10", "20", "30", "40"]
    assert candidate_rank([0.1, 0.5, 0.3, 0.5], cands, "40") == 2  # tie with "20", which comes first
    assert candidate_rank([0.1, 0.5, 0.3, 0.5], cands, "20") == 1
    assert candidate_rank([0.1, 0.5, 0.3, 0.5], cands, "10") == 4
    assert candidate_rank([0.1, 0.5, 0.3, 0.5], cands, "99") is None


def test_coverage_weighted_is_subset_times_coverage():
    subset = {"NDCG@10": 0.4, "Recall@10": 0.8}
    assert coverage_weighted(subset, n_covered=25, n_users=100) == pytest.approx({"NDCG@10": 0.1, "Recall@10": 0.2})
    # equals averaging over all users with 0 for the uncovered ones
    ranks = [1, 2, None, None]
    sub = metrics_from_ranks(ranks[:2], ks=[5])
    assert coverage_weighted(sub, 2, 4) == pytest.approx(metrics_from_ranks(ranks, ks=[5]))
