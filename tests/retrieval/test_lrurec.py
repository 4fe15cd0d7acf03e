"""LRURec: the parallel scan, causality, padding/packing invariance, the loss, and training."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval.evaluate import evaluate
from retrieval.lrurec import LRURec, LRURecRetriever, left_pad, lru_scan, pack, packed, training_windows

N_ITEMS = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds wake-up stalls (10x slower steps when
    other processes keep both cores busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sequential_scan(u: torch.Tensor, lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The recurrence step by step, in complex: h_t = lambda * mask_{t-1} * h_{t-1} + u_t."""
    h = torch.zeros(u.shape[0], u.shape[2], dtype=u.dtype)
    out = []
    for t in range(u.shape[1]):
        carry = mask[:, t - 1, None] if t > 0 else torch.zeros(u.shape[0], 1, dtype=torch.bool)
        h = lamb * h * carry + u[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def eval_model(seed: int = 0, n_items: int = N_ITEMS) -> LRURec:
    torch.manual_seed(seed)
    return LRURec(n_items, d=16, n_blocks=2, dropout=0.1, lru_dropout=0.1).eval()


def pattern_dataset(n_users: int = 30, seed: int = 0) -> SplitDataset:
    """Item i is always followed by i + 1: each user walks 8-15 steps from a random start."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n_users):
        start, length = int(rng.integers(1, N_ITEMS - 15)), int(rng.integers(8, 16))
        sequences.append(list(range(start, start + length)))
    return SplitDataset(
        name="pattern",
        item_ids=[""] + [f"i{i}" for i in range(1, N_ITEMS + 1)],
        titles=[""] + [f"Item {i}" for i in range(1, N_ITEMS + 1)],
        user_ids=[f"u{u}" for u in range(n_users)],
        sequences=sequences,
    )


def small_cfg(**kw) -> RetrieverConfig:
    base = dict(hidden=32, max_len=8, batch_size=8, lr=5e-3, max_epochs=40, patience=3, dropout=0.1, attn_dropout=0.1)
    return RetrieverConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------
# The scan


@pytest.mark.parametrize("length", [1, 2, 7, 8, 13, 16, 33])
def test_parallel_scan_equals_sequential_recurrence(length):
    g = torch.Generator().manual_seed(length)
    B, H = 4, 6
    re, im = torch.randn(B, length, H, generator=g, dtype=torch.float64), torch.randn(B, length, H, generator=g, dtype=torch.float64)
    nu = torch.rand(H, generator=g, dtype=torch.float64) * 0.3  # |lambda| in (0.74, 1]
    theta = torch.rand(H, generator=g, dtype=torch.float64) * 2 * math.pi
    pad = torch.tensor([0, length // 2, length - 1, 0])  # left padding per row
    mask = torch.arange(length)[None, :] >= pad[:, None]
    mask[3] = torch.rand(length, generator=g) > 0.3  # row 3: padding anywhere (packed rows)
    h_re, h_im = lru_scan(re, im, nu, theta, mask)
    expected = sequential_scan(torch.complex(re, im), torch.exp(torch.complex(-nu, theta)), mask)
    torch.testing.assert_close(torch.complex(h_re, h_im), expected, rtol=1e-10, atol=1e-10)


def test_scan_gradients_match_finite_differences():
    # the hand-written backward (a reverse-time scan), padding at the left and in the middle
    g = torch.Generator().manual_seed(0)
    B, L, H = 3, 11, 4
    re, im = (torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    nu = (torch.rand(H, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    theta = (torch.rand(H, generator=g, dtype=torch.float64) * 2 * math.pi).requires_grad_()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, [2, 3, 7]] = False
    assert torch.autograd.gradcheck(lambda *a: lru_scan(*a, mask), (re, im, nu, theta))


def test_lambda_init_follows_the_lru_ring():
    layer = eval_model().blocks[0].lru
    nu, theta, gamma = torch.exp(layer.params_log.detach())
    modulus = torch.exp(-nu)
    assert layer.params_log.shape == (3, 32)  # hidden = 2 * d
    assert modulus.min() >= 0.8 - 1e-6 and modulus.max() <= 0.99 + 1e-6
    assert theta.min() >= 0 and theta.max() < 2 * math.pi
    torch.testing.assert_close(gamma, torch.sqrt(1 - modulus**2))


# ----------------------------------------------------------------------------------------
# Causality, padding, packing


@torch.no_grad()
def test_changing_a_future_item_leaves_earlier_outputs_alone():
    model = eval_model()
    x = torch.randint(1, N_ITEMS + 1, (2, 20), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 12] = y[:, 12] % N_ITEMS + 1
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().amax(dim=-1).min() > 1e-3  # the change does propagate


@torch.no_grad()
def test_left_padding_does_not_change_outputs():
    model = eval_model()
    seq = torch.tensor([[5, 9, 2, 31, 7, 7, 18, 40, 1]])
    ref = model(seq)
    for extra in (1, 7, 23, 55):  # total lengths 10 (not a power of 2), 16, 32, 64
        out = model(F.pad(seq, (extra, 0)))
        torch.testing.assert_close(out[:, extra:], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.head(out[:, -1]), model.head(ref[:, -1]), rtol=0, atol=1e-5)


def test_packed_scoring_equals_one_sequence_per_row():
    torch.manual_seed(0)
    r = LRURecRetriever(N_ITEMS, small_cfg(max_len=12))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=n).tolist() for n in (0, 1, 3, 12, 30, 7, 2, 11)]
    together = r.score(seqs)  # packed several to a row
    alone = torch.cat([r.score([s]) for s in seqs])
    x, _ = left_pad(seqs, 12)
    r.module.eval()
    with torch.no_grad():
        full = r.module.head(r.module(torch.from_numpy(x))[:, -1])  # plain left-padded rows
    assert together.shape == (8, N_ITEMS + 1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, full, rtol=0, atol=1e-5)
    assert r.module.training is False  # score restores the mode it found


def test_pack_first_fit_decreasing_by_hand():
    # width 4; each sequence needs its length + 1 separator, except at a row's left edge
    row, end, width = pack(np.array([3, 1, 2, 4]))
    assert width == 4
    assert row.tolist() == [1, 2, 2, 0]  # 4 alone; 3 alone; 2 and 1 share a row
    assert end.tolist() == [4, 1, 4, 4]  # the 1 sits at column 0, separated by column 1
    (x,), _, _ = packed([np.array([[0, 7, 8, 9], [0, 0, 0, 5], [0, 0, 3, 4], [1, 2, 3, 4]])], np.array([3, 1, 2, 4]))
    assert x.tolist() == [[1, 2, 3, 4], [0, 7, 8, 9], [5, 0, 3, 4]]


def test_training_windows_end_at_the_sequence_end_and_cover_every_pair_once():
    inputs, labels, lengths = training_windows([list(range(1, 10)), [4, 6]], max_len=3)
    assert inputs.tolist() == [[6, 7, 8], [3, 4, 5], [0, 1, 2], [0, 0, 4]]
    assert labels.tolist() == [[7, 8, 9], [4, 5, 6], [0, 2, 3], [0, 0, 6]]
    assert lengths.tolist() == [3, 3, 2, 1]


# ----------------------------------------------------------------------------------------
# Loss


def test_loss_is_cross_entropy_over_real_positions_only():
    torch.manual_seed(0)
    r = LRURecRetriever(N_ITEMS, small_cfg(max_len=8))
    seqs = [[3, 4, 5, 6, 7, 8], [10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    inputs, labels, lengths = training_windows(seqs, 8)
    r.module.eval()  # no dropout: every computation below must agree exactly
    # the reference's formulation: every window left-padded to max_len, ignore_index=0
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    logits = r.module.head(r.module(x))
    expected = F.cross_entropy(logits.reshape(-1, N_ITEMS + 1), y.reshape(-1), ignore_index=0)
    assert int((y > 0).sum()) == 5 + 1 + 10  # 16 labelled positions of 4 * 8
    torch.testing.assert_close(r.loss((x, y)), expected)
    # more left padding changes nothing
    torch.testing.assert_close(r.loss((F.pad(x, (9, 0)), F.pad(y, (9, 0)))), expected)
    # the packed batches the training loop gets: the same loss
    (batch,) = list(r.batches(seqs, batch_size=10, rng=np.random.default_rng(0)))
    assert batch[0].shape[0] < len(inputs)  # packing saved rows
    torch.testing.assert_close(r.loss(batch), expected)


# ----------------------------------------------------------------------------------------
# Training with the shared loop


def test_learns_a_deterministic_pattern_and_stops_early(tmp_path):
    ds = pattern_dataset()
    cfg = small_cfg()
    r = LRURecRetriever(ds.n_items, cfg)
    summary = r.fit(ds, cfg, seed=0, out_dir=tmp_path)
    assert summary["best_val_NDCG@10"] > 0.9, summary["history"]
    assert summary["epochs_run"] < cfg.max_epochs  # early stopping ended it
    assert summary["epochs_run"] - summary["best_epoch"] == cfg.patience
    test = evaluate(r.score, ds, "test", ks=(10,))
    assert test["NDCG@10"] > 0.9
    # the best checkpoint was written and reloads to the same scores
    fresh = LRURecRetriever(ds.n_items, cfg)
    fresh.load_checkpoint(tmp_path / "retriever.pt")
    inputs = ds.inputs("test")
    torch.testing.assert_close(fresh.score(inputs), r.score(inputs), rtol=0, atol=0)


def test_same_seed_same_scores_regardless_of_prior_rng_use(tmp_path):
    ds = pattern_dataset()
    cfg = small_cfg(max_epochs=2)
    inputs = ds.inputs("val")
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        torch.rand(i + 1)  # different global RNG state at construction
        r = LRURecRetriever(ds.n_items, cfg)
        r.fit(ds, cfg, seed=seed, out_dir=tmp_path / str(i))
        runs.append(r.score(inputs))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])  # the seed matters


def test_refuses_a_dataset_with_another_catalogue(tmp_path):
    with pytest.raises(ValueError, match="39 items"):
        LRURecRetriever(39, small_cfg()).fit(pattern_dataset(), small_cfg(), 0, tmp_path)


def test_optimizer_settings_are_what_runs(tmp_path, monkeypatch):
    """retriever.optimizer / weight_decay / grad_clip: Adam with no decay and no clipping is what
    runs when asked (recbole's setting); the default is the paper's AdamW, decay 0.01, clip 5."""
    from retrieval import training

    made, clipped = [], []
    real_make, real_clip = training.make_optimizer, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(training, "make_optimizer", lambda params, cfg: made.append(real_make(params, cfg)) or made[-1])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm) or real_clip(params, norm))
    ds = pattern_dataset()
    clips, steps = [], []
    for i, kw in enumerate([{}, {"optimizer": "adam", "weight_decay": 0.0, "grad_clip": None}]):
        cfg = small_cfg(max_epochs=1, **kw)
        clipped.clear()
        steps.append(LRURecRetriever(ds.n_items, cfg).fit(ds, cfg, seed=0, out_dir=tmp_path / str(i))["optimizer_steps"])
        clips.append(list(clipped))
    adamw, adam = made
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.0
    assert steps[0] > 0 and clips[0] == [5.0] * steps[0]  # the default clips every step at 5 ...
    assert clips[1] == []  # ... grad_clip null never clips


@pytest.mark.parametrize("override, words", [
    ("retriever.optimizer=sgd", "is not one of 'adamw', 'adam'"),
    ("retriever.grad_clip=0", "retriever.grad_clip must be > 0, or null"),
    ("retriever.weight_decay=-1", "retriever.weight_decay must be >= 0"),
])
def test_optimizer_keys_are_checked_at_load(override, words):
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=words):
        load_config(None, [override])


# Scripted validation NDCG@10 per epoch: a one-epoch spike at epoch 3 amid a plateau, then a better
# region (epochs 7-9), then a fall.
SPIKY = [0.10, 0.12, 0.30, 0.10, 0.10, 0.20, 0.23, 0.24, 0.21, 0.05, 0.05, 0.05, 0.05]


@pytest.mark.parametrize("window, stopped_at, kept", [
    (1, 7, 3),  # the raw rule: the spike at 3 is best, 4 validations without beating it stop at 7
    (3, 13, 8),  # means of 3: the spike's window (0.173) is beaten by 7-9's (0.227), whose best epoch is 8
])
def test_smoothed_stopping_does_not_stop_on_a_spike(window, stopped_at, kept, tmp_path, monkeypatch):
    """retriever.smooth_window: patience counts validations without a better mean of the last
    `window`; the kept weights are the best single epoch of the best window (hand-computed above)."""
    from retrieval import training

    ds = pattern_dataset()
    cfg = small_cfg(max_epochs=len(SPIKY), patience=4, smooth_window=window)
    r = LRURecRetriever(ds.n_items, cfg)
    weights = {}

    def scripted(score_fn, ds_, split, ks):
        epoch = len(weights) + 1
        weights[epoch] = {k: v.clone() for k, v in r.module.state_dict().items()}
        return {"NDCG@10": SPIKY[epoch - 1], "Recall@20": 0.0}

    monkeypatch.setattr(training, "evaluate", scripted)
    summary = r.fit(ds, cfg, seed=0, out_dir=tmp_path)
    assert summary["epochs_run"] == stopped_at and summary["best_epoch"] == kept
    assert summary["best_val_NDCG@10"] == SPIKY[kept - 1]
    assert summary["best_smoothed_val_NDCG@10"] == pytest.approx(sum(SPIKY[kept - 2:kept + 1]) / 3 if window == 3 else SPIKY[kept - 1])
    saved = torch.load(tmp_path / "retriever.pt")
    assert all(torch.equal(saved[k], weights[kept][k]) for k in saved)  # the kept epoch's weights, not the last
    assert all(torch.equal(v, weights[kept][k]) for k, v in r.module.state_dict().items())
    # the tables replay the same rule over the recorded curve and must reach the loop's outcome
    from retrieval.stopping import replay

    again = replay([(h["epoch"], h["NDCG@10"]) for h in summary["history"]], window, 4)
    assert (again.stopped_at, again.kept_epoch) == (stopped_at, kept)
