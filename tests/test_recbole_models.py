"""recbole model classes behind our retriever protocols: they learn, and their scores line up.

A tiny synthetic dataset with a learnable rule (item i is followed by i + 1, wrapping), where
any model that learns the rule ranks the target first while random scores cannot come close.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval.evaluate import evaluate, history_mask
from retrieval.recbole_models import RecboleRetriever, prefix_instances, right_pad
from retrieval.recbole_compat import Interaction

N_USERS, N_ITEMS = 40, 30
MODELS = ("sasrec", "bert4rec", "narm", "gru4rec")
REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("name", MODELS)
def test_fit_learns_successor_rule(name, tmp_path):
    ds = successor_dataset()
    cfg = tiny_cfg(name)
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
    sas = RecboleRetriever("sasrec", ds, tiny_cfg("sasrec"), "cpu")
    batch = next(iter(sas.batches([ds.train_sequence(u) for u in range(ds.n_users)], 16, rng)))
    seq, length = batch["item_id_list"], batch["item_length"]
    assert seq.shape[1] <= 8 and (length >= 1).all()
    for row, n in zip(seq.tolist(), length.tolist()):
        assert all(i > 0 for i in row[:n]) and all(i == 0 for i in row[n:])  # right padding
    # targets follow the rule: the item after each input's last item
    assert ((seq.gather(1, (length - 1)[:, None])[:, 0] % N_ITEMS) + 1 == batch["item_id"]).all()

    # instances_per_epoch: each epoch a fresh sample of that many prefix instances
    capped = RecboleRetriever("gru4rec", ds, tiny_cfg("gru4rec"), "cpu", instances_per_epoch=50)
    seqs = [ds.train_sequence(u) for u in range(ds.n_users)]
    epoch1 = [b["item_id"] for b in capped.batches(seqs, 16, rng)]
    epoch2 = [b["item_id"] for b in capped.batches(seqs, 16, rng)]
    assert [len(b) for b in epoch1] == [16, 16, 16, 2] and not torch.equal(torch.cat(epoch1), torch.cat(epoch2))

    bert = RecboleRetriever("bert4rec", ds, tiny_cfg("bert4rec"), "cpu")
    batch = next(iter(bert.batches([ds.train_sequence(u) for u in range(ds.n_users)], 64, rng)))
    mask_token = N_ITEMS + 1  # recbole: dataset.num(item_id) = n_items + 1
    assert (batch["Mask_item_id_list"] == mask_token).any()
    assert torch.isfinite(bert.loss(batch))


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
