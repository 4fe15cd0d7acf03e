"""The state probe: do the frozen model's states say which candidate is the answer?

The readout head (`rerank.model.readout`) scores a candidate from the hidden state at the last token
of its prompt line. Before tuning anything, fit that same linear form (w . h + b, K-way softmax) on
the FROZEN model's states of some users' training prompts, and score it on
- the other users' training prompts, split by whether the retriever listed the target for that
  prefix ("covered") or not ("uncovered": the target is then the one candidate the retriever did not
  propose, a shortcut no val/test prompt offers, since those are covered users only);
- the covered validation users, their candidates in a seeded shuffled order (what the reranker's
  content signal is scored on), with a paired bootstrap interval against chance.
With the retriever's per-prefix lists it fits twice from the same states: on every training prompt
("all") and on the covered ones only ("covered", what `reranker.train_covered_only` keeps), when
they differ.
One forward pass per prompt and no fine-tuning, so it runs in minutes where a training run takes
an hour. A probe above chance on held-out uncovered prompts and at chance on covered ones means the
training prompts teach the shortcut (`reranker.train_covered_only` removes it); at chance on both
covered sets means the states hold no signal a linear head can find at this data size.
Writes probe.json and probe.md into the run directory (`scripts/probe_states.py`).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from analysis.position_bias import vs_chance
from pipeline.atomic import write_json, write_text
from pipeline.candidates import candidates_path, prefix_candidates_path, read_prefix_rows, read_rows
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.data.dataset import SplitDataset
from pipeline.markdown import markdown_table
from pipeline.metrics import candidate_rank
from rerank.inference.ranker import candidate_orders, length_ordered_batches, pad_left
from rerank.model.readout import line_end_hidden, padded_ends
from rerank.model.sources import load_from_config
from rerank.prompting.prompts import encode_prompt_ends
from rerank.prompting.style import PromptStyle, style_from_config
from rerank.run import training_samples
from rerank.training.samples import TrainSample, prefix_lists, target_listed

RESULT_FILE = "probe.json"
REPORT_FILE = "probe.md"
LEARNING_RATE = 1e-2  # full-batch Adam on standardised states: 300 steps converge on ~1k prompts


def line_end_states(
    model: Any, tokenizer: Any, style: PromptStyle, prompts: Sequence[tuple[Sequence[str], Sequence[str]]], batch_size: int = 8
) -> np.ndarray:
    """(N, K, D) float32: for each (history titles, candidate titles) prompt, the model's last hidden
    state (after its final norm) at the last token of each candidate's line: what the readout reads."""
    encoded = [encode_prompt_ends(h, c, tokenizer, style) for h, c in prompts]
    out: Optional[np.ndarray] = None
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in tqdm(length_ordered_batches([len(ids) for ids, _ in encoded], batch_size), desc="probe states", leave=False):
            ids, mask = pad_left([encoded[i][0] for i in batch], tokenizer.pad_token_id, device)
            ends = padded_ends([encoded[i][1] for i in batch], [len(encoded[i][0]) for i in batch], ids.shape[1], device)
            picked = line_end_hidden(model, ids, mask, ends).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(prompts), *picked.shape[1:]), dtype=np.float32)
            out[batch] = picked
    assert out is not None
    return out


def fit_probe(states: np.ndarray, targets: Sequence[int], weight_decay: float, steps: int) -> dict[str, torch.Tensor]:
    """A linear unit on standardised states (mean and std of the fitted states), trained with the
    K-way cross-entropy, full batch from zero (deterministic: no seed); `weight_decay`: L2 on the weights."""
    x = torch.as_tensor(states)
    flat = x.reshape(-1, x.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-4  # + eps: a constant coordinate stays finite
    x = (x - mean) / std
    y = torch.as_tensor(list(targets))
    w = torch.zeros(x.shape[-1], requires_grad=True)  # a bias is the same for every candidate: no effect on the K-way choice
    opt = torch.optim.Adam([w], lr=LEARNING_RATE)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w, y) + weight_decay * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"w": w.detach(), "mean": mean, "std": std}


def probe_scores(probe: Mapping[str, torch.Tensor], states: np.ndarray) -> np.ndarray:
    """(N, K) scores of the fitted probe."""
    x = (torch.as_tensor(states) - probe["mean"]) / probe["std"]
    return (x @ probe["w"]).numpy()


def summary(scores: np.ndarray, targets: Sequence[int]) -> dict[str, Any]:
    """n, NDCG@10 / Recall@1 against chance with paired 95% intervals (`analysis.position_bias.vs_chance`)."""
    if len(targets) == 0:
        return {"n": 0}
    k = scores.shape[1]
    slots = [str(j) for j in range(k)]
    ranks = [candidate_rank(row.tolist(), slots, str(t)) for row, t in zip(scores, targets)]
    return {"n": len(targets), **vs_chance(ranks, [k] * len(targets))}


def run_probe(cfg: Config, out: str | Path, candidates_dir: str | Path) -> dict[str, Any]:
    """Fit and score the probe for `cfg` (its reranker section gives the model, prompt and training
    samples, `cfg.probe` the sizes); `candidates_dir`: the retriever run with candidates_val.jsonl
    (and the train candidates for retriever negatives). Writes probe.json and probe.md into `out`."""
    p = cfg.probe
    ds = load_dataset(cfg.data)
    rcfg = cfg.reranker
    samples = training_samples(dataclasses.replace(cfg, reranker=dataclasses.replace(rcfg, max_train_samples=p.n_prompts)), ds, candidates_dir)
    listed = _prefix_lists(candidates_dir, ds)
    model, tokenizer = load_from_config(rcfg)
    model.eval()
    style = style_from_config(rcfg, tokenizer)
    titles = ds.titles
    train_states = line_end_states(
        model, tokenizer, style, [([titles[i] for i in s.history], [titles[i] for i in s.candidates]) for s in samples], rcfg.rank_batch_size
    )
    users = sorted({s.user for s in samples})
    random.Random(cfg.seed).shuffle(users)
    held = set(users[: round(p.held_out * len(users))])
    fit = [i for i, s in enumerate(samples) if s.user not in held]
    test = [i for i, s in enumerate(samples) if s.user in held]
    val_prompts, val_targets = _shuffled_val(candidates_dir, ds, cfg.seed, p.val_max_users)
    val_states = line_end_states(model, tokenizer, style, val_prompts, rcfg.rank_batch_size)
    covered = uncovered = None
    if listed is not None:  # the retriever wrote per-prefix lists: split the prompts by coverage
        covered, uncovered = split_by_coverage(samples, test, listed)

    def scored(probe: Mapping[str, torch.Tensor], fitted: Sequence[int]) -> dict[str, Any]:
        def part(rows: Sequence[int]) -> dict[str, Any]:
            return summary(probe_scores(probe, train_states[rows]), [samples[i].target_index for i in rows])

        parts = {"fitted": part(fitted), "held_out": part(test)}
        if covered is not None:
            parts["held_out_covered"], parts["held_out_uncovered"] = part(covered), part(uncovered)
        parts["val_shuffled"] = summary(probe_scores(probe, val_states), val_targets)
        return parts

    # "all": the training prompts as the reranker section builds them; "covered": only those whose
    # target the retriever listed (what reranker.train_covered_only keeps), from the same states.
    fits = {"all": fit}
    if listed is not None:
        covered_fit = split_by_coverage(samples, fit, listed)[0]
        if covered_fit != fit:  # with train_covered_only every prompt is covered: the same fit twice
            fits["covered"] = covered_fit
    result: dict[str, Any] = {
        "n_prompts": len(samples),
        "train_negatives": rcfg.train_negatives,
        "train_covered_only": rcfg.train_covered_only,
        "fits": {
            name: {"n_fitted": len(rows), **scored(fit_probe(train_states[rows], [samples[i].target_index for i in rows], p.weight_decay, p.steps), rows)}
            for name, rows in fits.items()
            if rows
        },
    }
    write_json(Path(out) / RESULT_FILE, result)
    write_text(Path(out) / REPORT_FILE, to_markdown(result))
    return result


def split_by_coverage(
    samples: Sequence[TrainSample], indices: Sequence[int], listed: Mapping[tuple[int, int], Sequence[int]]
) -> tuple[list[int], list[int]]:
    """`indices` split into the samples whose target the retriever listed for their prefix and the
    rest (a prefix without a list counts as uncovered)."""
    hit = {i: target_listed(listed, samples[i].user, samples[i].position, samples[i].target) for i in indices}
    return [i for i in indices if hit[i]], [i for i in indices if not hit[i]]


def _prefix_lists(candidates_dir: str | Path, ds: SplitDataset) -> Optional[dict[tuple[int, int], list[int]]]:
    """(dense user, position) -> the retriever's items for that prefix; None without a prefix file."""
    path = prefix_candidates_path(candidates_dir)
    return prefix_lists(ds, read_prefix_rows(path, set(ds.item_ids[1:]))) if path.is_file() else None


def _shuffled_val(
    candidates_dir: str | Path, ds: SplitDataset, seed: int, max_users: Optional[int]
) -> tuple[list[tuple[list[str], list[str]]], list[int]]:
    """The covered val users' prompts (history, candidate titles) with their candidates in a seeded
    shuffled order, and the target's slot in each."""
    titles = dict(zip(ds.item_ids[1:], ds.titles[1:]))
    rows = [r for r in read_rows(candidates_path(candidates_dir, "val"), set(titles)) if r["target"] in r["candidates"]]
    if max_users is not None:
        rows = rows[:max_users]
    prompts, targets = [], []
    for r in rows:
        # the ranker's first shuffled order of this user (its rank_permutations 2: original, then this)
        order = [r["candidates"][j] for j in candidate_orders(len(r["candidates"]), 2, seed, r["user"])[1]]
        prompts.append(([titles[i] for i in r["history"]], [titles[i] for i in order]))
        targets.append(order.index(r["target"]))
    return prompts, targets


def to_markdown(result: Mapping[str, Any]) -> str:
    parts = [("fitted", "fitted (in-sample)"), ("held_out", "held-out users' training prompts"),
             ("held_out_covered", "  of which covered"), ("held_out_uncovered", "  of which uncovered"),
             ("val_shuffled", "covered val users, shuffled order")]
    negatives = f"{result['train_negatives']} negatives{', covered prefixes only' if result['train_covered_only'] else ''}"
    lines = ["# State probe", "", f"A linear unit on the frozen model's candidate-line states of {result['n_prompts']} training prompts ({negatives}).", ""]
    for name, fit in result["fits"].items():
        rows = []
        for key, label in parts:
            r = fit.get(key)
            if not r or not r.get("n"):
                continue
            m = r["NDCG@10"]
            rows.append([label, str(r["n"]), f"{m['mean']:.4f}", f"{m['chance']:.4f}",
                         f"{m['mean'] - m['chance']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]", f"{r['Recall@1']['mean']:.3f}"])
        what = "every training prompt" if name == "all" else "the covered training prompts only"
        lines += [f"## Fitted on {what} ({fit['n_fitted']})", "",
                  markdown_table(["prompts", "n", "NDCG@10", "chance", "difference [95% interval]", "top-1"], rows, "lrrrrr"), ""]
    return "\n".join(lines)


def load_result(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / RESULT_FILE).read_text(encoding="utf-8"))
