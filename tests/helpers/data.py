"""Tiny raw datasets in every supported format (`write_*`), and a tiny split dataset (`make_ds`)."""
import gzip
from pathlib import Path

from pipeline.data.dataset import SplitDataset

# Six users x six items, everything dense enough to survive 5-core except user "u9" (2 ratings)
# and item "i9" (rated by one user only). Timestamps tie on purpose (see the tie test).
N_USERS, N_ITEMS = 6, 6


def interactions():
    rows = []
    for u in range(1, N_USERS + 1):
        for k, i in enumerate(range(1, N_ITEMS + 1)):
            # item order differs per user
            t = 1000 + 10 * ((k + u) % N_ITEMS)
            rows.append((str(u), str(i), t))
    rows.append(("1", "9", 5000))  # item 9: one rating -> removed by 5-core
    rows += [("9", "1", 7), ("9", "2", 8)]  # user 9: two ratings -> removed
    # user 3: make its last two items tie (same second) with ids 6 and 2 -> order by item id
    rows = [(u, i, 9999 if (u == "3" and i in ("6", "2")) else t) for u, i, t in rows]
    return rows



N_TRAIN_ITEMS = 40  # items 1..40 appear in train sequences; 41.. only as val/test targets

TITLES = {str(i): f"Movie {i}" for i in range(1, N_ITEMS + 1)} | {"9": "Lonely Movie"}
TITLES["4"] = "Usual Suspects, The"


def write_generic(root: Path, rows=None, titles=None):
    rows = interactions() if rows is None else rows
    titles = TITLES if titles is None else titles
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.csv").write_text("user,item,timestamp,rating\n" + "".join(f"{u},{i},{t},4\n" for u, i, t in rows))
    (root / "items.csv").write_text("item,title\n" + "".join(f'{i},"{t}"\n' for i, t in titles.items()))
    return root


def write_ml_latest_small(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in interactions()))
    titles = {i: f"{t} (1995)" for i, t in TITLES.items()}
    titles["5"] = "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    (root / "movies.csv").write_text("movieId,title,genres\n" + "".join(f'{i},"{t}",Drama\n' for i, t in titles.items()))
    return root


def write_ml100k(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in interactions())
    )
    (root / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t1995\tDrama\n" for i, t in TITLES.items())
    )
    return root


def write_amazon(root: Path, cat="Beauty"):
    root.mkdir(parents=True, exist_ok=True)
    asin = {i: f"B00{i}" for i in TITLES}
    (root / f"ratings_{cat}.csv").write_text("".join(f"A{u},{asin[i]},5.0,{t}\n" for u, i, t in interactions()))
    with gzip.open(root / f"meta_{cat}.json.gz", "wt", encoding="utf-8") as f:
        for i, t in TITLES.items():
            # Python-literal dicts (single quotes), as the 2014 dumps; one has HTML entities
            title = "Soap &amp; Glory" if i == "6" else t
            f.write(repr({"asin": asin[i], "title": title, "price": 3.5, "categories": [["Beauty"]]}) + "\n")
        f.write(repr({"asin": "B00X", "price": 1.0}) + "\n")  # no title: dropped
    return root


def make_ds(n_users: int = 5) -> SplitDataset:
    """Users with train sequences over items 1..40 and val/test items that appear nowhere else."""
    seqs = []
    for u in range(n_users):
        train = [(u * 7 + 3 * k) % N_TRAIN_ITEMS + 1 for k in range(6 + u)]  # distinct within a user
        val, test = N_TRAIN_ITEMS + 1 + 2 * u, N_TRAIN_ITEMS + 2 + 2 * u
        seqs.append(train + [val, test])
    n_items = N_TRAIN_ITEMS + 2 * n_users
    return SplitDataset(
        name="synthetic",
        item_ids=[""] + [f"item{i}" for i in range(1, n_items + 1)],
        titles=[""] + [f"Title {i}" for i in range(1, n_items + 1)],
        user_ids=[f"user{u}" for u in range(n_users)],
        sequences=seqs,
    )
