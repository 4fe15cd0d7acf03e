"""The preprocessed dataset and the leave-one-out split, defined once for both stages.

Items have dense ids 1..n_items (0 is padding); users have dense indices 0..n_users-1.
`sequences[u]` is user u's full chronological item sequence. The split is derived, never
stored twice: train = all but the last two items, validation target = second-to-last,
test target = last. Evaluating split S feeds `inputs(S)` and asks for `targets(S)`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.atomic import write_json

SPLITS = ("val", "test")  # evaluated splits
# Candidate files are also written for "train" (target = last train item, input = the train items
# before it): the reranker can take hard negatives from them without seeing val/test items.
CANDIDATE_SPLITS = ("train", "val", "test")


@dataclass
class SplitDataset:
    name: str
    item_ids: list[str]  # dense id -> original item id; item_ids[0] = "" (padding)
    titles: list[str]  # dense id -> cleaned title; titles[0] = ""
    user_ids: list[str]  # dense user index -> original user id
    sequences: list[list[int]]  # per user, dense item ids in (timestamp, original item) order
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def train_sequence(self, u: int) -> list[int]:
        return self.sequences[u][:-2]

    def inputs(self, split: str) -> list[list[int]]:
        """Each user's input history when predicting `split`'s target."""
        if split == "train":
            return [s[:-3] for s in self.sequences]  # predicting the last train item
        if split == "val":
            return [s[:-2] for s in self.sequences]
        if split == "test":
            return [s[:-1] for s in self.sequences]
        raise ValueError(f"unknown split {split!r}")

    def targets(self, split: str) -> list[int]:
        offset = {"train": -3, "val": -2, "test": -1}[split]
        return [s[offset] for s in self.sequences]

    def item_index(self) -> dict[str, int]:
        """Original item id -> dense id."""
        return {item: i for i, item in enumerate(self.item_ids) if i > 0}

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "SplitDataset":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def titles_by_item(dataset: SplitDataset) -> dict[str, str]:
    """Original item id -> title, the lookup `rank_split` takes."""
    return {item: title for item, title in zip(dataset.item_ids[1:], dataset.titles[1:])}
