"""Bad input (issue 5): every case stops with ONE line `error: ...` naming the problem and the fix,
a non-zero exit (2) and no partial output. Parser edge cases are tested on the functions (fast);
the CLI contract (one stderr line, exit code, nothing left in --out) through the real scripts on a
tiny generic dataset, in subprocesses.

Behaviour chosen per case (see the code for the reasons):
- malformed CSV rows (wrong field count, truncated last line, unclosed quote, non-numeric
  timestamp/rating, empty id), malformed/truncated meta records, non-UTF-8 bytes: error with file
  and line (`pipeline.data.loaders`, `pipeline.candidates`);
- duplicate interactions: each (user, item) kept once, at its earliest timestamp; counted in
  dataset stats["dropped"] and printed (`pipeline.data.preprocess`);
- items without titles: dropped and counted; none titled at all is an error;
- users with < 3 interactions: dropped by k-core; data.min_user_count < 3 is a config error;
- candidates rows: missing/mistyped fields, duplicates, unknown items, more candidates than labels;
- labels a tokenizer cannot represent (whitespace, unknown token, not round-tripping);
- unknown/mistyped config keys; an unreachable hub model id offline (fast, no retries);
- a failed fresh run removes its --out; a failed resumed run keeps it and records the error.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest

from pipeline.candidates import candidates_path, read_rows, write_rows
from pipeline.cli import run_main
from pipeline.config import DataConfig, load_config
from pipeline.data import SPLITS, load_dataset
from pipeline.data.loaders import bundled_ml100k_dir
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.prompting.labels import LETTERS, check_candidates_fit, derive_label_tokens, get_scheme
from tests.helpers.cli import _config, run_in_process, script_args, tiny_data
from tests.helpers.data import write_amazon, write_generic, write_ml100k, write_ml_latest_small
from tests.helpers.scripts import run_script
from tests.helpers.tokenizers import qwen_tokenizer

WRITERS = {"generic": write_generic, "ml-latest-small": write_ml_latest_small, "ml-100k": write_ml100k, "amazon": write_amazon}


def _load(tmp_path: Path, fmt: str, root: Path, **kw):
    extra = {"category": "Beauty"} if fmt == "amazon" else {}
    return load_dataset(DataConfig(dataset=fmt, path=str(root), cache_dir=str(tmp_path / "cache"), **extra, **kw))


def _append(path: Path, data: bytes) -> int:
    """Append `data` to `path`; the number of the file's last line afterwards."""
    with open(path, "ab") as f:
        f.write(data)
    text = path.read_bytes()
    return text.count(b"\n") + (0 if text.endswith(b"\n") else 1)


def _one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- malformed CSV rows

CSV_CASES = [
    # (format, file, appended bytes, expected message with {n} = the appended line's number)
    ("generic", "interactions.csv", b"1,2,100,4,9\n", "interactions.csv line {n} has 5 fields, expected 4"),
    ("generic", "interactions.csv", b"1,2,100", "interactions.csv line {n} has 3 fields, expected 4"),  # truncated last line
    ("generic", "interactions.csv", b"1,2,yesterday,4\n", "interactions.csv line {n}: timestamp 'yesterday' is not a number"),
    ("generic", "interactions.csv", b"\n\n1,2,100,five\n", "interactions.csv line {n}: rating 'five' is not a number"),
    ("generic", "interactions.csv", b",2,100,4\n", "interactions.csv line {n}: empty user or item id"),
    ("generic", "items.csv", b"7,Hello, World\n", "items.csv line {n} has 3 fields, expected 2"),
    ("generic", "items.csv", b'7,"Unclosed title\n', "items.csv line {n}: a quoted value never closes"),
    ("ml-latest-small", "ratings.csv", b"1,2,4.0", "ratings.csv line {n} has 3 fields, expected 4"),
    ("ml-latest-small", "movies.csv", b'7,"Seven (1995)",Drama,Extra\n', "movies.csv line {n} has 4 fields, expected 3"),
    ("ml-100k", "ml-100k.inter", b"1\t2\t4\tsoon\n", "ml-100k.inter line {n}: timestamp 'soon' is not a number"),
    ("ml-100k", "ml-100k.item", b"7\tSeven\n", "ml-100k.item line {n} has 2 fields, expected 4"),
    ("amazon", "ratings_Beauty.csv", b"A1,B001,5.0\n", "ratings_Beauty.csv line {n} has 3 fields, expected 4"),
    ("amazon", "ratings_Beauty.csv", b"A1,B001,5.0,later\n", "ratings_Beauty.csv line {n}: timestamp 'later' is not a number"),
]


@pytest.mark.parametrize("fmt, name, data, message", CSV_CASES, ids=[f"{c[1]}:{c[3].split(': ')[-1][:24]}" for c in CSV_CASES])
def test_malformed_csv_row_names_file_and_line(tmp_path, fmt, name, data, message):
    root = WRITERS[fmt](tmp_path / fmt)
    n = _append(root / name, data)
    with pytest.raises(PipelineError) as err:
        _load(tmp_path, fmt, root)
    assert message.format(n=n) in _one_line(str(err.value))
    assert "fix" in str(err.value)


NON_UTF8_CASES = [
    ("generic", "interactions.csv", b"7,Caf\xe9,100,4\n"),
    ("generic", "items.csv", b'7,"Caf\xe9"\n'),
    ("ml-latest-small", "ratings.csv", b"7,Caf\xe9,4.0,100\n"),
    ("ml-latest-small", "movies.csv", b'7,"Caf\xe9 (1995)",Drama\n'),
    ("ml-100k", "ml-100k.inter", b"7\tCaf\xe9\t4\t100\n"),
    ("ml-100k", "ml-100k.item", b"7\tCaf\xe9\t1995\tDrama\n"),  # latin-1, as the original u.item
    ("amazon", "ratings_Beauty.csv", b"A1,Caf\xe9,5.0,100\n"),
]


@pytest.mark.parametrize("fmt, name, data", NON_UTF8_CASES, ids=[c[1] for c in NON_UTF8_CASES])
def test_non_utf8_bytes_name_file_and_line(tmp_path, fmt, name, data):
    root = WRITERS[fmt](tmp_path / fmt)
    n = _append(root / name, data)
    with pytest.raises(PipelineError) as err:
        _load(tmp_path, fmt, root)
    assert f"{name} line {n} is not valid UTF-8" in _one_line(str(err.value))
    assert "re-encode the file as UTF-8" in str(err.value)


def test_bundled_ml100k_files_are_utf8():
    # The recbole wheel's ML-100K is UTF-8 (the original u.item is latin-1): strict UTF-8 reading
    # keeps the default dataset loading, and anything else gets the re-encode message above.
    for name in ("ml-100k.inter", "ml-100k.item"):
        (bundled_ml100k_dir() / name).read_bytes().decode("utf-8")


# ---------------------------------------------------------------------------- Amazon meta records


def _rewrite_meta(root: Path, extra: bytes, cut: int = 0) -> int:
    """Append raw `extra` to meta_Beauty.json.gz (re-compressed; `cut` bytes off the end of the
    gzip file afterwards); the number of the last line."""
    path = root / "meta_Beauty.json.gz"
    data = gzip.decompress(path.read_bytes()) + extra
    blob = gzip.compress(data)
    path.write_bytes(blob[: len(blob) - cut])
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


@pytest.mark.parametrize(
    "extra, cut, message",
    [
        (b"{'asin': 'B007', 'tit", 0, "line {n} is not a Python/JSON dict literal (truncated?)"),
        (b"['B007', 'Seven']\n", 0, "line {n} is a list, not a dict record"),
        (b"{'asin': 'B007', 'title': 'Caf\xe9'}\n", 0, "line {n} is not valid UTF-8"),
        (b"", 12, "cannot be read as gzip after line"),
    ],
    ids=["truncated-record", "not-a-dict", "non-utf8", "truncated-gzip"],
)
def test_malformed_amazon_meta(tmp_path, extra, cut, message):
    root = write_amazon(tmp_path / "a")
    n = _rewrite_meta(root, extra, cut)
    with pytest.raises(PipelineError) as err:
        _load(tmp_path, "amazon", root)
    assert "meta_Beauty.json.gz " in str(err.value) and message.format(n=n) in _one_line(str(err.value))


def test_amazon_meta_accepts_strict_json_records(tmp_path):
    # Later Amazon dumps are strict JSON (true/false/null, which ast.literal_eval refuses).
    root = write_amazon(tmp_path / "a")
    _rewrite_meta(root, b'{"asin": "B007", "title": "Seven &amp; Co", "in_stock": true, "brand": null}\n')
    with open(root / "ratings_Beauty.csv", "a") as f:
        f.writelines(f"A{u},B007,5.0,{9000 + u}\n" for u in range(1, 7))
    ds = _load(tmp_path, "amazon", root)
    assert ds.titles[ds.item_index()["B007"]] == "Seven & Co"


# ---------------------------------------------------------------------------- duplicates, titles, short users


def test_duplicate_interactions_are_kept_once_at_the_earliest_time(tmp_path, capsys):
    rows = [(str(u), str(i), 10 * i) for u in range(1, 6) for i in range(1, 7)]
    rows += [("1", "6", 60), ("1", "6", 60)]  # user 1: the last item recorded three times
    rows += [("2", "1", 999)]  # user 2: item 1 again after its last item (a re-rating)
    titles = {str(i): f"T{i}" for i in range(1, 7)}
    ds = _load(tmp_path, "generic", write_generic(tmp_path / "g", rows, titles))
    assert ds.stats["dropped"]["duplicate_interactions"] == 2 and ds.stats["dropped"]["repeat_interactions"] == 1
    assert "dropped 2 duplicate interactions" in capsys.readouterr().out
    for u in range(ds.n_users):
        seq = ds.sequences[u]
        assert len(seq) == len(set(seq)) == 6  # each item once
        for split in SPLITS:  # a target is never an item of its own input history
            assert ds.targets(split)[u] not in ds.inputs(split)[u]
    u2 = ds.user_ids.index("2")
    assert ds.item_ids[ds.targets("test")[u2]] == "6"  # the re-rating at t=999 is not the test target


def test_items_without_titles_are_dropped_and_counted(tmp_path, capsys):
    titles = {str(i): f"T{i}" for i in range(1, 6)} | {"6": "  "}  # item 6: blank title
    ds = _load(tmp_path, "generic", write_generic(tmp_path / "g", titles=titles))
    assert "6" not in ds.item_ids
    assert ds.stats["dropped"]["untitled_items"] == 2  # item 6 and item 9 (no line in items.csv)
    assert "dropped 2 items without a title" in capsys.readouterr().out


def test_no_item_with_a_title_is_a_one_line_error(tmp_path):
    root = write_generic(tmp_path / "g", titles={"x1": "Other", "x2": "Catalogue"})
    with pytest.raises(PipelineError, match="none of its 7 items has a title: check that the item file"):
        _load(tmp_path, "generic", root)


def test_users_with_fewer_than_3_interactions_are_dropped(tmp_path):
    rows = [(str(u), str(i), i) for u in range(1, 4) for i in range(1, 6)] + [("8", "1", 1), ("8", "2", 2)]
    ds = _load(tmp_path, "generic", write_generic(tmp_path / "g", rows), min_user_count=3, min_item_count=1)
    assert "8" not in ds.user_ids and ds.n_users == 3
    assert all(len(s) >= 3 for s in ds.sequences)


def test_min_user_count_below_3_is_refused_at_config_load():
    with pytest.raises(PipelineError, match=r"data.min_user_count must be >= 3: leave-one-out needs train, val and test"):
        load_config(None, ["data.min_user_count=2"])


# ---------------------------------------------------------------------------- candidates rows


def _row(**kw):
    return {"user": "1", "history": ["1", "2"], "candidates": ["3", "4"], "scores": [1.0, 0.5], "target": "3", **kw}


@pytest.mark.parametrize(
    "line, message",
    [
        (json.dumps(_row(candidates=[3, 4])), "line 2: field 'candidates' holds 3, not an item id string"),
        (json.dumps(_row(history=["1", None])), "line 2: field 'history' holds None, not an item id string"),
        (json.dumps(_row(scores=["high", 0.5])), "line 2: field 'scores' holds a value that is not a number"),
        (json.dumps(_row(candidates=["3", "3"])), "line 2: candidate '3' is listed twice"),
        (json.dumps(_row(scores=[1.0])), "line 2: 1 scores for 2 candidates"),
        ('{"user": "1", "history": ["1"], "candidates": ["Caf\xe9"]}', "line 2 is not valid UTF-8"),
    ],
    ids=["int-items", "null-history", "text-scores", "duplicate-candidate", "score-count", "non-utf8"],
)
def test_malformed_candidates_rows(tmp_path, line, message):
    path = tmp_path / "candidates_val.jsonl"
    path.write_bytes((json.dumps(_row()) + "\n" + line + "\n").encode("latin-1"))  # "é" -> the latin-1 byte 0xe9
    with pytest.raises(PipelineError) as err:
        read_rows(path)
    assert message in _one_line(str(err.value)) and "regenerate the file" in str(err.value)


def test_more_candidates_than_labels_is_refused_naming_the_fix():
    rows = [_row(), _row(user="7", candidates=[str(i) for i in range(21)], scores=[0.0] * 21)]
    with pytest.raises(PipelineError) as err:
        check_candidates_fit(LETTERS, rows, "run/candidates_val.jsonl")
    assert str(err.value) == (
        "run/candidates_val.jsonl: user '7' has 21 candidates but label scheme 'letters' has only 20 labels: "
        "re-run the retriever with retriever.top_k <= 20, or set reranker.label_scheme=custom with at least 21 "
        "reranker.custom_labels"
    )
    check_candidates_fit(LETTERS, rows[:1], "ok")


# ---------------------------------------------------------------------------- label schemes


@pytest.mark.parametrize("bad", ["B C", "B\nC", "B\tC", "B\u200bC", ""], ids=["space", "newline", "tab", "zero-width", "empty"])
def test_labels_with_whitespace_or_empty_are_refused(bad):
    with pytest.raises(PipelineError, match="label scheme 'custom': label .* (whitespace|must be a non-empty)"):
        get_scheme("custom", ["A", bad, "D"])


def test_a_label_the_tokenizer_does_not_keep_as_written_is_refused():
    # Qwen normalises to NFC: "e" + combining acute comes back as the one character "é", so the
    # prompt would show one label and the model be scored on another.
    with pytest.raises(PipelineError, match=r"label 'e\\u0301' does not survive tokenization .*'\\xe9'"):
        derive_label_tokens(["A", "e\u0301"], qwen_tokenizer(), "Answer:\n", "<|im_end|>")


def _char_tokenizer():
    """A character-level tokenizer WITHOUT byte fallback: characters outside its vocabulary become
    [UNK] (as in WordPiece/SentencePiece models without byte fallback)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTabcdefghijklmnopqrstuvwxyz:\n ")}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_a_label_that_maps_to_the_unknown_token_is_refused():
    tok = _char_tokenizer()
    derive_label_tokens(["A", "B"], tok, "Answer:\n", "</s>")  # known characters: fine
    with pytest.raises(PipelineError, match=r"label '€' maps to the tokenizer's unknown token '\[UNK\]'"):
        derive_label_tokens(["A", "€"], tok, "Answer:\n", "</s>")


# ---------------------------------------------------------------------------- unreachable model id


def test_an_unreachable_hub_is_detected_at_once_and_read_from_the_cache_only(monkeypatch, tmp_path):
    import socket

    import transformers

    from rerank.model import sources

    for var in ("HF_HUB_OFFLINE", *sources._PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(source, **kwargs):
        seen.update(kwargs)
        return real(source, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    sources._probe_hub.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(PipelineError) as err:
            sources.load_tokenizer("nobody/no-such-model-xyz", cache_dir=tmp_path / "models")
        assert time.monotonic() - start < 10  # no retries
    finally:
        sources._probe_hub.cache_clear()
    assert seen.get("local_files_only") is True
    assert _one_line(str(err.value)).startswith(
        "cannot load model 'nobody/no-such-model-xyz': huggingface.co is unreachable (Name or service not known) "
        "and it is not in the local Hugging Face cache: set reranker.model to a local model folder"
    )


# ---------------------------------------------------------------------------- no partial output (RunDir + run_main)


def _failing_main(out: Path, resume: bool = False, write: str = "candidates_val.jsonl"):
    def main(argv):
        run = RunDir(out).start(load_config(None), argv=[], resume=resume)
        (run / write).write_text("half\n")
        raise PipelineError("bad input: fix it")

    return main


def _run_main(main, capfd) -> str:
    with pytest.raises(SystemExit) as code:
        run_main(main, [])
    assert code.value.code == 2
    return capfd.readouterr().err


def test_a_failed_fresh_run_removes_the_directory_it_created(tmp_path, capfd):
    out = tmp_path / "runs" / "new" / "run"
    assert _run_main(_failing_main(out), capfd) == "error: bad input: fix it\n"
    assert not (tmp_path / "runs").exists()  # --out and the parents it created


def test_a_failed_fresh_run_in_an_existing_empty_directory_leaves_it_empty(tmp_path, capfd):
    out = tmp_path / "run"
    out.mkdir()  # a folder that holds anything else is refused before the run starts (tests/pipeline/test_one_dataset.py)
    _run_main(_failing_main(out), capfd)
    assert out.is_dir() and not list(out.iterdir())


def test_a_failed_resumed_run_keeps_its_directory_and_records_the_error(tmp_path, capfd):
    out = tmp_path / "run"
    RunDir(out).start(load_config(None), argv=[]).finish()
    (out / "checkpoints").mkdir()
    _run_main(_failing_main(out, resume=True, write="rankings_val.jsonl.partial"), capfd)
    assert {"config.yaml", "run.json", "checkpoints", "rankings_val.jsonl.partial"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "run.json").read_text())["error"] == "bad input: fix it"


# ---------------------------------------------------------------------------- the scripts
#
# A tiny generic dataset: 8 users x 6 interactions over 30 items, each item titled. 3-core users and
# 1-core items keep all of it; the pop retriever fits at once. One case per script runs in a
# subprocess (the interpreter's exit code and stderr); the others call the script's own main through
# run_main in this process (the same code path, without paying the imports again), with stderr
# captured at the file-descriptor level so library output (progress bars, warnings) counts too.


def _retriever_run(tmp_path: Path, k: int = 3) -> Path:
    """A retriever run directory written by hand: k candidates per user (target first)."""
    ds = load_dataset(load_config(_config(tmp_path)).data)
    out = tmp_path / "retriever"
    for split in ("train", *SPLITS):
        rows = []
        for u, (inp, tgt) in enumerate(zip(ds.inputs(split), ds.targets(split))):
            cands = [tgt] + [i for i in range(1, ds.n_items + 1) if i not in inp and i != tgt][: k - 1]
            rows.append({"user": ds.user_ids[u], "history": [ds.item_ids[i] for i in inp],
                         "candidates": [ds.item_ids[i] for i in cands], "scores": [-float(j) for j in range(k)],
                         "target": ds.item_ids[tgt]})
        write_rows(candidates_path(out, split), rows)
    return out


def _assert_failed(code: int, stderr: str, out: Path, *fragments: str) -> None:
    assert code == 2, stderr[-2000:]
    err = stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), stderr[-2000:]
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing left behind


def test_train_retriever_malformed_csv_subprocess(tmp_path):
    _append(tiny_data(tmp_path / "data") / "interactions.csv", b"1,2")  # a truncated last line
    proc = run_script("scripts/train_retriever.py", *script_args(tmp_path, []), timeout=120)
    _assert_failed(proc.returncode, proc.stderr, tmp_path / "out", "interactions.csv line 50 has 2 fields, expected 3")


@pytest.mark.parametrize(
    "mutate, sets, fragments",
    [
        (lambda root: _append(root / "items.csv", b"31,Caf\xe9\n"), [], ["items.csv line 32 is not valid UTF-8", "re-encode"]),
        (lambda root: (root / "items.csv").write_text("item,title\n99,Nothing\n"), [], ["none of its 30 items has a title"]),
        (None, ["data.min_user_count=2"], ["data.min_user_count must be >= 3"]),
        (None, ["rerankr.model=x"], ["unknown config key 'rerankr' in config"]),
    ],
    ids=["non-utf8", "no-titles", "min-user-count", "unknown-section"],
)
def test_train_retriever_bad_input(tmp_path, capfd, mutate, sets, fragments):
    root = tiny_data(tmp_path / "data")
    if mutate:
        mutate(root)
    _assert_failed(*run_in_process("train_retriever", script_args(tmp_path, sets), capfd), tmp_path / "out", *fragments)


def _bad_candidates(path: Path, how: str) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if how == "missing-field":
        del rows[1]["target"]
    elif how == "unknown-item":
        rows[1]["candidates"][0] = "not-an-item"
    elif how == "21-candidates":
        rows[1]["candidates"] = [str(i) for i in range(1, 22)]
        rows[1]["scores"] = [0.0] * 21
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "how, sets, fragments",
    [
        ("missing-field", [], ["candidates_test.jsonl line 2: field 'target' missing", "regenerate the file"]),
        ("unknown-item", [], ["candidates_test.jsonl line 2: unknown item id 'not-an-item'"]),
        ("21-candidates", [], ["candidates_test.jsonl: user '2' has 21 candidates but label scheme 'letters' has only 20 labels",
                               "retriever.top_k <= 20"]),
        (None, ["reranker.label_scheme=custom", "reranker.custom_labels=[A, 'B C', D]"], ["label 'B C' contains whitespace"]),
        (None, ["reranker.labels_scheme=numbers"], ["unknown config key reranker.'labels_scheme'"]),
        (None, ["reranker.train_candidates=21"], ["reranker.train_candidates 21 is more than label scheme 'letters' has labels (20)"]),
    ],
    ids=["missing-field", "unknown-item", "21-candidates", "label-with-space", "mistyped-key", "21-train-candidates"],
)
def test_train_reranker_bad_input(tmp_path, capfd, how, sets, fragments):
    tiny_data(tmp_path / "data")
    retriever = _retriever_run(tmp_path)
    if how:
        _bad_candidates(candidates_path(retriever, "test"), how)
    argv = script_args(tmp_path, [f"retriever_run={retriever}", *sets])
    _assert_failed(*run_in_process("train_reranker", argv, capfd), tmp_path / "out", *fragments)


def test_run_experiment_mistyped_value_subprocess(tmp_path):
    tiny_data(tmp_path / "data")
    proc = run_script("scripts/run_experiment.py", *script_args(tmp_path, ["retriever.max_epochs=three"]), timeout=120)
    _assert_failed(proc.returncode, proc.stderr, tmp_path / "out", "config key retriever.max_epochs must be an integer, got 'three'")


def test_unreachable_model_id_offline_fails_fast_subprocess(tmp_path):
    tiny_data(tmp_path / "data")
    retriever = _retriever_run(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty hub cache
    start = time.monotonic()
    sets = [f"retriever_run={retriever}", "reranker.model=Qwen/Qwen2.5-0.5B-Instruct"]
    proc = run_script("scripts/train_reranker.py", *script_args(tmp_path, sets), timeout=120, env=env)
    elapsed = time.monotonic() - start
    _assert_failed(proc.returncode, proc.stderr, tmp_path / "out",
                   "cannot load model 'Qwen/Qwen2.5-0.5B-Instruct': offline (HF_HUB_OFFLINE=1)",
                   "set reranker.model to a local model folder")
    assert elapsed < 45, elapsed  # start-up only; huggingface_hub's retries alone take ~50 s
