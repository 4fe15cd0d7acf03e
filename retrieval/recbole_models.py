"""recbole's sequential model classes (SASRec, BERT4Rec, NARM, GRU4Rec) as our retrievers.

The models are recbole 1.2.1's own classes, their layers and weights unchanged; we replace only
recbole's Trainer and dataloaders (measured ~10x slower per epoch) with our shared loop
(`retrieval.training.fit`), and feed them batches built here. What a training row is
(`retriever.train_on`; `objective` below), by default (`DEFAULT_TRAIN_ON`):

- SASRec, GRU4Rec: windows ("all_positions"): next-item full-softmax cross-entropy at every
  position of windows of each train sequence, as LRURec trains. The windows are LRURec's own
  (`retrieval.lrurec.training_windows`: pairs (s[j], s[j+1]) cut into windows of <= max_len, the
  last window ending at the sequence's end, every pair once per epoch), right-padded. The loss is
  `all_position_loss`, the one place where our code touches a model's output: the model's own
  `forward` runs with its final `gather_indexes` (the read-out at item_length - 1) made the
  identity, so it returns its per-position output (SASRec: the transformer's last layer;
  GRU4Rec: `dense(gru_output)`), and every non-padding position t is scored against the model's
  item embedding table (logits = output_t @ item_embedding.weight.T, as its CE `calculate_loss`)
  with the model's own `loss_fct` (mean over the positions), target s[t+1]. Both models are
  causal (SASRec's attention mask is lower-triangular over right-padded items, the GRU runs left
  to right), so position t's output is exactly the output of the prefix window[:t+1]: the loss is
  the mean of recbole's `calculate_loss` over those prefixes
  (`test_all_position_loss_is_mean_of_recbole_prefix_losses` checks it), in one pass instead of one per prefix. recbole's sequential augmentation gives each prefix
  its last max_len items as context; here a position sees its window's items up to it (as LRURec,
  and SASRec's paper, train).
- NARM: windows too ("all_positions"), through `narm_per_position_output`. recbole's NARM
  `forward` is not per-position: its output is an attention over ALL the input's GRU states whose
  query is the LAST state (c_local = sum_j alpha_j h_j, alpha_j = v . sigmoid(A1 h_j + A2 h_last)),
  concatenated with the last state and projected by B. Its per-position output is the same
  computation with one query per position t over the states j <= t (a lower-triangular mask in
  place of recbole's padding mask), written with the model's own modules (item_embedding,
  emb_dropout, gru, a_1, a_2, v_t, ct_dropout, b) and weights: position t's output is exactly
  recbole's `forward` of the prefix window[:t+1] (the same test checks it, and
  the loss against `calculate_loss` over every prefix). It costs sigmoid(A1 h_j + A2 h_t) for
  every pair j <= t (hidden wide), computed in blocks of queries (NARM_QUERY_BLOCK); the config
  header gives the measured epoch time. train_on=prefixes keeps recbole's prefix instances.
- BERT4Rec: prefixes by default, its own masked-item (cloze) objective either way:
  `calculate_loss` after recbole's `MaskItemSequence` transform (mask_ratio 0.2; with recbole's
  ft_ratio 0.5, half the batches mask only each row's last item). train_on=windows applies it to
  windows of max_len ITEMS of each train sequence (the same rule, the last window ending at the
  sequence's end) instead. Measured on ML-100K (max_len 200, batch 64, one nice'd thread): on
  windows the training loss falls (7.08 -> 5.07 in 30 epochs, 219 s) while validation NDCG@10
  stays at 0.022-0.039 (batch 16: 0.027-0.042 over 25 epochs); on prefixes (8,192 per epoch) it
  rises 0.028 -> 0.060 in 9 epochs (250 s) and still climbs. A likely reason: most users have one
  window (<= 200 train items), so on windows BERT4Rec sees the same rows every epoch (only the
  masks change), and the mask-last batches supervise only each window's last item (for most users
  their last train item); on prefixes every train position is, over the epochs, a mask-last target.

Prefix instances ("prefixes"): recbole's sequential augmentation, input s[max(0, t - max_len):t],
target s[t], the model's own `calculate_loss`. Each instance pays for its whole prefix (one epoch
of ML-100K at max_len 200: 96k prefixes over 8.4M positions, ~87x the positions of an epoch of
windows), so `instances_per_epoch` samples that many prefixes per epoch (validation and early
stopping every N instances, the same training distribution), and batches group prefixes of
similar length (`length_bucketed`), so a batch is cut to about its own rows' length instead of
always ~max_len (NARM, measured: 18.9 s per 8,192 prefixes with validation; the previous
config's header gave ~1 min for random batches).

Layout, as recbole's sequential dataset builds it: `item_id_list` is RIGHT-padded with 0
(items from column 0), `item_length` its length, `item_id` the target (prefix instances);
recbole's batch transform for the model runs on each batch (BERT4Rec: `MaskItemSequence`,
the cloze masking its `calculate_loss` reads; others: none); scoring is the model's
`full_sort_predict`.

Dense ids line up with recbole's: our items are 1..n_items with 0 = padding, and recbole's
models take `dataset.num("item_id")` = n_items + 1 ids with 0 = padding, so column i of the
scores is item i. BERT4Rec's extra mask token is id n_items + 1, which its
`full_sort_predict` already leaves out.

Batches are cut to their longest row instead of max_len. With right padding that changes
nothing but speed: every model masks padding keys (SASRec, BERT4Rec, NARM attention) or runs
left to right (GRU), and reads the output at position item_length - 1 (or, all-position, at
the non-padding positions). Training batches group rows of similar length (`length_bucketed`):
shuffled, then sorted by length within pools of `BUCKET_POOL` batches, the batches in random
order.

recbole quirks kept as they are (they are part of the baseline): BERT4Rec's
`full_sort_predict` always drops the oldest input item to make room for the mask token, its
training loss ignores a mask at position 0, `MaskItemSequence` keeps at most
int(mask_ratio * max_len) masked targets per row (the last ones; an extra mask stays in the
input without a loss), and on prefixes it masks only input items (the instance's target is never
masked, so each user's last train item is never a BERT4Rec target there).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from retrieval import training
from retrieval.lrurec import training_windows
from retrieval.recbole_compat import Interaction, construct_transform, make_recbole_config, recbole_model_class

# Transformer feed-forward width = FFN_MULT * hidden: recbole's default ratio (inner_size 256
# for hidden_size 64), also LRURec's (64 -> 256 -> 64).
FFN_MULT = 4
# GRU state width = GRU_MULT * hidden for NARM/GRU4Rec, where `hidden` is the item embedding
# size: recbole's default ratio (embedding_size 64, hidden_size 128).
GRU_MULT = 2
# retriever.train_on when null (module docstring).
DEFAULT_TRAIN_ON = {"sasrec": "windows", "gru4rec": "windows", "bert4rec": "prefixes", "narm": "windows"}
# Models whose own forward, read out at every position (per_position_output), gives at position t
# the output of the prefix s[:t+1].
CAUSAL = ("sasrec", "gru4rec")
# Models with a per-position output (all_position_loss): CAUSAL, and NARM's restated attention.
PER_POSITION = (*CAUSAL, "narm")
# Training batches are sorted by length within pools of this many batches (length_bucketed).
BUCKET_POOL = 32
# NARM's per-position attention is computed for this many query positions at a time
# (narm_per_position_output). Measured, one thread, 64 x 150 items, forward + backward: the full
# L x L square 4.6 s, blocks of 25 2.3 s, of 16 1.8 s, of 10 1.6 s.
NARM_QUERY_BLOCK = 10
# Interaction field of the per-position next-item targets (all-position batches; 0 = no target).
NEXT_ITEMS = "next_item_id_list"


def objective(name: str, train_on: str | None) -> str:
    """What model `name` trains on: "all_positions" (windows, next-item loss at every position),
    "cloze" (BERT4Rec on windows) or "prefixes" (one instance per prefix, its calculate_loss)."""
    recbole_model_class(name)  # unknown names fail here
    train_on = train_on or DEFAULT_TRAIN_ON[name]
    if train_on == "prefixes":
        return "prefixes"
    if train_on != "windows":
        raise PipelineError(f"retriever.train_on must be windows, prefixes or null (got {train_on!r})")
    if name in PER_POSITION:
        return "all_positions"
    if name == "bert4rec":
        return "cloze"
    raise AssertionError(name)  # every recbole model is one of the two


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
# The all-position loss (SASRec, GRU4Rec, NARM)


@contextmanager
def per_position_output(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, `module.forward(item_seq, item_seq_len)` returns its (B, L, H) output
    at every position: the model's own forward, with the `gather_indexes` it ends with (the
    read-out at item_length - 1) made the identity on this instance. SASRec and GRU4Rec call
    gather_indexes once, as their last step; a model whose forward uses it elsewhere (NARM: use
    per_position_forward) is refused."""
    if type(module).__name__.lower() not in CAUSAL:
        raise ValueError(f"{type(module).__name__}'s forward cannot be read out per position (see per_position_forward)")
    module.gather_indexes = lambda output, gather_index: output  # instance attribute shadows the method
    try:
        yield
    finally:
        del module.gather_indexes


def narm_per_position_output(module: torch.nn.Module, item_seq: torch.Tensor) -> torch.Tensor:
    """NARM's (B, L, embedding) output at every position of right-padded `item_seq`: recbole's
    `NARM.forward` with the last GRU state replaced by each position's own state as the query
    (and as c_global), the attention restricted to states j <= t. Padding positions get outputs
    too (of their window so far); callers drop them. Same modules, same order of operations."""
    emb = module.emb_dropout(module.item_embedding(item_seq))
    gru_out, _ = module.gru(emb)  # (B, L, H): states h_j, causal
    keys = module.a_1(gru_out)  # A1 h_j
    queries = module.a_2(gru_out)  # A2 h_t, one query per position t
    # alpha[b, t, j] = v . sigmoid(A1 h_j + A2 h_t) for j <= t, else 0. recbole multiplies the
    # sigmoid by its (padding) mask before v_t; v_t has no bias, so masking its output is the same.
    # Computed for blocks of NARM_QUERY_BLOCK queries against the keys up to the block's end:
    # about half the (t, j) pairs of the full square, and blocks small enough to stay in cache.
    length = item_seq.shape[1]
    blocks = []
    for first in range(0, length, NARM_QUERY_BLOCK):
        end = min(length, first + NARM_QUERY_BLOCK)
        pairs = torch.sigmoid(keys[:, None, :end] + queries[:, first:end, None])  # (B, t in block, j < end, H)
        alpha = module.v_t(pairs).squeeze(-1)
        alpha = alpha * torch.ones(end - first, end, dtype=alpha.dtype, device=alpha.device).tril(first)  # j <= t
        blocks.append(alpha @ gru_out[:, :end])  # sum_j alpha[t, j] h_j
    c_local = torch.cat(blocks, dim=1)  # (B, L, H)
    c_t = module.ct_dropout(torch.cat([c_local, gru_out], dim=-1))  # [c_local, c_global = h_t]
    return module.b(c_t)


def per_position_forward(module: torch.nn.Module, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """The model's (B, L, H) output at every position: its own forward read out everywhere
    (SASRec, GRU4Rec) or NARM's restated attention."""
    if type(module).__name__.lower() == "narm":
        return narm_per_position_output(module, item_seq)
    with per_position_output(module):
        return module.forward(item_seq, item_seq_len)


def all_position_loss(module: torch.nn.Module, item_seq: torch.Tensor, item_seq_len: torch.Tensor, next_items: torch.Tensor) -> torch.Tensor:
    """Next-item full-softmax cross-entropy at every position t with next_items[:, t] > 0, the
    mean over those positions: recbole's CE `calculate_loss` (logits = output @
    item_embedding.weight.T, the model's `loss_fct`), applied at each position of the model's
    per-position output instead of only at item_length - 1."""
    if module.loss_type != "CE":
        raise ValueError(f"all_position_loss is the CE loss; the model has loss_type {module.loss_type!r}")
    output = per_position_forward(module, item_seq, item_seq_len)  # (B, L, H)
    if output.shape[:2] != item_seq.shape:
        raise RuntimeError(f"{type(module).__name__}.forward gave {tuple(output.shape)} per-position outputs for items {tuple(item_seq.shape)}")
    keep = next_items > 0
    logits = output[keep] @ module.item_embedding.weight.T  # (positions, n_items + 1)
    return module.loss_fct(logits, next_items[keep])


# ----------------------------------------------------------------------------------------
# Training rows


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


def left_to_right_padded(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Left-padded (N, W) rows holding lengths[i] items at their right end -> the same items
    right-padded (from column 0), recbole's layout."""
    width = rows.shape[1]
    cols = np.arange(width)
    inside = cols[None, :] < lengths[:, None]
    src = np.minimum(cols[None, :] + (width - lengths)[:, None], width - 1)
    return np.where(inside, np.take_along_axis(rows, src, axis=1), 0)


def next_item_windows(train_seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRURec's training windows (`training_windows`: next-item pairs cut into windows of
    <= max_len, anchored at the sequence's end), right-padded: (items, next_items, lengths),
    next_items[i, t] the target of position t (0 at padding)."""
    inputs, labels, lengths = training_windows(train_seqs, max_len)
    return left_to_right_padded(inputs, lengths), left_to_right_padded(labels, lengths), lengths


def item_windows(train_seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence cut into windows of <= max_len ITEMS by the same rule (the last window ends
    at the sequence's end, older ones step back by max_len), right-padded: (items, lengths).
    These are the input side of `training_windows` over s + [0]: the pairs of s + [0] have
    inputs s[0], ..., s[-1] (the appended 0 only ever is a label, which is dropped)."""
    inputs, _, lengths = training_windows([list(s) + [0] for s in train_seqs], max_len)
    return left_to_right_padded(inputs, lengths), lengths


def length_bucketed(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, limit: int | None = None) -> list[np.ndarray]:
    """One epoch's batches of row indices: a random permutation (its first `limit` rows when
    given), sorted by length within pools of BUCKET_POOL batches and cut into batches, the
    batches in random order. Every row (of the sample) once; a batch cut to its longest row
    then holds little padding."""
    order = rng.permutation(len(lengths))[:limit]  # [:None] keeps all
    pool = batch_size * BUCKET_POOL
    batches = []
    for first in range(0, len(order), pool):
        part = order[first : first + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


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
        """`cfg.train_on` picks the training rows (module docstring). `instances_per_epoch`
        (training on prefixes only): None trains on every prefix instance each epoch, as recbole
        does; an int N makes each epoch a fresh uniform sample of N of them: the same training
        distribution, with validation (and early stopping) every N instances."""
        if instances_per_epoch is not None and instances_per_epoch < 1:
            raise ValueError(f"instances_per_epoch must be >= 1 or None (got {instances_per_epoch})")
        self.name = name
        self.instances_per_epoch = instances_per_epoch
        self.device = torch.device(resolve_device(device)) if isinstance(device, str) else torch.device(device)
        self._build(ds.n_items, cfg)

    def _build(self, n_items: int, cfg: RetrieverConfig) -> None:
        model_class = recbole_model_class(self.name)
        self.objective = objective(self.name, cfg.train_on)
        if self.instances_per_epoch is not None and self.objective != "prefixes":
            raise PipelineError(
                f"retriever.instances_per_epoch samples prefix instances, but {self.name} trains on windows (every train "
                "position once per epoch): set it to null, or retriever.train_on=prefixes"
            )
        self.n_items, self.cfg = n_items, cfg
        self.config = make_recbole_config(model_class, recbole_params(self.name, cfg), self.device)
        self.sizes = RecboleSizes(self.config["ITEM_ID_FIELD"], n_items)
        # The transform first: BERT4Rec's constructor reads the field names it registers.
        self.transform = construct_transform(self.config)
        self.module = model_class(self.config, self.sizes).to(self.device)
        # Field names as the model reads them (item_id_list, item_length, item_id).
        self.item_seq, self.item_seq_len, self.item_id = self.module.ITEM_SEQ, self.module.ITEM_SEQ_LEN, self.module.ITEM_ID

    # -- Retriever --------------------------------------------------------------------

    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path, resume: bool = False) -> dict:
        """Train a fresh model (weights initialised from `seed`, so they do not depend on RNG
        use before fit) with the shared loop; the best weights stay loaded."""
        training.seed_everything(seed)
        self._build(ds.n_items, cfg)
        summary = training.fit(self, ds, cfg, seed, Path(out_dir), resume=resume)
        return {
            "model": self.name,
            "objective": self.objective,
            "instances_per_epoch": self.instances_per_epoch,
            "n_parameters": sum(p.numel() for p in self.module.parameters()),
            **summary,
        }

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
        """One epoch of length-bucketed batches as recbole Interactions on the device, after the
        model's recbole batch transform (run on CPU, as recbole's dataloader does): windows
        with per-position targets (all_positions), windows of items (cloze), or prefix
        instances with their targets (prefixes); every row cut to the batch's longest."""
        max_len = self.cfg.max_len
        if self.objective == "all_positions":
            items, next_items, lengths = next_item_windows(train_seqs, max_len)
            for rows in length_bucketed(lengths, batch_size, rng):
                width = max(1, int(lengths[rows].max()))
                batch = self._interaction(items[rows, :width], lengths[rows])
                batch.update(Interaction({NEXT_ITEMS: torch.from_numpy(next_items[rows, :width])}))
                yield self.transform(self.sizes, batch).to(self.device)  # SASRec/GRU4Rec: recbole's identity
        elif self.objective == "cloze":
            items, lengths = item_windows(train_seqs, max_len)
            usable = self._usable(lengths)
            for rows in length_bucketed(lengths[usable], batch_size, rng):
                rows = usable[rows]
                width = int(lengths[rows].max())
                batch = self.transform(self.sizes, self._interaction(items[rows, :width], lengths[rows]))
                if self._has_targets(batch):
                    yield batch.to(self.device)
        else:
            flat, starts, ends, targets = prefix_instances(train_seqs, max_len)
            usable = self._usable(ends - starts)
            for rows in length_bucketed(ends[usable] - starts[usable], batch_size, rng, self.instances_per_epoch):
                rows = usable[rows]
                items, lengths = right_pad_windows(flat, starts[rows], ends[rows])
                batch = self.transform(self.sizes, self._interaction(items, lengths, targets[rows]))
                if self._has_targets(batch):
                    yield batch.to(self.device)

    def _usable(self, lengths: np.ndarray) -> np.ndarray:
        """Indices of the rows that can carry a loss: all of them, but for BERT4Rec not the 1-item
        rows (their only mask would sit at position 0, which BERT4Rec's loss ignores)."""
        return np.flatnonzero(lengths >= (2 if self.name == "bert4rec" else 1))

    def _has_targets(self, batch: Interaction) -> bool:
        """False for a BERT4Rec batch where the random masking hit no scored position: its
        calculate_loss divides by the number of masked targets (0/0 = NaN), so it is skipped.
        Likely only for batches of very short rows, which length bucketing puts together."""
        return self.name != "bert4rec" or bool((batch[self.module.MASK_INDEX] > 0).any())

    def loss(self, batch: Interaction) -> torch.Tensor:
        if self.objective == "all_positions":
            return all_position_loss(self.module, batch[self.item_seq], batch[self.item_seq_len], batch[NEXT_ITEMS])
        return self.module.calculate_loss(batch)  # cloze: masked items; prefixes: the prefix's target

    def _interaction(self, items: np.ndarray, lengths: np.ndarray, targets: np.ndarray | None = None) -> Interaction:
        fields = {self.item_seq: torch.from_numpy(np.ascontiguousarray(items)), self.item_seq_len: torch.from_numpy(lengths)}
        if targets is not None:
            fields[self.item_id] = torch.from_numpy(targets)
        return Interaction(fields)
