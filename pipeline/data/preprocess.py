"""Preprocessing (as LlamaRec): drop items without a title, keep each (user, item) once (the
earliest), iterative k-core, dense ids, each user's items sorted by (timestamp, original item id).
Cached on disk, keyed by the config.

Ties in timestamp are broken by the ORIGINAL item id (numeric order when every id is an
integer, else string order), never by file order or dense ids: in classic ML-100K 416 of 943
users rated their last two items in the same second, so this rule decides 44% of test targets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.dataset import SplitDataset
from pipeline.data.fingerprint import data_fingerprint
from pipeline.data.loaders import REPAIRS, load_raw
from pipeline.errors import PipelineError
from pipeline.markdown import markdown_table

CACHE_VERSION = 3  # bump when preprocessing changes, so stale caches are not reused


def _id_sort_key(ids: pd.Series) -> pd.Series:
    """Sort key for original ids: numeric when all are integers, else the strings themselves."""
    if ids.str.fullmatch(r"-?\d+").all():
        return ids.astype("int64")
    return ids


def k_core(df: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Iteratively drop users with < min_user and items with < min_item interactions."""
    while True:
        n = len(df)
        item_counts = df["item"].map(df["item"].value_counts())
        df = df[item_counts >= min_item]
        user_counts = df["user"].map(df["user"].value_counts())
        df = df[user_counts >= min_user]
        if len(df) == n:
            return df


# What preprocessing drops before k-core, as counted in dataset stats["dropped"] and printed.
_DROPPED = {
    "untitled_items": "items without a title",
    "duplicate_interactions": "duplicate interactions (same user, item and timestamp)",
    "repeat_interactions": "later interactions with an item the user already had (the earliest is kept)",
}


def drop_repeats(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep each (user, item) pair once, at its EARLIEST timestamp (ties: first in the file).

    An exact duplicate (same user, item and timestamp) is a duplicated record, not a second
    interaction. A later repeat of the same item (a re-purchase, a re-rating) is dropped too: the
    leave-one-out split would otherwise make the user's val/test target an item already in their
    history, which candidates (history masked, as LlamaRec) and metrics can never count as a hit,
    and every stage assumes an item appears at most once per user. MovieLens files hold each
    (user, item) once, so they are unchanged; Amazon 2014 ratings hold a few repeats. The counts go
    to dataset stats ("dropped") and are printed."""
    exact = int(df.duplicated(["user", "item", "timestamp"]).sum())
    df = df.sort_values("timestamp", kind="stable")
    keep = ~df.duplicated(["user", "item"], keep="first")
    repeats = int((~keep).sum()) - exact
    return df[keep].sort_index(kind="stable"), {"duplicate_interactions": exact, "repeat_interactions": repeats}


def preprocess(
    interactions: pd.DataFrame, titles: dict[str, str], repairs: dict[str, int], cfg: DataConfig, name: str
) -> SplitDataset:
    """`load_raw`'s (interactions, titles, repairs) -> the split dataset; its stats (dataset_stats.json)
    count what was dropped and what loading repaired."""
    df = interactions
    if cfg.min_rating is not None:
        df = df[df["rating"] >= cfg.min_rating]
    # Items without a title cannot be put in a prompt: dropped (as LlamaRec), counted, and an
    # error when that leaves nothing (usually the item file's ids do not match the interactions').
    titled = df["item"].isin(titles.keys())
    untitled_items = int(df.loc[~titled, "item"].nunique())
    if len(df) and not titled.any():
        raise PipelineError(
            f"dataset {name!r}: none of its {untitled_items} items has a title: check that the item file "
            "holds titles for the item ids used in the interactions file"
        )
    dropped = {"untitled_items": untitled_items, "untitled_interactions": int((~titled).sum())}
    df = df[titled]
    df, repeats = drop_repeats(df)
    dropped.update(repeats)
    for key, what in _DROPPED.items():
        if dropped[key]:
            print(f"preprocess: dropped {dropped[key]:,} {what}")
    for key, what in REPAIRS.items():
        if repairs.get(key):
            print(f"preprocess: {repairs[key]:,} {what}")
    if cfg.max_users is not None:
        users = df["user"].drop_duplicates()
        keep = users.iloc[_id_sort_key(users).argsort(kind="stable")].iloc[: cfg.max_users]
        df = df[df["user"].isin(set(keep))]
    df = k_core(df, cfg.min_user_count, cfg.min_item_count)
    if df.empty:
        raise PipelineError(
            f"dataset {name!r} is empty after {cfg.min_user_count}/{cfg.min_item_count}-core filtering: "
            "use more data (data.max_users) or lower data.min_user_count / data.min_item_count"
        )
    df = df.assign(item_key=_id_sort_key(df["item"]), user_key=_id_sort_key(df["user"]))
    items = df[["item", "item_key"]].drop_duplicates("item").sort_values("item_key", kind="stable")["item"].tolist()
    users = df[["user", "user_key"]].drop_duplicates("user").sort_values("user_key", kind="stable")["user"].tolist()
    item_dense = {item: i for i, item in enumerate(items, start=1)}
    user_dense = {user: u for u, user in enumerate(users)}
    df = df.assign(i=df["item"].map(item_dense), u=df["user"].map(user_dense))
    df = df.sort_values(["u", "timestamp", "item_key"], kind="stable")
    sequences = [list(map(int, s)) for s in df.groupby("u", sort=True)["i"].agg(list)]
    ds = SplitDataset(
        name=name,
        item_ids=[""] + items,
        titles=[""] + [titles[i] for i in items],
        user_ids=users,
        sequences=sequences,
    )
    ds.stats = {**dataset_stats(ds), "dropped": dropped, "repairs": dict(repairs)}
    return ds


def dataset_stats(ds: SplitDataset) -> dict:
    """The columns of the paper's Table 2."""
    n_inter = sum(len(s) for s in ds.sequences)
    return {
        "dataset": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": n_inter,
        "avg_length": round(n_inter / ds.n_users, 1),
        "density": round(n_inter / (ds.n_users * ds.n_items), 4),
    }


def stats_markdown(stats: dict) -> str:
    header = ["Dataset", "Users", "Items", "Interactions", "Avg. length", "Density"]
    row = [stats["dataset"], f"{stats['users']:,}", f"{stats['items']:,}", f"{stats['interactions']:,}", stats["avg_length"],
           stats["density"]]
    return markdown_table(header, [row], "lrrrrr")


def dataset_name(cfg: DataConfig) -> str:
    name = cfg.dataset if cfg.dataset != "amazon" else f"amazon-{cfg.category}"
    return name if cfg.max_users is None else f"{name}-first{cfg.max_users}users"


def _cache_key(cfg: DataConfig) -> str:
    """The data settings and the raw files' CONTENT (`data_fingerprint`): a file rewritten
    with the same size and mtime is a new key, a file touched but unchanged is the same one."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    blob = json.dumps({"v": CACHE_VERSION, "cfg": settings, "files": data_fingerprint(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_dataset(cfg: DataConfig, use_cache: bool = True) -> SplitDataset:
    """Load and preprocess the configured dataset, reusing a cached result for the same config
    and the same raw files."""
    name = dataset_name(cfg)
    cache = Path(cfg.cache_dir) / f"{name}-{_cache_key(cfg)}.json"
    if use_cache and cache.is_file():
        return SplitDataset.load(cache)
    ds = preprocess(*load_raw(cfg), cfg, name)
    if use_cache:
        ds.save(cache)
    return ds
