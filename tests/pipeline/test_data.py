"""Loaders on small fixture files in each format, 5-core, the split, titles, bad input."""
import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import DataConfig, load_config
from pipeline.data import load_dataset
from pipeline.data.loaders import clean_movielens_title, clean_title
from pipeline.data.preprocess import k_core
from pipeline.errors import PipelineError
from tests.helpers.data import N_ITEMS, N_USERS, TITLES, interactions, write_amazon, write_generic, write_ml100k, write_ml_latest_small
from tests.helpers.scripts import REPO


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("fmt", ["generic", "ml-latest-small", "ml-100k", "amazon"])
def test_each_loader_gives_the_same_5core_dataset(tmp_path, fmt):
    root = tmp_path / fmt
    writer = {"generic": write_generic, "ml-latest-small": write_ml_latest_small, "ml-100k": write_ml100k, "amazon": write_amazon}[fmt]
    writer(root)
    kw = {"category": "Beauty"} if fmt == "amazon" else {}
    ds = load_dataset(_cfg(tmp_path, dataset=fmt, path=str(root), **kw))
    assert ds.n_users == N_USERS and ds.n_items == N_ITEMS  # user 9 and item 9 filtered out
    assert ds.stats["interactions"] == N_USERS * N_ITEMS
    assert ds.stats["avg_length"] == 6.0
    title4 = ds.titles[ds.item_index()[("B004" if fmt == "amazon" else "4")]]
    assert title4.startswith("The Usual Suspects")
    if fmt in ("ml-latest-small", "ml-100k"):
        assert title4 == "The Usual Suspects (1995)"
    if fmt == "ml-latest-small":
        assert ds.titles[ds.item_index()["5"]] == "The City of Lost Children (1995)"
    if fmt == "amazon":
        assert ds.titles[ds.item_index()["B006"]] == "Soap & Glory"


def test_split_targets_are_last_interactions_and_ties_break_by_original_item_id(tmp_path):
    rows = interactions()
    ds = load_dataset(_cfg(tmp_path, dataset="generic", path=str(write_generic(tmp_path / "g", rows))))
    by_user = {}
    for u, i, t in rows:
        if i != "9":  # item 9 is removed by 5-core
            by_user.setdefault(u, []).append((t, int(i)))
    for u_idx, user in enumerate(ds.user_ids):
        expected = [str(i) for t, i in sorted(by_user[user])]
        got = [ds.item_ids[i] for i in ds.sequences[u_idx]]
        assert got == expected
        assert ds.item_ids[ds.targets("test")[u_idx]] == expected[-1]
        assert ds.item_ids[ds.targets("val")[u_idx]] == expected[-2]
        assert [ds.item_ids[i] for i in ds.train_sequence(u_idx)] == expected[:-2]
        assert ds.inputs("test")[u_idx] == ds.sequences[u_idx][:-1]
    # user 3 rated items 6 and 2 in the same second: item "2" < "6" numerically, so 6 is last
    u3 = ds.user_ids.index("3")
    assert ds.item_ids[ds.targets("test")[u3]] == "6"
    assert ds.item_ids[ds.targets("val")[u3]] == "2"


def test_tie_break_is_numeric_not_string_order(tmp_path):
    # items "10" and "9" tie; numerically 9 < 10, so 10 is the test target (string order would say 9)
    rows = [(str(u), str(i), 100 + i) for u in range(1, 6) for i in range(1, 9)]
    rows += [(str(u), "9", 500) for u in range(1, 6)] + [(str(u), "10", 500) for u in range(1, 6)]
    titles = {str(i): f"T{i}" for i in range(1, 11)}
    ds = load_dataset(_cfg(tmp_path, dataset="generic", path=str(write_generic(tmp_path / "g", rows, titles))))
    assert {ds.item_ids[t] for t in ds.targets("test")} == {"10"}
    assert {ds.item_ids[t] for t in ds.targets("val")} == {"9"}


def test_dense_ids_follow_original_numeric_order(tmp_path):
    ds = load_dataset(_cfg(tmp_path, dataset="generic", path=str(write_generic(tmp_path / "g"))))
    assert ds.item_ids == ["", "1", "2", "3", "4", "5", "6"]
    assert ds.user_ids == ["1", "2", "3", "4", "5", "6"]


def test_k_core_is_iterative():
    import pandas as pd

    # item c has 2 users; removing it leaves user y with 2 items -> y removed -> item b drops to 2
    df = pd.DataFrame(
        [("x", "a"), ("x", "b"), ("x", "c"), ("y", "a"), ("y", "b"), ("y", "c"), ("z", "a"), ("z", "b")],
        columns=["user", "item"],
    )
    assert len(k_core(df, 3, 3)) == 0
    assert len(k_core(df, 2, 2)) == 8


def test_items_without_titles_are_dropped_before_k_core(tmp_path):
    titles = {k: v for k, v in TITLES.items() if k != "6"}
    ds = load_dataset(_cfg(tmp_path, dataset="generic", path=str(write_generic(tmp_path / "g", titles=titles)), min_item_count=1))
    assert "6" not in ds.item_ids


def test_max_users_slices_before_k_core(tmp_path):
    ds = load_dataset(_cfg(tmp_path, dataset="generic", path=str(write_generic(tmp_path / "g")), max_users=5, min_item_count=1))
    assert ds.user_ids == ["1", "2", "3", "4", "5"]


def test_cache_reused_and_keyed_by_config(tmp_path):
    root = write_generic(tmp_path / "g")
    cfg = _cfg(tmp_path, dataset="generic", path=str(root))
    load_dataset(cfg)
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1
    assert load_dataset(cfg).sequences == load_dataset(cfg, use_cache=False).sequences
    load_dataset(_cfg(tmp_path, dataset="generic", path=str(root), min_item_count=1))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_bundled_ml100k_statistics_and_ties():
    """Classic ML-100K from the recbole wheel: SPEC's figures after 5-core."""
    ds = load_dataset(DataConfig(), use_cache=False)
    assert (ds.n_users, ds.n_items, ds.stats["interactions"], ds.stats["avg_length"]) == (943, 1349, 99287, 105.3)
    assert ds.titles[ds.item_index()["1"]] == "Toy Story (1995)"
    # 416 users rated their last two items in the same second: the tie rule decides those targets
    from pipeline.data.loaders import load_ml100k

    raw, _, _ = load_ml100k()
    ts = {(u, i): t for u, i, t in zip(raw.user, raw.item, raw.timestamp)}
    tied = [u for u, s in enumerate(ds.sequences)
            if ts[ds.user_ids[u], ds.item_ids[s[-1]]] == ts[ds.user_ids[u], ds.item_ids[s[-2]]]]
    assert len(tied) == 416
    # ... and for each, the later item is the one with the larger original (numeric) id
    assert all(int(ds.item_ids[ds.sequences[u][-1]]) > int(ds.item_ids[ds.sequences[u][-2]]) for u in tied)


def test_title_cleaning():
    assert clean_title("Birdcage, The") == "The Birdcage"
    assert clean_title("Man for All Seasons, A") == "A Man for All Seasons"
    assert clean_title("Affair to Remember, An") == "An Affair to Remember"
    assert clean_title("  Tom &amp;  Jerry ") == "Tom & Jerry"
    assert clean_movielens_title("Seven (Se7en) (1995)") == "Seven (1995)"
    assert clean_movielens_title("Usual Suspects, The", "1995") == "The Usual Suspects (1995)"


# ---------------------------------------------------------------------------- bad input


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="interactions.csv not found"):
        load_dataset(_cfg(tmp_path, dataset="generic", path=str(tmp_path / "nowhere")))


def test_missing_columns_is_one_line_error(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    (root / "interactions.csv").write_text("user,item\n1,2\n")
    (root / "items.csv").write_text("item,title\n2,X\n")
    with pytest.raises(PipelineError, match=r"missing column\(s\) timestamp"):
        load_dataset(_cfg(tmp_path, dataset="generic", path=str(root)))


def test_amazon_meta_is_never_evaluated(tmp_path):
    root = write_amazon(tmp_path / "a")
    with gzip.open(root / "meta_Beauty.json.gz", "wt") as f:
        f.write("__import__('os').system('touch PWNED')\n")
    with pytest.raises(PipelineError, match="line 1 is not a Python/JSON dict literal"):
        load_dataset(_cfg(tmp_path, dataset="amazon", path=str(root), category="Beauty"))
    assert not Path("PWNED").exists()


def _run_script(tmp_path, *args):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_retriever.py"), "--out", str(out), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    return proc, out


@pytest.mark.parametrize(
    "setup, sets, message",
    [
        ("missing", [], "interactions.csv not found"),
        ("nocols", [], "missing column(s)"),
        ("tiny", [], "empty after 5/5-core filtering"),
        ("ok", ["retriever.bogus=1"], "unknown config key retriever.'bogus'"),
        ("ok", ["retriever.lr=fast"], "retriever.lr must be a number"),
    ],
)
def test_script_bad_input_one_line_error_nonzero_exit_no_outputs(tmp_path, setup, sets, message):
    root = tmp_path / "data"
    if setup == "nocols":
        root.mkdir()
        (root / "interactions.csv").write_text("user,item\n1,2\n")
        (root / "items.csv").write_text("item,title\n2,X\n")
    elif setup == "tiny":
        write_generic(root, rows=[("1", "1", 1), ("1", "2", 2), ("2", "1", 3)])
    elif setup == "ok":
        write_generic(root)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: generic\n  path: {root}\n  cache_dir: {tmp_path / 'cache'}\nretriever:\n  model: pop\n")
    sets = [x for s in sets for x in ("--set", s)]
    proc, out = _run_script(tmp_path, "--config", str(cfg), *sets)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], proc.stderr
    assert not (out / "candidates_test.jsonl").exists() and not (out / "metrics.json").exists()


def test_config_unknown_key_and_bad_value():
    with pytest.raises(PipelineError, match="unknown config key data.'pathh'"):
        load_config(None, ["data.pathh=x"])
    with pytest.raises(PipelineError, match="retriever.model = 'lru' is not one of"):
        load_config(None, ["retriever.model=lru"])
    with pytest.raises(PipelineError, match="data.path is required"):
        load_config(None, ["data.dataset=generic"])
    cfg = load_config(None, ["retriever.max_epochs=3", "data.max_users=50"])
    assert cfg.retriever.max_epochs == 3 and cfg.data.max_users == 50
