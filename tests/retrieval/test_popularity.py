"""Popularity baseline: counts from train sequences only, ranking checked by hand."""
import pytest
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval.evaluate import rank_split
from retrieval.popularity import PopularityRetriever


def tiny_dataset() -> SplitDataset:
    # train = all but the last two items; val/test targets (4, 5, 5, 4, 5, 1) must not count:
    # item 5 is the most frequent target but never occurs in training.
    sequences = [
        [1, 2, 3, 4, 5],  # train 1 2 3 | val 4 | test 5
        [2, 3, 1, 5, 4],  # train 2 3 1 | val 5 | test 4
        [2, 6, 4, 5, 1],  # train 2 6 4 | val 5 | test 1
    ]
    return SplitDataset(
        name="tiny",
        item_ids=["", "a", "b", "c", "d", "e", "f"],
        titles=["", "A", "B", "C", "D", "E", "F"],
        user_ids=["u0", "u1", "u2"],
        sequences=sequences,
    )


def test_counts_come_from_train_only(tmp_path):
    ds = tiny_dataset()
    pop = PopularityRetriever(ds.n_items)
    summary = pop.fit(ds, RetrieverConfig(model="pop"), seed=0, out_dir=tmp_path)
    assert summary["train_interactions"] == 9
    assert summary["items_seen"] == 5  # item 5 occurs only as a val/test target
    scores = pop.score([[1], [2, 3]])
    expected = torch.tensor([0.0, 2, 3, 2, 1, 0, 1])  # id: 0 1 2 3 4 5 6
    assert torch.equal(scores, expected.expand(2, -1))


def test_ranking_with_history_masked_and_ties_to_lower_id(tmp_path):
    ds = tiny_dataset()
    pop = PopularityRetriever(ds.n_items)
    pop.fit(ds, RetrieverConfig(model="pop"), seed=0, out_dir=tmp_path)
    ranks, top, _ = rank_split(pop.score, ds, "test", top_k=2)
    # u0 has seen 1-4: left are 6 (count 1) and 5 (0) -> target 5 is second.
    # u1 has seen 2 3 1 5: left are 4 and 6, tied at 1 -> lower id 4 first: target 4 first.
    # u2 has seen 2 6 4 5: left are 1 and 3, tied at 2 -> target 1 first.
    assert ranks == [2, 1, 1]
    assert top == [[6, 5], [4, 6], [1, 3]]


def test_unfitted_scores_are_flat_and_shape_is_checked():
    pop = PopularityRetriever(6)
    assert pop.score([[1, 2]]).shape == (1, 7)
    assert pop.score([[1, 2]]).abs().sum() == 0
    ds = tiny_dataset()
    with pytest.raises(ValueError, match="5 items"):
        PopularityRetriever(5).fit(ds, RetrieverConfig(), 0, ".")
