"""Raw interactions + titles -> preprocessed, split dataset (the one place for the split)."""
from pipeline.data.dataset import CANDIDATE_SPLITS, SPLITS, SplitDataset
from pipeline.data.preprocess import load_dataset

__all__ = ["CANDIDATE_SPLITS", "SPLITS", "SplitDataset", "load_dataset"]
