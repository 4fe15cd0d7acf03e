"""Raw dataset formats -> (interactions, titles), before any filtering.

Every loader returns
  interactions: DataFrame with columns user, item (str), timestamp (float), rating (float, NaN
                when the format has none), one row per interaction as in the file;
  titles: dict original item id (str) -> cleaned title (items without a usable title absent).
Missing files or columns raise a one-line PipelineError naming the file and the fix.
"""
from __future__ import annotations

import ast
import gzip
import html
import importlib.metadata
import re
from pathlib import Path

import pandas as pd

from pipeline.config import DataConfig
from pipeline.errors import PipelineError

COLUMNS = ["user", "item", "timestamp", "rating"]


# ---------------------------------------------------------------------------- titles

_ARTICLES = ("The", "A", "An")


def clean_title(title: str) -> str:
    """LlamaRec's title cleaning: unescape HTML, collapse spaces, and move a trailing article
    (", The" / ", A" / ", An", any case) to the front: "Usual Suspects, The" -> "The Usual Suspects"."""
    t = " ".join(html.unescape(str(title)).split())
    for art in _ARTICLES:
        suffix = ", " + art.lower()
        if t.lower().endswith(suffix):
            return f"{art} {t[: -len(suffix)]}".strip()
    return t


_YEAR = re.compile(r"\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
_PAREN = re.compile(r"\s*\([^()]*\)")


def clean_movielens_title(raw: str, year: str | None = None) -> str:
    """MovieLens title -> "Title (Year)": the year is taken from the end of the title (or given),
    alternative titles in parentheses are dropped, a trailing article moves to the front:
    "City of Lost Children, The (Cité des enfants perdus, La) (1995)" -> "The City of Lost Children (1995)"."""
    raw = " ".join(str(raw).split())
    m = _YEAR.search(raw)
    if m:
        year, raw = year or m.group(1), raw[: m.start()]
    name = clean_title(_PAREN.sub("", raw).strip())
    if not name:  # a title that was only parentheses: keep it rather than lose the item
        name = clean_title(raw.strip())
    return f"{name} ({year})" if year else name


# ---------------------------------------------------------------------------- helpers


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path} (set data.path to the directory that holds it)")
    return path


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", **kw)
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not valid UTF-8 (byte {e.start}): re-encode the file as UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "empty file"
        raise PipelineError(f"{path} is not a readable CSV ({first}): fix or re-export the file") from None


def _check_columns(df: pd.DataFrame, needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{path} is missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))}): "
            f"the file needs a header with {', '.join(needed)}"
        )


def _interactions(df: pd.DataFrame, path: Path, user: str, item: str, ts: str, rating: str | None) -> pd.DataFrame:
    out = pd.DataFrame({"user": df[user].str.strip(), "item": df[item].str.strip()})
    out["timestamp"] = pd.to_numeric(df[ts], errors="coerce")
    out["rating"] = pd.to_numeric(df[rating], errors="coerce") if rating else float("nan")
    bad = out["timestamp"].isna() | (out["user"] == "") | (out["item"] == "")
    if bad.any():
        row = int(bad.idxmax()) + 2  # +1 for the header, +1 for 1-based lines
        raise PipelineError(f"{path} line {row}: empty user/item or non-numeric timestamp: fix or drop that line")
    return out[COLUMNS]


# ---------------------------------------------------------------------------- formats


def bundled_ml100k_dir() -> Path:
    """Classic ML-100K as shipped inside the recbole wheel (read directly, recbole not imported)."""
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError("package recbole is not installed: run `bash setup.sh`") from None
    return Path(dist.locate_file("recbole/dataset_example/ml-100k"))


def load_ml100k(path: str | None = None):
    """RecBole atomic files ml-100k.inter (user_id, item_id, rating, timestamp) and ml-100k.item
    (item_id, movie_title, release_year, class): tab-separated with typed headers."""
    root = Path(path) if path else bundled_ml100k_dir()
    inter_p = _require(root / "ml-100k.inter", "ML-100K interactions file")
    item_p = _require(root / "ml-100k.item", "ML-100K item file")
    inter = _read_csv(inter_p, sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    _check_columns(inter, ["user_id", "item_id", "rating", "timestamp"], inter_p)
    items = _read_csv(item_p, sep="\t", quoting=3)
    items.columns = [c.split(":")[0] for c in items.columns]
    _check_columns(items, ["item_id", "movie_title"], item_p)
    years = items["release_year"] if "release_year" in items.columns else [""] * len(items)
    titles = {
        i.strip(): clean_movielens_title(t, y.strip() or None)
        for i, t, y in zip(items["item_id"], items["movie_title"], years)
        if t.strip()
    }
    return _interactions(inter, inter_p, "user_id", "item_id", "timestamp", "rating"), titles


def load_ml_latest_small(path: str):
    """MovieLens ml-latest-small (the paper's "ML-100k"): ratings.csv + movies.csv with headers."""
    root = Path(path)
    ratings_p = _require(root / "ratings.csv", "MovieLens ratings.csv")
    movies_p = _require(root / "movies.csv", "MovieLens movies.csv")
    ratings = _read_csv(ratings_p)
    _check_columns(ratings, ["userId", "movieId", "rating", "timestamp"], ratings_p)
    movies = _read_csv(movies_p)
    _check_columns(movies, ["movieId", "title"], movies_p)
    titles = {i.strip(): clean_movielens_title(t) for i, t in zip(movies["movieId"], movies["title"]) if t.strip()}
    return _interactions(ratings, ratings_p, "userId", "movieId", "timestamp", "rating"), titles


def load_amazon(path: str, category: str):
    """Amazon 2014: ratings_<Cat>.csv (user,item,rating,timestamp; no header) and
    meta_<Cat>.json.gz, one Python-literal dict per line (parsed with ast.literal_eval, never eval)."""
    root = Path(path)
    ratings_p = _require(root / f"ratings_{category}.csv", f"Amazon ratings_{category}.csv")
    meta_p = _require(root / f"meta_{category}.json.gz", f"Amazon meta_{category}.json.gz")
    ratings = _read_csv(ratings_p, header=None)
    if ratings.shape[1] != 4:
        raise PipelineError(f"{ratings_p} has {ratings.shape[1]} columns, expected 4 (user,item,rating,timestamp) without a header")
    ratings.columns = ["user", "item", "rating", "timestamp"]
    titles: dict[str, str] = {}
    try:
        with gzip.open(meta_p, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise PipelineError(f"{meta_p} line {lineno} is not a Python/JSON dict literal: fix or drop that line") from None
                if isinstance(rec, dict) and rec.get("asin") and str(rec.get("title", "")).strip():
                    titles[str(rec["asin"]).strip()] = clean_title(rec["title"])
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PipelineError(f"{meta_p} cannot be read as gzip'd UTF-8 text ({type(e).__name__}): re-download or re-compress it") from None
    return _interactions(ratings, ratings_p, "user", "item", "timestamp", "rating"), titles


def load_generic(path: str):
    """interactions.csv (user,item,timestamp[,rating]) + items.csv (item,title), with headers."""
    root = Path(path)
    inter_p = _require(root / "interactions.csv", "interactions.csv")
    items_p = _require(root / "items.csv", "items.csv")
    inter = _read_csv(inter_p)
    _check_columns(inter, ["user", "item", "timestamp"], inter_p)
    items = _read_csv(items_p)
    _check_columns(items, ["item", "title"], items_p)
    titles = {i.strip(): clean_title(t) for i, t in zip(items["item"], items["title"]) if t.strip()}
    rating = "rating" if "rating" in inter.columns else None
    return _interactions(inter, inter_p, "user", "item", "timestamp", rating), titles


def load_raw(cfg: DataConfig):
    """Dispatch on data.dataset."""
    if cfg.dataset == "ml-100k":
        return load_ml100k(cfg.path)
    if cfg.dataset == "ml-latest-small":
        return load_ml_latest_small(cfg.path)
    if cfg.dataset == "amazon":
        return load_amazon(cfg.path, cfg.category)
    return load_generic(cfg.path)


def raw_files(cfg: DataConfig) -> list[Path]:
    """The files a dataset is read from (their size and mtime key the preprocessing cache)."""
    root = Path(cfg.path) if cfg.path else bundled_ml100k_dir()
    names = {
        "ml-100k": ["ml-100k.inter", "ml-100k.item"],
        "ml-latest-small": ["ratings.csv", "movies.csv"],
        "amazon": [f"ratings_{cfg.category}.csv", f"meta_{cfg.category}.json.gz"],
        "generic": ["interactions.csv", "items.csv"],
    }[cfg.dataset]
    return [root / n for n in names]
