"""recbole model classes behind our retriever protocols: they learn, and their scores line up.

A tiny synthetic dataset with a learnable rule (item i is followed by i + 1, wrapping), where
any model that learns the rule ranks the target first while random scores cannot come close.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from pipeline.errors import PipelineError
from retrieval import recbole_models, training
from retrieval.evaluate import evaluate, history_mask
from retrieval.lrurec import training_windows
from retrieval.recbole_compat import Interaction
from retrieval.recbole_models import (
    NEXT_ITEMS,
    RecboleRetriever,
    all_position_loss,
    item_windows,
    length_bucketed,
    next_item_windows,
    per_position_forward,
    per_position_output,
    prefix_instances,
    right_pad,
)
from tests.helpers.scripts import REPO

N_USERS, N_ITEMS = 40, 30
MODELS = ("sasrec", "bert4rec", "narm", "gru4rec")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread competing with another process made these tests ~20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def successor_dataset(n_users: int = N_USERS, n_items: int = N_ITEMS, seed: int = 0) -> SplitDataset:
    """User u: a random start s, then s, s+1, s+2, ... (wrapping n_items -> 1), 10-16 items."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(1, n_items + 1)), int(rng.integers(10, 17))
        seqs.append([(start - 1 + k) % n_items + 1 for k in range(length)])
    return SplitDataset(
        name="successor",
        item_ids=[""] + [f"i{i}" for i in range(1, n_items + 1)],
        titles=[""] + [f"Item {i}" for i in range(1, n_items + 1)],
        user_ids=[f"u{u}" for u in range(n_users)],
        sequences=seqs,
    )


def tiny_cfg(model: str, **kw) -> RetrieverConfig:
    # Small and fast; lr 5e-3 so a few epochs learn the rule; no dropout on 40 users;
    # patience = max_epochs because BERT4Rec's validation NDCG dips for epochs 2-4 before rising.
    base = dict(model=model, max_len=8, hidden=16, n_blocks=1, dropout=0.0, attn_dropout=0.0, lr=5e-3,
                batch_size=32, max_epochs=15, patience=15, device="cpu")
    base.update(kw)
    return RetrieverConfig(**base)


# Random scores on this dataset (history masked, 15-21 candidates left): validation NDCG@10
# mean 0.24, max 0.40 over 300 draws. Every model here reaches >= 0.83 in 15 epochs.
RANDOM_CEILING = 0.6


# Each model with its default training rows, and BERT4Rec also on windows.
TRAIN_ON = [(name, None) for name in MODELS] + [("bert4rec", "windows")]


@pytest.mark.parametrize("name, train_on", TRAIN_ON)
def test_fit_learns_successor_rule(name, train_on, tmp_path):
    ds = successor_dataset()
    # BERT4Rec's cloze loss on ~2 windows per user (20% of the items masked, ~100 targets an
    # epoch) learns far less per epoch than on prefixes: measured val NDCG@10 0.27 after 15
    # epochs of batch 8, 0.93 after 60.
    cfg = tiny_cfg(name, train_on="windows", batch_size=8, max_epochs=60, patience=60) if train_on else tiny_cfg(name)
    retriever = RecboleRetriever(name, ds, cfg, "cpu")
    summary = retriever.fit(ds, cfg, seed=0, out_dir=tmp_path)
    assert summary["model"] == name and summary["best_epoch"] >= 1
    assert (tmp_path / "retriever.pt").is_file()
    val = evaluate(retriever.score, ds, "val", ks=(10,))
    assert val["NDCG@10"] > RANDOM_CEILING, val
    assert summary["best_val_NDCG@10"] == pytest.approx(val["NDCG@10"])  # best weights kept

    scores = retriever.score(ds.inputs("test"))
    assert scores.shape == (N_USERS, N_ITEMS + 1)
    # The learned rule, read off by dense id: most users' top new item is last + 1.
    top = scores.masked_fill(history_mask(ds.inputs("test"), N_ITEMS), float("-inf")).argmax(dim=1)
    expected = torch.tensor([s[-1] % N_ITEMS + 1 for s in ds.inputs("test")])
    assert (top == expected).float().mean() > 0.5

    # The checkpoint fit wrote holds the best weights: a fresh retriever scores the same.
    fresh = RecboleRetriever(name, ds, cfg, "cpu")
    assert summary["objective"] == fresh.objective == {"sasrec": "all_positions", "gru4rec": "all_positions",
                                                       "bert4rec": "cloze" if train_on else "prefixes", "narm": "all_positions"}[name]
    fresh.load_checkpoint(tmp_path / "retriever.pt")
    torch.testing.assert_close(fresh.score(ds.inputs("test")), scores)


@pytest.mark.parametrize("name", MODELS)
def test_score_columns_are_item_logits(name):
    """Column i of score() is recbole's own `predict` for item i (untrained model, eval mode)."""
    ds = successor_dataset()
    cfg = tiny_cfg(name)
    retriever = RecboleRetriever(name, ds, cfg, "cpu")
    inputs = [s[:-1] for s in ds.sequences[:5]] + [[3], list(range(1, 21))]  # 20 > max_len: truncated
    scores = retriever.score(inputs)
    assert scores.shape == (len(inputs), N_ITEMS + 1)
    items, lengths = right_pad(inputs, cfg.max_len)
    retriever.module.eval()
    for item in (1, 7, N_ITEMS):
        batch = Interaction({
            "item_id_list": torch.from_numpy(items),
            "item_length": torch.from_numpy(lengths),
            "item_id": torch.full((len(inputs),), item),
        })
        with torch.no_grad():
            expected = retriever.module.predict(batch)
        torch.testing.assert_close(scores[:, item], expected, rtol=1e-5, atol=1e-5)
    # Truncation: only the last max_len items count.
    torch.testing.assert_close(retriever.score([list(range(1, 21))]), retriever.score([list(range(13, 21))]))


def test_prefix_instances_are_recbole_augmentation():
    flat, starts, ends, targets = prefix_instances([[1, 2, 3, 4], [5], [6, 7, 8]], max_len=2)
    inputs = [flat[s:e].tolist() for s, e in zip(starts, ends)]
    assert inputs == [[1], [1, 2], [2, 3], [6], [6, 7]]
    assert targets.tolist() == [2, 3, 4, 7, 8]


def test_batches_right_padded_and_bert4rec_masked():
    ds = successor_dataset()
    rng = np.random.default_rng(0)
    seqs = [ds.train_sequence(u) for u in range(ds.n_users)]
    # NARM on prefixes: prefix instances, right-padded, target = the item after the prefix
    narm = RecboleRetriever("narm", ds, tiny_cfg("narm", train_on="prefixes"), "cpu")
    batch = next(iter(narm.batches(seqs, 16, rng)))
    seq, length = batch["item_id_list"], batch["item_length"]
    assert seq.shape[1] <= 8 and (length >= 1).all()
    for row, n in zip(seq.tolist(), length.tolist()):
        assert all(i > 0 for i in row[:n]) and all(i == 0 for i in row[n:])  # right padding
    # targets follow the rule: the item after each input's last item
    assert ((seq.gather(1, (length - 1)[:, None])[:, 0] % N_ITEMS) + 1 == batch["item_id"]).all()

    # instances_per_epoch (training on prefixes only): each epoch a fresh sample of that many prefix instances
    capped = RecboleRetriever("narm", ds, tiny_cfg("narm", train_on="prefixes"), "cpu", instances_per_epoch=50)
    epoch1 = [b["item_id"] for b in capped.batches(seqs, 16, rng)]
    epoch2 = [b["item_id"] for b in capped.batches(seqs, 16, rng)]
    assert sorted(len(b) for b in epoch1) == [2, 16, 16, 16] and not torch.equal(torch.cat(epoch1), torch.cat(epoch2))
    for name, train_on in [("sasrec", None), ("gru4rec", None), ("narm", None), ("bert4rec", "windows")]:  # every position: no sampling
        with pytest.raises(PipelineError, match=f"but {name} trains on windows"):
            RecboleRetriever(name, ds, tiny_cfg(name, train_on=train_on), "cpu", instances_per_epoch=50)
    prefix_sas = RecboleRetriever("sasrec", ds, tiny_cfg("sasrec", train_on="prefixes"), "cpu", instances_per_epoch=50)
    assert prefix_sas.objective == "prefixes" and sum(len(b["item_id"]) for b in prefix_sas.batches(seqs, 16, rng)) == 50

    bert = RecboleRetriever("bert4rec", ds, tiny_cfg("bert4rec"), "cpu")  # default: prefixes
    batch = next(iter(bert.batches(seqs, 64, rng)))
    mask_token = N_ITEMS + 1  # recbole: dataset.num(item_id) = n_items + 1
    assert (batch["Mask_item_id_list"] == mask_token).any()
    assert torch.isfinite(bert.loss(batch))


@pytest.mark.parametrize("train_on", ["windows", "prefixes"])
def test_bert4rec_batches_always_hold_a_masked_target(train_on):
    """calculate_loss divides by the number of masked targets: 1-item rows (their only mask
    would sit at position 0, which the loss ignores) and target-less batches are left out, so
    the loss is never 0/0 = NaN (NaN weights would then score every target first). Length
    bucketing puts the short rows together, where an empty batch is likely."""
    ds = successor_dataset()
    bert = RecboleRetriever("bert4rec", ds, tiny_cfg("bert4rec", train_on=train_on), "cpu")
    seqs = [list(range(1, 10)), list(range(5, 14)), [3, 4], [7, 8, 9]] * 10  # 9 items at max_len 8: 8 + 1
    n_rows, n_batches = 0, 0
    for epoch in range(20):
        for b in bert.batches(seqs, 4, np.random.default_rng(epoch)):
            assert (b["MASK_INDEX"] > 0).any() and (b["item_length"] >= 2).all()
            assert torch.isfinite(bert.loss(b))
            n_rows, n_batches = n_rows + len(b["item_length"]), n_batches + 1
    # usable rows an epoch, per 4 sequences x 10: windows 1 + 1 + 1 + 1 (the two 1-item windows
    # of the 9-item sequences dropped); prefixes 7 + 7 + 0 + 1 (every 1-item prefix dropped);
    # a few target-less batches skipped
    usable = 40 if train_on == "windows" else 150
    assert 20 * usable * 0.8 < n_rows < 20 * usable and n_batches >= 20 * usable / 4 * 0.8


def test_nan_is_refused_by_training_and_evaluation(tmp_path):
    ds = successor_dataset()
    # One-line PipelineErrors naming the fix (before: RuntimeErrors, i.e. tracebacks from the scripts).
    with pytest.raises(PipelineError, match="scores are not finite .*: lower retriever.lr"):
        evaluate(lambda inputs: torch.full((len(inputs), N_ITEMS + 1), float("nan")), ds, "val")
    with pytest.raises(PipelineError, match="scores are not finite"):  # +inf ties too: refused as well
        evaluate(lambda inputs: torch.full((len(inputs), N_ITEMS + 1), float("inf")), ds, "val")
    r = RecboleRetriever("sasrec", ds, tiny_cfg("sasrec", max_epochs=1), "cpu")
    r.loss = lambda batch: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(PipelineError, match="training loss is nan at epoch 1, step 1 .*: lower retriever.lr"):
        training.fit(r, ds, r.cfg, 0, tmp_path)


def all_prefixes(items: np.ndarray, next_items: np.ndarray, lengths: np.ndarray):
    """recbole prefix instances of windows: for each window row and position t < its length,
    input row[:t+1] (right-padded to the window width), target next_items[row, t]."""
    inputs, lens, targets = [], [], []
    for row, nxt, n in zip(items, next_items, lengths):
        for t in range(int(n)):
            inputs.append(np.concatenate([row[: t + 1], np.zeros(items.shape[1] - t - 1, dtype=row.dtype)]))
            lens.append(t + 1)
            targets.append(nxt[t])
    return np.stack(inputs), np.array(lens), np.array(targets)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "narm"])
def test_all_position_loss_is_mean_of_recbole_prefix_losses(name, monkeypatch):
    """Position t of a window gives the output of the prefix window[:t+1] (SASRec and GRU4Rec are
    causal; NARM's attention is restated with one query per position). So the all-position loss
    over windows equals recbole's own calculate_loss over every prefix instance of those windows
    (both the mean over targets), in eval mode."""
    # NARM's attention in blocks of 3 queries: windows of 8 span several blocks, the last one short
    monkeypatch.setattr(recbole_models, "NARM_QUERY_BLOCK", 3)
    # sequences longer than max_len give several windows; dropout on, so eval mode matters
    seqs = [list(range(1, 20)), [5, 9, 2, 7], [3, 1], list(range(30, 10, -1))]
    ds = successor_dataset()
    r = RecboleRetriever(name, ds, tiny_cfg(name, dropout=0.3, attn_dropout=0.3), "cpu")
    items, next_items, lengths = next_item_windows(seqs, 8)
    assert len(lengths) == 3 + 1 + 1 + 3 and lengths.max() == 8  # 18 pairs -> 8+8+2; 3; 1; 19 -> 8+8+3
    r.module.eval()
    with torch.no_grad():
        ours = all_position_loss(r.module, torch.from_numpy(items), torch.from_numpy(lengths), torch.from_numpy(next_items))
        p_items, p_lens, p_targets = all_prefixes(items, next_items, lengths)
        assert len(p_targets) == int(lengths.sum()) == sum(len(s) - 1 for s in seqs)
        prefix_batch = Interaction({"item_id_list": torch.from_numpy(p_items), "item_length": torch.from_numpy(p_lens),
                                    "item_id": torch.from_numpy(p_targets)})
        recbole = r.module.calculate_loss(prefix_batch)
        torch.testing.assert_close(ours, recbole, rtol=1e-5, atol=1e-6)
        # position by position: the per-position output at t is recbole's forward of the prefix
        per_pos = per_position_forward(r.module, torch.from_numpy(items), torch.from_numpy(lengths))
        keep = torch.from_numpy(next_items) > 0
        torch.testing.assert_close(per_pos[keep], r.module.forward(prefix_batch["item_id_list"], prefix_batch["item_length"]),
                                   rtol=1e-5, atol=1e-5)
        # SASRec/GRU4Rec: the read-out is restored after per_position_forward
        assert r.module.forward(torch.from_numpy(items), torch.from_numpy(lengths)).shape == (len(lengths), 16)
        # not vacuous: the last positions alone (what calculate_loss on the windows reads) differ
        last = next_items[np.arange(len(lengths)), lengths - 1]
        only_last = r.module.calculate_loss(Interaction({"item_id_list": torch.from_numpy(items),
                                                         "item_length": torch.from_numpy(lengths),
                                                         "item_id": torch.from_numpy(last)}))
        assert abs(float(only_last) - float(ours)) > 1e-4
    # in train mode dropout differs between the two computations, but the loss is still finite
    r.module.train()
    assert torch.isfinite(all_position_loss(r.module, torch.from_numpy(items), torch.from_numpy(lengths), torch.from_numpy(next_items)))


def test_only_causal_forwards_are_read_out_per_position():
    """NARM's own forward reads its LAST state as the attention query everywhere, so reading it out
    at every position would be wrong: per_position_output refuses it (per_position_forward restates
    it instead, tested above), and it trains on windows by default."""
    ds = successor_dataset()
    narm = RecboleRetriever("narm", ds, tiny_cfg("narm"), "cpu")
    assert narm.objective == "all_positions"
    with pytest.raises(ValueError, match="cannot be read out per position"):
        with per_position_output(narm.module):
            pass
    assert RecboleRetriever("narm", ds, tiny_cfg("narm", train_on="prefixes"), "cpu").objective == "prefixes"


def test_windows_are_lrurec_windows_and_cover_every_pair_once():
    seqs = [list(range(1, 20)), [5, 9, 2, 7], [3, 1]]
    items, next_items, lengths = next_item_windows(seqs, 8)
    inputs, labels, lrurec_lengths = training_windows(seqs, 8)  # LRURec's, left-padded
    assert lengths.tolist() == lrurec_lengths.tolist()
    for i, n in enumerate(lengths):
        assert items[i, :n].tolist() == inputs[i, 8 - n:].tolist() and (items[i, n:] == 0).all()
        assert next_items[i, :n].tolist() == labels[i, 8 - n:].tolist() and (next_items[i, n:] == 0).all()
    # the newest window ends at the sequence's end, with full context
    assert items[0].tolist() == list(range(11, 19)) and next_items[0].tolist() == list(range(12, 20))
    # an epoch of SASRec batches: every consecutive pair of every train sequence exactly once
    ds = successor_dataset()
    train = [ds.train_sequence(u) for u in range(ds.n_users)]
    sas = RecboleRetriever("sasrec", ds, tiny_cfg("sasrec"), "cpu")
    got = []
    for b in sas.batches(train, 7, np.random.default_rng(0)):
        x, y, n = b["item_id_list"], b[NEXT_ITEMS], b["item_length"]
        assert x.shape[1] == int(n.max())  # cut to the batch's longest window
        assert ((y > 0) == (x > 0)).all()  # a target at every item, none at padding
        got += list(zip(x[y > 0].tolist(), y[y > 0].tolist()))
    want = [(s[j], s[j + 1]) for s in train for j in range(len(s) - 1)]
    assert sorted(got) == sorted(want)
    # BERT4Rec: windows of items, the last train item included
    w, wl = item_windows(seqs, 8)
    assert wl.tolist() == [8, 8, 3, 4, 2] and w[0].tolist() == list(range(12, 20)) and w[2, :3].tolist() == [1, 2, 3]
    bert = RecboleRetriever("bert4rec", ds, tiny_cfg("bert4rec", train_on="windows"), "cpu")
    rows = sorted(tuple(r[:n]) for b in bert.batches(train, 7, np.random.default_rng(0))
                  for r, n in zip(b["item_id_list"].tolist(), b["item_length"].tolist()))
    w, wl = item_windows(train, 8)
    usable = sorted(tuple(r[:n]) for r, n in zip(w.tolist(), wl.tolist()) if n >= 2)  # 1-item windows: no target
    assert len(usable) < len(wl) and set(rows) <= set(usable) and len(rows) >= len(usable) - 7  # <= 1 batch skipped
    assert {tuple(s[-8:]) for s in train} <= set(rows)


def test_length_bucketed_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    batches = length_bucketed(lengths, 10, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))  # each row once
    assert len(batches) == 100 and all(len(b) == 10 for b in batches)
    # within a pool rows are sorted by length: a batch's spread is far below a random batch's
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 30, spread  # random batches of 10 from U(1, 200): ~160
    assert len(np.concatenate(length_bucketed(lengths, 10, rng, limit=95))) == 95
    assert not np.array_equal(np.concatenate(length_bucketed(lengths, 10, np.random.default_rng(1))),
                              np.concatenate(length_bucketed(lengths, 10, np.random.default_rng(2))))


@pytest.mark.parametrize("name, train_on", TRAIN_ON)
def test_one_training_step_changes_weights(name, train_on):
    ds = successor_dataset()
    r = RecboleRetriever(name, ds, tiny_cfg(name, dropout=0.2, attn_dropout=0.2, train_on=train_on), "cpu")
    batch = next(iter(r.batches([ds.train_sequence(u) for u in range(ds.n_users)], 32, np.random.default_rng(0))))
    before = {k: v.clone() for k, v in r.module.state_dict().items()}
    opt = torch.optim.AdamW(r.module.parameters(), lr=1e-3)
    r.module.train()
    loss = r.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = r.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "item_embedding.weight" in changed
    n_params = [k for k, _ in r.module.named_parameters()]
    assert len(changed) >= len(n_params) - 1, sorted(set(n_params) - set(changed))  # (BERT4Rec: position 0 row may idle)


def test_recbole_compat_imports_in_fresh_process():
    """numpy 2 removed aliases recbole 1.2.1 reads; the adapter must make a clean import work,
    and leave no process-wide side effects (argv parsing, CUDA_VISIBLE_DEVICES, anomaly mode)."""
    code = (
        "import numpy as np; assert int(np.__version__.split('.')[0]) >= 2, np.__version__\n"
        "from retrieval.recbole_compat import recbole_model_class, make_recbole_config, Interaction\n"
        "import os, torch; os.environ.pop('CUDA_VISIBLE_DEVICES', None)\n"
        "c = make_recbole_config(recbole_model_class('sasrec'), {'MAX_ITEM_LIST_LENGTH': 5}, torch.device('cpu'))\n"
        "assert c['MAX_ITEM_LIST_LENGTH'] == 5 and c['loss_type'] == 'CE' and c['ITEM_ID_FIELD'] == 'item_id'\n"
        "assert c['hidden_size'] == 64, c['hidden_size']  # recbole's SASRec default, not argv\n"
        "assert 'CUDA_VISIBLE_DEVICES' not in os.environ\n"
        "assert not torch.is_anomaly_enabled()  # recbole's sine.py turns it on at import\n"
        "print('ok')\n"
    )
    # --hidden_size=999 would become a recbole hyper-parameter if Config read sys.argv.
    out = subprocess.run([sys.executable, "-c", code, "--hidden_size=999"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


class Killed(Exception):
    """Stands in for a kill (session end, Ctrl-C) in the middle of an epoch's validation."""


@pytest.mark.parametrize("name", ["bert4rec", "sasrec"])
def test_killed_fit_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    """A fit killed during its last epoch (patience about to stop it) and resumed stops at the
    same epoch with the same history and weights as one never killed. BERT4Rec's masking draws
    from python's `random`, dropout from torch's RNG, batching from the numpy generator: all
    three must come back with the state, and so must the patience count."""
    ds = successor_dataset()
    cfg = tiny_cfg(name, dropout=0.1, attn_dropout=0.1, max_epochs=8, patience=2)
    straight = RecboleRetriever(name, ds, cfg, "cpu")
    expected = straight.fit(ds, cfg, seed=3, out_dir=tmp_path / "straight")
    kill_at = expected["epochs_run"]  # the resumed run must stop at once: `bad` must come back too
    assert kill_at - expected["best_epoch"] == cfg.patience and kill_at >= 2

    calls = {"n": 0}
    real_evaluate = training.evaluate

    def evaluate_then_die(*args, **kw):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(training, "evaluate", evaluate_then_die)
    with pytest.raises(Killed):
        RecboleRetriever(name, ds, cfg, "cpu").fit(ds, cfg, seed=3, out_dir=tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / training.STATE_FILE, weights_only=False)["epoch"] == kill_at - 1
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    torch.rand(5)  # the global RNG moved on in between, as in a new process
    resumed = RecboleRetriever(name, ds, cfg, "cpu")
    got = resumed.fit(ds, cfg, seed=3, out_dir=tmp_path / "killed", resume=True)

    for key in ("epochs_run", "best_epoch", "best_val_NDCG@10", "optimizer_steps", "history"):
        assert got[key] == expected[key], key
    inputs = ds.inputs("test")
    torch.testing.assert_close(resumed.score(inputs), straight.score(inputs), rtol=0, atol=0)

    # A stage killed after its fit stopped resumes without another training step.
    monkeypatch.setattr(RecboleRetriever, "loss", lambda self, batch: pytest.fail("trained again"))
    again = RecboleRetriever(name, ds, cfg, "cpu")
    assert again.fit(ds, cfg, seed=3, out_dir=tmp_path / "killed", resume=True)["history"] == expected["history"]
    torch.testing.assert_close(again.score(inputs), straight.score(inputs), rtol=0, atol=0)
    # Without resume the state is ignored: a fresh fit, the same result from the same seed.
    monkeypatch.undo()
    fresh = RecboleRetriever(name, ds, cfg, "cpu").fit(ds, cfg, seed=3, out_dir=tmp_path / "killed")
    assert fresh["history"] == expected["history"]
