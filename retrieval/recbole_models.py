"""recbole's sequential model classes (SASRec, BERT4Rec, NARM, GRU4Rec) as our retrievers.

The models are recbole 1.2.1's own classes, unchanged; we replace only recbole's Trainer and
dataloaders (SPEC: ~10x slower) with our shared loop (`retrieval.training.fit`) and batches
built here the way recbole's sequential dataset builds them:

- training instances are recbole's sequential augmentation: for every train sequence s and
  every t >= 1, input s[:t] (its last max_len items), target s[t];
- `item_id_list` is RIGHT-padded with 0 (items from column 0), `item_length` its length,
  `item_id` the target; recbole's batch transform for the model runs on each batch
  (BERT4Rec: `MaskItemSequence`, the cloze masking its `calculate_loss` reads; others: none);
- scoring is the model's `full_sort_predict`.

Dense ids line up with recbole's: our items are 1..n_items with 0 = padding, and recbole's
models take `dataset.num("item_id")` = n_items + 1 ids with 0 = padding, so column i of the
scores is item i. BERT4Rec's extra mask token is id n_items + 1, which its
`full_sort_predict` already leaves out.

Batches are cut to their longest row instead of max_len. With right padding that changes
nothing but speed: every model masks padding keys (SASRec, BERT4Rec, NARM attention) or runs
left to right (GRU), and reads the output at position item_length - 1.

recbole quirks kept as they are (they are part of the baseline): BERT4Rec's
`full_sort_predict` always drops the oldest input item to make room for the mask token, and
its training loss ignores a mask at position 0; BERT4Rec trains on masked items of the input
only (the instance's target is never masked), so each user's last train item is never a
BERT4Rec training target.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from pipeline.device import resolve_device
from retrieval import training
from retrieval.recbole_compat import Interaction, construct_transform, make_recbole_config, recbole_model_class

# Transformer feed-forward width = FFN_MULT * hidden: recbole's default ratio (inner_size 256
# for hidden_size 64), also LRURec's (64 -> 256 -> 64).
FFN_MULT = 4
# GRU state width = GRU_MULT * hidden for NARM/GRU4Rec, where `hidden` is the item embedding
# size: recbole's default ratio (embedding_size 64, hidden_size 128).
GRU_MULT = 2


def recbole_params(name: str, cfg: RetrieverConfig) -> dict:
    """The recbole config keys we set from `cfg`. Every other hyper-parameter keeps recbole's
    default for the model (recbole/properties/model/<Model>.yaml), e.g. SASRec/BERT4Rec
    n_heads 2, gelu, layer_norm_eps 1e-12, initializer_range 0.02; BERT4Rec mask_ratio 0.2,
    ft_ratio 0.5."""
    common = {"MAX_ITEM_LIST_LENGTH": cfg.max_len, "loss_type": "CE"}  # CE: full softmax, as LRURec
    if name in ("sasrec", "bert4rec"):
        return {
            **common,
            "hidden_size": cfg.hidden,
            "inner_size": FFN_MULT * cfg.hidden,
            "n_layers": cfg.n_blocks,
            "hidden_dropout_prob": cfg.dropout,
            "attn_dropout_prob": cfg.attn_dropout,
        }
    if name == "narm":
        # dropout_probs = [on item embeddings, on the attention context c_t]
        return {
            **common,
            "embedding_size": cfg.hidden,
            "hidden_size": GRU_MULT * cfg.hidden,
            "n_layers": cfg.n_blocks,
            "dropout_probs": [cfg.dropout, cfg.attn_dropout],
        }
    if name == "gru4rec":
        return {
            **common,
            "embedding_size": cfg.hidden,
            "hidden_size": GRU_MULT * cfg.hidden,
            "num_layers": cfg.n_blocks,
            "dropout_prob": cfg.dropout,
        }
    recbole_model_class(name)  # raises the "unknown recbole model" error
    raise AssertionError(name)


class RecboleSizes:
    """The part of a recbole Dataset that the model constructors and transforms read:
    `num(field)`, the number of ids of a field including padding id 0."""

    def __init__(self, item_field: str, n_items: int):
        self.item_field = item_field
        self.n_items = n_items

    def num(self, field: str) -> int:
        if field != self.item_field:
            raise KeyError(f"recbole asked for the size of field {field!r}; only {self.item_field!r} is provided")
        return self.n_items + 1  # ids 0 (padding) .. n_items


# ----------------------------------------------------------------------------------------
# Batches


def prefix_instances(train_seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """recbole's sequential augmentation: one instance per (sequence s, t >= 1), input
    s[max(0, t - max_len):t], target s[t]. Returns (flat, starts, ends, targets): all sequences
    concatenated, and per instance its input's span flat[starts:ends] and its target."""
    lengths = np.array([len(s) for s in train_seqs], dtype=np.int64)
    flat = np.fromiter((i for s in train_seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    seq_starts = np.cumsum(lengths) - lengths
    n_inst = np.maximum(lengths - 1, 0)  # a sequence of n items gives n - 1 instances
    seq_start = np.repeat(seq_starts, n_inst)
    t = np.arange(int(n_inst.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_inst) - n_inst, n_inst) + 1
    ends = seq_start + t
    starts = np.maximum(ends - max_len, seq_start)
    return flat, starts, ends, flat[ends]


def right_pad_windows(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows flat[starts[r]:ends[r]] right-padded with 0 to the longest (at least 1 column).
    Returns (items (B, W), lengths (B,))."""
    lengths = ends - starts
    width = max(1, int(lengths.max(initial=0)))
    cols = np.arange(width)
    inside = cols[None, :] < lengths[:, None]
    idx = np.where(inside, starts[:, None] + cols[None, :], 0)
    return np.where(inside, flat[idx] if len(flat) else 0, 0), lengths


def right_pad(seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The last max_len items of each sequence, right-padded (recbole's layout)."""
    seqs = [s[-max_len:] for s in seqs]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    return right_pad_windows(flat, ends - lengths, ends)


# ----------------------------------------------------------------------------------------
# Retriever adapter


class RecboleRetriever:
    """A recbole sequential model behind the Retriever and TrainableRetriever protocols."""

    def __init__(
        self,
        name: str,
        ds: SplitDataset,
        cfg: RetrieverConfig,
        device: str | torch.device = "cpu",
        instances_per_epoch: int | None = None,
    ):
        """`instances_per_epoch`: None (default) trains on every prefix instance each epoch,
        as recbole does. An int N makes each epoch a fresh uniform sample of N of them: the
        same training distribution, with validation (and early stopping) every N instances.
        Why: these models' calculate_loss reads only the last position, so every instance pays
        for its whole prefix: one full epoch on ML-100K at max_len 200 runs 96k prefixes over
        8.4M positions, ~87x the positions of LRURec's epoch (every position once). On a
        2-core CPU that is tens of minutes per epoch; N ~ n_users gives epochs of seconds."""
        if instances_per_epoch is not None and instances_per_epoch < 1:
            raise ValueError(f"instances_per_epoch must be >= 1 or None (got {instances_per_epoch})")
        self.name = name
        self.instances_per_epoch = instances_per_epoch
        self.device = torch.device(resolve_device(device)) if isinstance(device, str) else torch.device(device)
        self._build(ds.n_items, cfg)

    def _build(self, n_items: int, cfg: RetrieverConfig) -> None:
        model_class = recbole_model_class(self.name)
        self.n_items, self.cfg = n_items, cfg
        self.config = make_recbole_config(model_class, recbole_params(self.name, cfg), self.device)
        self.sizes = RecboleSizes(self.config["ITEM_ID_FIELD"], n_items)
        # The transform first: BERT4Rec's constructor reads the field names it registers.
        self.transform = construct_transform(self.config)
        self.module = model_class(self.config, self.sizes).to(self.device)
        # Field names as the model reads them (item_id_list, item_length, item_id).
        self.item_seq, self.item_seq_len, self.item_id = self.module.ITEM_SEQ, self.module.ITEM_SEQ_LEN, self.module.ITEM_ID

    # -- Retriever --------------------------------------------------------------------

    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path) -> dict:
        """Train a fresh model (weights initialised from `seed`, so they do not depend on RNG
        use before fit) with the shared loop; the best weights stay loaded."""
        training.seed_everything(seed)
        self._build(ds.n_items, cfg)
        summary = training.fit(self, ds, cfg, seed, Path(out_dir))
        return {"model": self.name, "n_parameters": sum(p.numel() for p in self.module.parameters()), **summary}

    @torch.no_grad()
    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """(B, n_items + 1) `full_sort_predict` scores for the item after each input's last
        max_len items. Runs in eval mode; restores the module's previous mode. An empty input
        is scored as a single padding item (recbole cannot read position -1)."""
        items, lengths = right_pad(inputs, self.cfg.max_len)
        batch = self._interaction(items, np.maximum(lengths, 1)).to(self.device)
        was_training = self.module.training
        self.module.eval()
        scores = self.module.full_sort_predict(batch)
        self.module.train(was_training)
        if scores.shape[1] < self.n_items + 1:
            raise RuntimeError(f"{self.name} scored {scores.shape[1]} ids, expected {self.n_items + 1}")
        return scores[:, : self.n_items + 1]  # any extra (special-token) columns dropped

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights written by fit (`out_dir/retriever.pt`)."""
        self.module.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        self.module.eval()

    # -- TrainableRetriever -----------------------------------------------------------

    def batches(self, train_seqs: list[list[int]], batch_size: int, rng: np.random.Generator):
        """One epoch of shuffled prefix instances as recbole Interactions on the device, after
        the model's recbole batch transform (run on CPU, as recbole's dataloader does)."""
        flat, starts, ends, targets = prefix_instances(train_seqs, self.cfg.max_len)
        order = rng.permutation(len(ends))[: self.instances_per_epoch]  # [:None] keeps all
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            items, lengths = right_pad_windows(flat, starts[rows], ends[rows])
            batch = self._interaction(items, lengths, targets[rows])
            yield self.transform(self.sizes, batch).to(self.device)

    def loss(self, batch: Interaction) -> torch.Tensor:
        return self.module.calculate_loss(batch)

    def _interaction(self, items: np.ndarray, lengths: np.ndarray, targets: np.ndarray | None = None) -> Interaction:
        fields = {self.item_seq: torch.from_numpy(items), self.item_seq_len: torch.from_numpy(lengths)}
        if targets is not None:
            fields[self.item_id] = torch.from_numpy(targets)
        return Interaction(fields)

