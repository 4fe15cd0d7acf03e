"""LRURec: Linear Recurrent Units for sequential recommendation (Yue et al., 2023).

Our own torch code, following LlamaRec's retriever (github.com/Yueeeeeeee/LlamaRec,
model/lru.py, dataloader/lru.py, trainer/lru.py); "Ref:" comments mark where we follow it and
"Differs:" where we deliberately do not.

    items -> Embedding -> dropout -> LayerNorm
          -> n_blocks x [LRU layer (complex diagonal recurrence, residual, LayerNorm)
                         -> feed-forward d -> 4d -> d (GELU, dropout, residual, LayerNorm)]
          -> scores = h @ item_embedding.T + bias      (tied output embedding)

Item id 0 is padding. The recurrence never carries state out of a padding position, so a
left-padded sequence's outputs do not depend on how much padding precedes it (as in the
reference), and several sequences can share one row when separated by a 0 ("packing"): each
starts from a fresh state, exactly as if it had a row of its own. Training and scoring pack
sequences into rows so that the work follows the real items, not the padding (ML-100K: ~100K
items in 1,100 windows padded to 256 would be ~280K positions; packed, ~100K).
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
from pipeline.device import resolve_device
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


def lru_scan(
    re: torch.Tensor, im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = lambda * mask_{t-1} * h_{t-1} + u_t for every t, by a parallel (doubling) scan.

    u = re + i*im: (B, L, H) inputs (B u_t); lambda = exp(-nu + i*theta), nu and theta (H,);
    mask: (B, L) bool, False at padding: no state is carried out of a padding position, so the
    state restarts at the first item after any padding. Returns h as (real, imag).
    Differentiable in re, im, nu and theta; see `_scan` for the algorithm.
    """
    return _LRUScan.apply(re, im, nu, theta, mask)


@torch.no_grad()
def _scan(re: torch.Tensor, im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor):
    """The scan itself, without autograd (it updates its own copies of re/im in place).

    Ref: LRULayer.lru_parallel: left-pad L to a power of two, then log2(L) steps; step s splits
    the sequence into blocks of 2s and adds lambda^(1..s) * (last state of the first half) to
    the second half, zeroed if that last position is padding. That is exact when padding only
    precedes the items. Differs: (1) the carry into position j is also zeroed when a padding
    position lies between the halves' boundary and j (`flow`), which makes the scan exact for
    padding anywhere (packed rows) and changes nothing for left padding; (2) real arithmetic on
    (real, imag) pairs instead of complex tensors: the same numbers, several times faster on CPU,
    where torch's complex kernels are slow.
    """
    B, L, H = re.shape
    size = 1 << max(0, (L - 1).bit_length())  # next power of two >= L
    re, im = F.pad(re, (0, 0, size - L, 0)), F.pad(im, (0, 0, size - L, 0))  # fresh copies
    mask = F.pad(mask, (size - L, 0), value=False)
    # flow[j] = 1 while a carry can still reach j from the left of j's current half-block:
    # initially whether position j-1 passes its state on (not padding).
    flow = F.pad(mask[:, :-1].to(re.dtype), (1, 0))
    k = torch.arange(1, size // 2 + 1, device=re.device, dtype=re.dtype)[:, None]  # powers 1..size/2
    s = 1
    while s < size:
        n_blocks = size // (2 * s)
        b_re, b_im = re.view(B, n_blocks, 2 * s, H), im.view(B, n_blocks, 2 * s, H)
        f = flow.view(B, n_blocks, 2 * s)
        # lambda^k = exp(-k nu) (cos k theta + i sin k theta), k = 1..s, for the second half.
        # The reference builds the same powers by repeated concatenation (lamb, lamb * lamb[-1]).
        modulus, angle = torch.exp(-k[:s] * nu), k[:s] * theta
        p_re, p_im = modulus * torch.cos(angle), modulus * torch.sin(angle)  # (s, H)
        c_re, c_im = b_re[:, :, s - 1 : s], b_im[:, :, s - 1 : s]  # first half's last state
        w = f[:, :, s:, None]  # (B, nb, s, 1): may the carry reach this position?
        add_re = (p_re * c_re - p_im * c_im).mul_(w)
        add_im = (p_re * c_im + p_im * c_re).mul_(w)
        b_re[:, :, s:] += add_re
        b_im[:, :, s:] += add_im
        # after merging, a carry from further left must pass the whole first half too
        f[:, :, s:] *= f[:, :, s - 1 : s]
        s *= 2
    return re[:, size - L :], im[:, size - L :]


class _LRUScan(torch.autograd.Function):
    """The scan with a hand-written backward: the adjoint of a linear recurrence is the same
    recurrence run backwards in time with conj(lambda), so the backward is one more parallel
    scan. Measured on CPU (64 x 256 x 128): forward + backward 2.3x faster than autograd
    through the doubling steps, which records and replays every slice and concatenation."""

    @staticmethod
    def forward(ctx, re, im, nu, theta, mask):
        h_re, h_im = _scan(re, im, nu, theta, mask)
        ctx.save_for_backward(h_re, h_im, nu, theta, mask)
        return h_re, h_im

    @staticmethod
    def backward(ctx, g_re, g_im):
        h_re, h_im, nu, theta, mask = ctx.saved_tensors
        g_re = torch.zeros_like(h_re) if g_re is None else g_re
        g_im = torch.zeros_like(h_im) if g_im is None else g_im
        # a_t = g_t + conj(lambda) * mask_t * a_{t+1}: in reversed time, the carry out of
        # position j (= t+1) into j+1 (= t) is allowed iff mask_t, i.e. the reversed mask at j+1.
        back_mask = F.pad(mask.flip(1)[:, 1:], (0, 1), value=False)
        a_re, a_im = _scan(g_re.flip(1), g_im.flip(1), nu, -theta, back_mask)
        a_re, a_im = a_re.flip(1), a_im.flip(1)  # dL/du (real-pair gradient convention)
        # dL/dlambda = sum_t a_t * conj(mask_{t-1} h_{t-1}); then lambda = exp(-nu + i theta)
        keep = mask[:, :-1, None].to(h_re.dtype)
        p_re, p_im = h_re[:, :-1] * keep, h_im[:, :-1] * keep
        n_re, n_im = a_re[:, 1:], a_im[:, 1:]
        gl_re = (n_re * p_re + n_im * p_im).sum(dim=(0, 1))
        gl_im = (n_im * p_re - n_re * p_im).sum(dim=(0, 1))
        l_re, l_im = torch.exp(-nu) * torch.cos(theta), torch.exp(-nu) * torch.sin(theta)
        g_nu = -(gl_re * l_re + gl_im * l_im)  # dlambda/dnu = -lambda
        g_theta = gl_im * l_re - gl_re * l_im  # dlambda/dtheta = i lambda
        return a_re, a_im, g_nu, g_theta, None


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
    """Complex diagonal linear recurrence with hidden width 2*d, residual and LayerNorm.

    The projections B (d -> 2d) and C (2d -> d) are complex parameters, as in the reference
    (nn.Linear(...).to(cfloat), bias included); they are applied with real matmuls on their
    real and imaginary parts because complex kernels are slow on CPU. Same function.
    """

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.hidden = 2 * d  # Ref: hidden_size = 2 * d_model
        # Rows: log nu, log theta, log gamma (exponential parameterisation, LRU paper 3.3).
        self.params_log = nn.Parameter(torch.empty(3, self.hidden))
        self.in_weight = nn.Parameter(torch.empty(self.hidden, d, dtype=torch.cfloat))  # B
        self.in_bias = nn.Parameter(torch.empty(self.hidden, dtype=torch.cfloat))
        self.out_weight = nn.Parameter(torch.empty(d, self.hidden, dtype=torch.cfloat))  # C
        self.out_bias = nn.Parameter(torch.empty(d, dtype=torch.cfloat))  # only .real matters
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
        # u = (B x + b) * gamma with real x: real and imaginary parts in one matmul
        w = torch.cat([self.in_weight.real, self.in_weight.imag])  # (2H, d)
        b = torch.cat([self.in_bias.real, self.in_bias.imag])
        u_re, u_im = (F.linear(x, w, b) * torch.cat([gamma, gamma])).split(self.hidden, dim=-1)
        h_re, h_im = lru_scan(u_re, u_im, nu, theta, mask)
        # Re(C h + c) = C_re h_re - C_im h_im + c_re
        c = torch.cat([self.out_weight.real, -self.out_weight.imag], dim=1)  # (d, 2H)
        y = F.linear(torch.cat([h_re, h_im], dim=-1), c, self.out_bias.real)
        # Ref: dropout(out_proj(h).real) + x, then LayerNorm (no D skip term: out_vector = Identity)
        return self.layer_norm(self.dropout(y) + x)


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
        """(B, L) item ids, 0 = padding -> (B, L, d) hidden states (one per position); the state
        restarts after every padding position (left padding or packed rows)."""
        h, mask = self.embedding(x)
        for block in self.blocks:
            h = block(h, mask)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., n_items + 1) scores with the tied item embedding."""
        return h @ self.embedding.token.weight.T + self.bias


# ----------------------------------------------------------------------------------------
# Training windows and packing


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
        for end in range(len(seq) - 1, 0, -max_len):
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


def pack(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Place sequences of `lengths` into shared rows, first-fit decreasing.

    Rows are `width` wide, the power of two >= the longest sequence (the scan's own length, so
    it adds no padding). In a row, sequences sit right to left, each preceded by one padding
    slot that separates it from its left neighbour; the leftmost one may start at column 0
    (nothing to separate it from). Returns (row, end, width): sequence i fills columns
    [end[i] - lengths[i], end[i]) of row row[i].
    """
    width = 1 << max(0, (int(lengths.max(initial=1)) - 1).bit_length())
    row = np.zeros(len(lengths), dtype=np.int64)
    end = np.zeros(len(lengths), dtype=np.int64)
    free: list[int] = []  # per row: columns still free, plus the virtual separator at -1
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i]) + 1  # the sequence and its separator
        r = next((r for r, f in enumerate(free) if f >= need), len(free))
        if r == len(free):
            free.append(width + 1)
        row[i], end[i] = r, free[r] - 1
        free[r] -= need
    return row, end, width


def packed(arrays: list[np.ndarray], lengths: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Pack the right-aligned, left-padded (N, L) `arrays` (same layout) into shared rows.
    Returns the packed (rows, width) arrays and each sequence's (row, end)."""
    row, end, width = pack(lengths)
    out = [np.zeros((int(row.max(initial=-1)) + 1, width), dtype=a.dtype) for a in arrays]
    for i, n in enumerate(lengths.tolist()):
        if n:
            for a, o in zip(arrays, out):
                o[row[i], end[i] - n : end[i]] = a[i, a.shape[1] - n :]
    return out, row, end


def left_pad(seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Last max_len items of each sequence, left-padded to (N, max_len); and the lengths."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if s:
            out[r, max_len - len(s) :] = s
        lengths[r] = len(s)
    return out, lengths


# ----------------------------------------------------------------------------------------
# Retriever adapter


class LRURecRetriever:
    """LRURec behind the Retriever and TrainableRetriever protocols."""

    def __init__(self, n_items: int, cfg: RetrieverConfig, device: str | torch.device = "cpu"):
        self.n_items = n_items
        self.cfg = cfg
        self.device = torch.device(resolve_device(device)) if isinstance(device, str) else device
        self.module = LRURec(n_items, cfg.hidden, cfg.n_blocks, cfg.dropout, cfg.attn_dropout).to(self.device)

    # -- Retriever --------------------------------------------------------------------

    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path, resume: bool = False) -> dict:
        if ds.n_items != self.n_items:
            raise ValueError(f"retriever built for {self.n_items} items, dataset has {ds.n_items}")
        # Re-initialise from `seed`, so the weights do not depend on RNG use before fit.
        training.seed_everything(seed)
        self.module.reset_parameters()
        summary = training.fit(self, ds, cfg, seed, Path(out_dir), resume=resume)
        return {"model": "lrurec", "n_parameters": sum(p.numel() for p in self.module.parameters()), **summary}

    @torch.no_grad()
    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """Scores for the item after each input (its last max_len items): the hidden state at
        its last item. Runs in eval mode; restores the module's previous mode. An empty input
        gets the scores of the all-padding state."""
        was_training = self.module.training
        self.module.eval()
        x, lengths = left_pad(inputs, self.cfg.max_len)
        (rows,), row, end = packed([x], np.maximum(lengths, 1))  # empty: one padding slot
        h = self.module(torch.from_numpy(rows).to(self.device))
        last = h[torch.from_numpy(row).to(self.device), torch.from_numpy(end - 1).to(self.device)]
        self.module.train(was_training)
        return self.module.head(last)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights written by fit (`out_dir/retriever.pt`)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state)
        self.module.eval()

    # -- TrainableRetriever -----------------------------------------------------------

    def batches(self, train_seqs: list[list[int]], batch_size: int, rng: np.random.Generator):
        """Shuffled batches of `batch_size` training windows (as the reference's DataLoader),
        each packed into shared rows: (inputs, labels), both (rows, width), 0 = padding."""
        inputs, labels, lengths = training_windows(train_seqs, self.cfg.max_len)  # ms per epoch
        order = rng.permutation(len(inputs))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            (x, y), _, _ = packed([inputs[rows], labels[rows]], lengths[rows])
            yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Full-softmax cross-entropy over all items, averaged over every labelled position.
        Ref: CrossEntropyLoss(ignore_index=0) over all positions. Differs: the reference also
        supervises the first item from an all-padding input; our first label follows a real
        item. The output head runs on labelled positions only (the same loss, less work)."""
        inputs, labels = batch
        keep = labels > 0
        logits = self.module.head(self.module(inputs)[keep])
        return F.cross_entropy(logits, labels[keep])
