"""retriever.model name -> a Retriever instance (imports are lazy: recbole only when asked)."""
from __future__ import annotations

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval.base import Retriever
from pipeline.device import resolve_device

RECBOLE_MODELS = ("sasrec", "bert4rec", "narm", "gru4rec")


def build_retriever(cfg: RetrieverConfig, ds: SplitDataset) -> Retriever:
    device = resolve_device(cfg.device)
    if cfg.model == "lrurec":
        from retrieval.lrurec import LRURecRetriever

        return LRURecRetriever(ds.n_items, cfg, device)
    if cfg.model == "pop":
        from retrieval.popularity import PopularityRetriever

        return PopularityRetriever(ds.n_items)
    if cfg.model in RECBOLE_MODELS:
        from retrieval.recbole_models import RecboleRetriever

        return RecboleRetriever(cfg.model, ds, cfg, device, instances_per_epoch=cfg.instances_per_epoch)
    raise ValueError(cfg.model)  # unreachable: the config's Literal type is checked at load
