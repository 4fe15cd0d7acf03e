"""Raw dataset formats -> (interactions, titles), before any filtering.

Every loader returns
  interactions: DataFrame with columns user, item (str), timestamp (float), rating (float, NaN
                when the format has none), one row per interaction as in the file;
  titles: dict original item id (str) -> cleaned title (items without a usable title absent);
  repairs: counts of what was repaired on the way (`REPAIRS`), for dataset_stats.json.
An item id listed twice with two different titles is an error naming both lines (which title is
right cannot be known); listed twice with the same title, the copy is dropped and counted.
Missing files or columns, malformed rows and non-UTF-8 bytes raise a one-line PipelineError naming
the file (and line) and the fix (see "helpers" below).
"""
from __future__ import annotations

import ast
import csv
import gzip
import html
import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
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
#
# Malformed input is an error, never silently repaired: a row with the wrong number of fields, a
# non-numeric timestamp or rating, an empty user/item id, bytes that are not UTF-8, an unclosed
# quote (a truncated file) or an unparsable meta record stops the run with a one-line
# PipelineError naming the file, the line and the fix. Silent repair would change the dataset
# (and with it every number a run reports) without anyone noticing. Line numbers are those of the
# file (header = line 1); the exact mapping is only computed when something is wrong.


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path} (set data.path to the directory that holds it)")
    return path


def _non_utf8_line(lines) -> tuple[int, int]:
    """(1-based line number, byte offset in that line) of the first line that is not UTF-8."""
    for lineno, raw in enumerate(lines, 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return lineno, e.start
    return 0, 0  # not reached for a file that failed to decode


def _not_utf8(path: Path, lines) -> PipelineError:
    lineno, col = _non_utf8_line(lines)
    return PipelineError(
        f"{path} line {lineno} is not valid UTF-8 (byte {col + 1} of the line): "
        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _csv_rows(path: Path, sep: str, quoting: int) -> list[tuple[int, int]]:
    """(line number, field count) of every row pandas reads from `path`, in order (blank lines
    skipped as pandas skips them). Only called when a row is wrong, to name its line."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting)
        start = 1
        try:
            for row in reader:
                if row and not (len(row) == 1 and not row[0].strip()):
                    out.append((start, len(row)))
                start = reader.line_num + 1
        except csv.Error:
            pass  # an unclosed quote at the end: the rows before it are mapped
    return out


def _line_of(df: pd.DataFrame, i: int) -> int:
    """File line number of data row `i` (0-based, header excluded) of a frame from `_read_csv`."""
    path, sep, quoting, header = df.attrs["source"]
    rows = _csv_rows(path, sep, quoting)
    k = i + header
    return rows[k][0] if k < len(rows) else k + 1


def _read_csv(path: Path, sep: str = ",", header: bool = True, quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Every field as a string (as written; callers strip). Every row must have exactly as many
    fields as the first one (the header when `header`); anything else is a one-line error naming
    the line."""
    try:
        # header=None: pandas then takes the field count from the first line and refuses a longer
        # row (with a header it would silently turn an extra field into an index column).
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, encoding="utf-8", quoting=quoting)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            raise _not_utf8(path, f) from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path} is empty: re-export the file") from None
    except pd.errors.ParserError as e:
        text = str(e)
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if m:
            raise PipelineError(
                f"{path} line {m[2]} has {m[3]} fields, expected {m[1]} (an unquoted {sep!r} inside a value?): "
                "fix or drop that line"
            ) from None
        m = re.search(r"EOF inside string starting at row (\d+)", text)
        if m:
            rows = _csv_rows(path, sep, quoting)
            k = int(m[1])
            line = rows[k][0] if k < len(rows) else k + 1
            raise PipelineError(
                f"{path} line {line}: a quoted value never closes (truncated file or stray quote): fix that line"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else "parse error"
        raise PipelineError(f"{path} is not a readable CSV ({first}): fix or re-export the file") from None
    df.attrs["source"] = (path, sep, quoting, int(header))
    # pandas pads a row with too FEW fields with "" (a truncated last line, a missing column):
    # rows holding an empty field are checked against the file for their real field count.
    if (df == "").to_numpy().any():
        width = df.shape[1]
        for line, n in _csv_rows(path, sep, quoting):
            if n != width:
                raise PipelineError(
                    f"{path} line {line} has {n} field{'s' if n != 1 else ''}, expected {width} (truncated or missing a value?): "
                    "fix or drop that line"
                )
    if header:
        names = [str(c).strip() for c in df.iloc[0]]
        dup = next((c for n, c in enumerate(names) if c in names[:n]), None)
        if dup is not None:  # df[name] would be a frame of both columns: which one is meant cannot be known
            raise PipelineError(f"{path} line 1 names column {dup!r} twice: keep one column of each name")
        df.columns = names
        df = df.iloc[1:].reset_index(drop=True)
        df.attrs["source"] = (path, sep, quoting, 1)
    return df


def _check_columns(df: pd.DataFrame, needed: list[str], path: Path) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{path} is missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))}): "
            f"the file needs a header with {', '.join(needed)}"
        )


# What loading repairs rather than refuses, counted in dataset_stats.json "repairs".
REPAIRS = {
    "duplicate_item_rows": "item rows repeating an id with the same title (dropped)",
    "titles_whitespace_cleaned": "titles whose spaces were trimmed or collapsed",
    "ids_whitespace_trimmed": "user/item ids with spaces around them (trimmed)",
}


def _no_repairs() -> dict[str, int]:
    return {key: 0 for key in REPAIRS}


def _catalogue(rows, path: Path, line_of, repairs: dict[str, int]) -> dict[str, str]:
    """{item id: cleaned title} from (row key, raw id, raw title, cleaned title) rows; `line_of(row
    key)` gives the file line (computed only for an error). Rows with an empty title are left out
    (preprocessing drops and counts those items)."""
    titles: dict[str, str] = {}
    first: dict[str, object] = {}
    for key, raw_id, raw_title, cleaned in rows:
        item, title = str(raw_id).strip(), str(raw_title)
        if not title.strip():
            continue
        repairs["ids_whitespace_trimmed"] += item != raw_id
        repairs["titles_whitespace_cleaned"] += " ".join(title.split()) != title
        if item in titles:
            if titles[item] != cleaned:
                raise PipelineError(
                    f"{path}: item {item!r} has two different titles, {titles[item]!r} on line {line_of(first[item])} "
                    f"and {cleaned!r} on line {line_of(key)}: keep one line per item id"
                )
            repairs["duplicate_item_rows"] += 1
            continue
        titles[item], first[item] = cleaned, key
    return titles


def _interactions(df: pd.DataFrame, path: Path, user: str, item: str, ts: str, rating: str | None,
                  repairs: dict[str, int]) -> pd.DataFrame:
    out = pd.DataFrame({"user": df[user].str.strip(), "item": df[item].str.strip()})
    repairs["ids_whitespace_trimmed"] += int(((out["user"] != df[user]) | (out["item"] != df[item])).sum())
    ts_text = df[ts].str.strip()
    out["timestamp"] = pd.to_numeric(ts_text, errors="coerce")
    checks = [
        ((out["user"] == "") | (out["item"] == ""), lambda i: "empty user or item id"),
        (~np.isfinite(out["timestamp"]), lambda i: f"timestamp {ts_text.iloc[i]!r} is not a number"),
    ]
    if rating:
        # A rating may be left empty (unknown: kept, NaN; data.min_rating drops it), but a value
        # that is there must be a number.
        rating_text = df[rating].str.strip()
        out["rating"] = pd.to_numeric(rating_text, errors="coerce")
        checks.append((out["rating"].isna() & (rating_text != ""), lambda i: f"rating {rating_text.iloc[i]!r} is not a number"))
    else:
        out["rating"] = float("nan")
    for bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise PipelineError(f"{path} line {_line_of(df, i)}: {what(i)}: fix or drop that line")
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
    items = _read_csv(item_p, sep="\t", quoting=csv.QUOTE_NONE)
    items.columns = [c.split(":")[0] for c in items.columns]
    _check_columns(items, ["item_id", "movie_title"], item_p)
    years = items["release_year"] if "release_year" in items.columns else [""] * len(items)
    repairs = _no_repairs()
    titles = _catalogue(
        ((n, i, t, clean_movielens_title(t, y.strip() or None))
         for n, (i, t, y) in enumerate(zip(items["item_id"], items["movie_title"], years))),
        item_p, lambda n: _line_of(items, n), repairs,
    )
    return _interactions(inter, inter_p, "user_id", "item_id", "timestamp", "rating", repairs), titles, repairs


def load_ml_latest_small(path: str):
    """MovieLens ml-latest-small (the paper's "ML-100k"): ratings.csv + movies.csv with headers."""
    root = Path(path)
    ratings_p = _require(root / "ratings.csv", "MovieLens ratings.csv")
    movies_p = _require(root / "movies.csv", "MovieLens movies.csv")
    ratings = _read_csv(ratings_p)
    _check_columns(ratings, ["userId", "movieId", "rating", "timestamp"], ratings_p)
    movies = _read_csv(movies_p)
    _check_columns(movies, ["movieId", "title"], movies_p)
    repairs = _no_repairs()
    titles = _catalogue(
        ((n, i, t, clean_movielens_title(t)) for n, (i, t) in enumerate(zip(movies["movieId"], movies["title"]))),
        movies_p, lambda n: _line_of(movies, n), repairs,
    )
    return _interactions(ratings, ratings_p, "userId", "movieId", "timestamp", "rating", repairs), titles, repairs


def load_amazon(path: str, category: str):
    """Amazon 2014: ratings_<Cat>.csv (user,item,rating,timestamp; no header) and
    meta_<Cat>.json.gz, one Python-literal dict (or JSON object) per line (parsed with
    ast.literal_eval / json, never eval)."""
    root = Path(path)
    ratings_p = _require(root / f"ratings_{category}.csv", f"Amazon ratings_{category}.csv")
    meta_p = _require(root / f"meta_{category}.json.gz", f"Amazon meta_{category}.json.gz")
    ratings = _read_csv(ratings_p, header=False)
    if ratings.shape[1] != 4:
        raise PipelineError(f"{ratings_p} has {ratings.shape[1]} columns, expected 4 (user,item,rating,timestamp) without a header")
    ratings.columns = ["user", "item", "rating", "timestamp"]
    repairs = _no_repairs()
    titles = _amazon_titles(meta_p, repairs)
    return _interactions(ratings, ratings_p, "user", "item", "timestamp", "rating", repairs), titles, repairs


def _meta_record(line: str, meta_p: Path, lineno: int) -> dict:
    """One meta line: a Python dict literal (the 2014 dumps; ast.literal_eval, never eval) or a
    JSON object (later dumps, with true/false/null)."""
    try:
        rec = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            rec = json.loads(line)
        except ValueError:
            raise PipelineError(
                f"{meta_p} line {lineno} is not a Python/JSON dict literal (truncated?): fix or drop that line"
            ) from None
    if not isinstance(rec, dict):
        raise PipelineError(f"{meta_p} line {lineno} is a {type(rec).__name__}, not a dict record: fix or drop that line")
    return rec


def _amazon_titles(meta_p: Path, repairs: dict[str, int]) -> dict[str, str]:
    """asin -> cleaned title from meta_<Cat>.json.gz; records without a title are skipped (those
    items are dropped in preprocessing, and counted there); an asin twice: `_catalogue`."""
    return _catalogue(_amazon_records(meta_p), meta_p, lambda lineno: lineno, repairs)


def _amazon_records(meta_p: Path):
    """(line number, asin, raw title, cleaned title) of each meta record with an asin."""
    lineno = 0
    try:
        with gzip.open(meta_p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PipelineError(
                        f"{meta_p} line {lineno} is not valid UTF-8 (byte {e.start + 1} of the line): "
                        "re-encode the records as UTF-8 and re-compress the file"
                    ) from None
                if not line.strip():
                    continue
                rec = _meta_record(line, meta_p, lineno)
                if rec.get("asin"):
                    title = str(rec.get("title") or "")
                    yield lineno, str(rec["asin"]), title, clean_title(title)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise PipelineError(
            f"{meta_p} cannot be read as gzip after line {lineno} ({type(e).__name__}: truncated or not gzip'd): "
            "re-download or re-compress it"
        ) from None


def load_generic(path: str):
    """interactions.csv (user,item,timestamp[,rating]) + items.csv (item,title), with headers."""
    root = Path(path)
    inter_p = _require(root / "interactions.csv", "interactions.csv")
    items_p = _require(root / "items.csv", "items.csv")
    inter = _read_csv(inter_p)
    _check_columns(inter, ["user", "item", "timestamp"], inter_p)
    items = _read_csv(items_p)
    _check_columns(items, ["item", "title"], items_p)
    repairs = _no_repairs()
    titles = _catalogue(
        ((n, i, t, clean_title(t)) for n, (i, t) in enumerate(zip(items["item"], items["title"]))),
        items_p, lambda n: _line_of(items, n), repairs,
    )
    rating = "rating" if "rating" in inter.columns else None
    return _interactions(inter, inter_p, "user", "item", "timestamp", rating, repairs), titles, repairs


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
    """The files a dataset is read from (their content keys the preprocessing cache: `pipeline.data.fingerprint.data_fingerprint`)."""
    root = Path(cfg.path) if cfg.path else bundled_ml100k_dir()
    names = {
        "ml-100k": ["ml-100k.inter", "ml-100k.item"],
        "ml-latest-small": ["ratings.csv", "movies.csv"],
        "amazon": [f"ratings_{cfg.category}.csv", f"meta_{cfg.category}.json.gz"],
        "generic": ["interactions.csv", "items.csv"],
    }[cfg.dataset]
    return [root / n for n in names]
