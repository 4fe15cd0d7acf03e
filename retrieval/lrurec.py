"""LRURec: Linear Recurrent Units for sequential recommendation (Yue et al., 2023).

Our own torch code, following LlamaRec's retriever (github.com/Yueeeeeeee/LlamaRec,
model/lru.py, dataloader/lru.py, trainer/lru.py); "Ref:" comments mark where we follow it and
"Differs:" where we deliberately do not.

    items -> Embedding -> dropout -> LayerNorm
          -> n_blocks x [LRU layer (complex diagonal recurrence, residual, LayerNorm)
                         -> feed-forward d -> 4d -> d (GELU, dropout, residual, LayerNorm)]
          -> scores = h @ item_embedding.T + bias      (tied output embedding)

Inputs are LEFT-padded with item id 0. The recurrence never carries state out of a padding
position, so a sequence's outputs do not depend on how much padding precedes it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval import training

# Ref: LRULayer(r_min=0.8, r_max=0.99), the LRU paper's ring for |lambda| at init, and phases
# drawn uniformly in [0, 2*pi) (LRU paper, max_phase = 2*pi).
R_MIN, R_MAX, MAX_PHASE = 0.8, 0.99, 2 * math.pi
# Ref: LRURec.truncated_normal_init: N(0, 0.02) truncated to +-0.04 for every weight except
# LayerNorms and params_log (complex weights: real and imaginary parts independently).
INIT_STD, INIT_BOUND = 0.02, 0.04
FFN_MULT = 4  # Ref: PositionwiseFeedForward(d_ff = 4 * hidden)


# ----------------------------------------------------------------------------------------
# The recurrence


def lru_scan(u: torch.Tensor, log_lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_t = lambda * mask_{t-1} * h_{t-1} + u_t for every t, by a parallel (doubling) scan.

    u: (B, L, H) complex inputs (B u_t); log_lamb: (H,) complex log of the diagonal lambda;
    mask: (B, L) bool, False at padding. The carry out of a padding position is zeroed, so
    with left padding the state starts fresh at the first real item.

    Ref: LRULayer.lru_parallel: left-pad L to a power of two, then log2(L) steps; step s
    splits the sequence into blocks of 2s and adds lambda^(1..s) * (last state of the first
    half) to the second half. Exact for left padding (padding only before real items).
    """
    B, L, H = u.shape
    size = 1 << max(0, (L - 1).bit_length())  # next power of two >= L
    if size > L:
        u = torch.cat([u.new_zeros(B, size - L, H), u], dim=1)
        mask = F.pad(mask, (size - L, 0), value=False)
    carry_ok = mask.to(u.real.dtype)
    steps = torch.arange(1, size // 2 + 1, device=u.device, dtype=u.real.dtype)
    s = 1
    while s < size:
        blocks = u.reshape(B, size // (2 * s), 2 * s, H)
        first, second = blocks[:, :, :s], blocks[:, :, s:]
        # lambda^k = exp(k * log lambda): the same powers the reference builds by repeated
        # concatenation (lamb, lamb * lamb[-1]), computed directly.
        powers = torch.exp(steps[:s, None] * log_lamb)  # (s, H)
        ok = carry_ok.reshape(B, size // (2 * s), 2 * s)[:, :, s - 1 : s, None]  # (B, nb, 1, 1)
        carry = first[:, :, s - 1 : s] * ok  # (B, nb, 1, H)
        u = torch.cat([first, second + powers * carry], dim=2).reshape(B, size, H)
        s *= 2
    return u[:, size - L :]


# ----------------------------------------------------------------------------------------
# Modules


class LRUEmbedding(nn.Module):
    def __init__(self, n_items: int, d: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(n_items + 1, d)  # id 0 = padding (no padding_idx, as Ref)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Ref: LRUEmbedding: LayerNorm(dropout(embedding)); mask = x > 0
        return self.layer_norm(self.dropout(self.token(x))), x > 0


class LRULayer(nn.Module):
    """Complex diagonal linear recurrence with hidden width 2*d, residual and LayerNorm."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.hidden = 2 * d  # Ref: hidden_size = 2 * d_model
        # Rows: log nu, log theta, log gamma (exponential parameterisation, LRU paper 3.3).
        self.params_log = nn.Parameter(torch.empty(3, self.hidden))
        self.in_proj = nn.Linear(d, self.hidden).to(torch.cfloat)  # B (complex), bias as Ref
        self.out_proj = nn.Linear(self.hidden, d).to(torch.cfloat)  # C (complex); .real is used
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)
        self.reset_lambda()

    @torch.no_grad()
    def reset_lambda(self) -> None:
        """LRU paper init: |lambda| uniform on the ring [R_MIN, R_MAX], phase in [0, MAX_PHASE),
        gamma = sqrt(1 - |lambda|^2) normalises the input so the state does not blow up."""
        u1, u2 = torch.rand(self.hidden), torch.rand(self.hidden)
        nu_log = torch.log(-0.5 * torch.log(u1 * (R_MAX**2 - R_MIN**2) + R_MIN**2))
        theta_log = torch.log(u2 * MAX_PHASE)
        modulus = torch.exp(-torch.exp(nu_log))  # |lambda| = exp(-nu)
        gamma_log = torch.log(torch.sqrt(1 - modulus**2))
        self.params_log.copy_(torch.stack([nu_log, theta_log, gamma_log]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nu, theta, gamma = torch.exp(self.params_log)
        log_lamb = torch.complex(-nu, theta)  # lambda = exp(-nu + i theta)
        u = self.in_proj(x.to(torch.cfloat)) * gamma  # B u_t, normalised
        h = lru_scan(u, log_lamb, mask)
        # Ref: dropout(out_proj(h).real) + x, then LayerNorm (no D skip term: out_vector = Identity)
        return self.layer_norm(self.dropout(self.out_proj(h).real) + x)


class FeedForward(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d, FFN_MULT * d)
        self.w_2 = nn.Linear(FFN_MULT * d, d)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Ref: PositionwiseFeedForward: LayerNorm(dropout(w_2(dropout(gelu(w_1 x)))) + x)
        inner = self.dropout(F.gelu(self.w_1(x)))
        return self.layer_norm(self.dropout(self.w_2(inner)) + x)


class LRUBlock(nn.Module):
    def __init__(self, d: int, dropout: float, lru_dropout: float):
        super().__init__()
        self.lru = LRULayer(d, lru_dropout)  # Ref: dropout = bert_attn_dropout
        self.feed_forward = FeedForward(d, dropout)  # Ref: dropout = bert_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.lru(x, mask))


class LRURec(nn.Module):
    def __init__(self, n_items: int, d: int, n_blocks: int, dropout: float, lru_dropout: float):
        super().__init__()
        self.embedding = LRUEmbedding(n_items, d, dropout)
        self.blocks = nn.ModuleList([LRUBlock(d, dropout, lru_dropout) for _ in range(n_blocks)])
        self.bias = nn.Parameter(torch.zeros(n_items + 1))  # output bias per item
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Ref: truncated normal for every weight and bias (embedding and output bias included);
        LayerNorms at (1, 0); params_log from the LRU ring init."""
        for name, p in self.named_parameters():
            if "layer_norm" in name or "params_log" in name:
                continue
            for part in (p.real, p.imag) if p.is_complex() else (p,):
                nn.init.trunc_normal_(part, mean=0.0, std=INIT_STD, a=-INIT_BOUND, b=INIT_BOUND)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LRULayer):
                m.reset_lambda()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) hidden states (one per position)."""
        h, mask = self.embedding(x)
        for block in self.blocks:
            h = block(h, mask)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., n_items + 1) scores with the tied item embedding."""
        return h @ self.embedding.token.weight.T + self.bias


# ----------------------------------------------------------------------------------------
# Training data


def training_windows(train_seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item pairs (input seq[:-1], label seq[1:]) cut into windows of <= max_len pairs.

    Windows are anchored at the sequence end and step back by max_len, so the most recent
    max_len pairs always form one window with full context; the oldest window may be shorter.
    Every pair is trained exactly once. Rows are left-padded with 0.
    Ref: LRUTrainDataset (sliding_window_size 1.0) also anchors at the end and steps back by
    max_len. Differs: it drops the oldest pairs that do not fill a whole window (and keeps only
    the last max_len pairs of sequences shorter than 2 * max_len); we keep them.
    Returns (inputs, labels, lengths): (N, max_len) int64, (N, max_len) int64, (N,) int64.
    """
    rows: list[tuple[list[int], int, int]] = []  # (sequence, start, end) in pair indices
    for seq in train_seqs:
        n_pairs = len(seq) - 1
        for end in range(n_pairs, 0, -max_len):
            rows.append((seq, max(0, end - max_len), end))
    inputs = np.zeros((len(rows), max_len), dtype=np.int64)
    labels = np.zeros((len(rows), max_len), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for r, (seq, start, end) in enumerate(rows):
        n = end - start
        inputs[r, max_len - n :] = seq[start:end]
        labels[r, max_len - n :] = seq[start + 1 : end + 1]
        lengths[r] = n
    return inputs, labels, lengths


def left_pad(seqs: list[list[int]], max_len: int) -> np.ndarray:
    """Last max_len items of each sequence, left-padded with 0 to the longest (at least 1)."""
    seqs = [s[-max_len:] for s in seqs]
    width = max(1, max((len(s) for s in seqs), default=1))
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        if s:
            out[r, width - len(s) :] = s
    return out


# ----------------------------------------------------------------------------------------
# Retriever adapter


class LRURecRetriever:
    """LRURec behind the Retriever and TrainableRetriever protocols."""

    def __init__(self, n_items: int, cfg: RetrieverConfig, device: str | torch.device = "cpu"):
        self.n_items = n_items
        self.cfg = cfg
        self.device = training.resolve_device(device) if isinstance(device, str) else device
        self.module = LRURec(n_items, cfg.hidden, cfg.n_blocks, cfg.dropout, cfg.attn_dropout).to(self.device)

    # -- Retriever --------------------------------------------------------------------

    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path) -> dict:
        if ds.n_items != self.n_items:
            raise ValueError(f"retriever built for {self.n_items} items, dataset has {ds.n_items}")
        # Re-initialise from `seed`, so the weights do not depend on RNG use before fit.
        training.seed_everything(seed)
        self.module.reset_parameters()
        summary = training.fit(self, ds, cfg, seed, Path(out_dir))
        return {"model": "lrurec", "n_parameters": sum(p.numel() for p in self.module.parameters()), **summary}

    @torch.no_grad()
    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """Scores for the item after each input: the last position of the left-padded input
        (its last max_len items). Runs in eval mode; restores the module's previous mode."""
        was_training = self.module.training
        self.module.eval()
        x = torch.from_numpy(left_pad(inputs, self.cfg.max_len)).to(self.device)
        scores = self.module.head(self.module(x)[:, -1])
        self.module.train(was_training)
        return scores

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights written by fit (`out_dir/retriever.pt`)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state)
        self.module.eval()

    # -- TrainableRetriever -----------------------------------------------------------

    def batches(self, train_seqs: list[list[int]], batch_size: int, rng: np.random.Generator):
        """Shuffled (inputs, labels) batches of training windows, each cut to its longest window
        (left padding makes the extra columns pure padding, so nothing changes but speed)."""
        inputs, labels, lengths = training_windows(train_seqs, self.cfg.max_len)  # ms per epoch
        order = rng.permutation(len(inputs))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            yield (
                torch.from_numpy(inputs[rows, -width:]).to(self.device),
                torch.from_numpy(labels[rows, -width:]).to(self.device),
            )

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Full-softmax cross-entropy over all items at every non-padding position.
        Ref: CrossEntropyLoss(ignore_index=0) over all positions. Differs: the reference also
        supervises the first item from an all-padding input; our first label follows a real
        item. The output head runs on labelled positions only (the same loss, less work)."""
        inputs, labels = batch
        keep = labels > 0
        logits = self.module.head(self.module(inputs)[keep])
        return F.cross_entropy(logits, labels[keep])
