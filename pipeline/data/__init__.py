"""Raw interactions + titles -> preprocessed, split dataset (the one place for the split)."""
from pipeline.data.dataset import SPLITS, SplitDataset
from pipeline.data.preprocess import load_dataset

__all__ = ["SPLITS", "SplitDataset", "load_dataset"]
