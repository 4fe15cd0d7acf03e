"""Training samples -> token ids with loss labels, and left-padded batches.

`encode_example` tokenizes the training text (`prompts.build_training_text`: the inference prompt +
the target's label + the end of turn) and supervises exactly the answer: the target's label tokens,
plus the terminator (the end-of-turn / EOS token, `LabelTokens.terminator_id`) when
`supervise_end_of_turn` (the paper trains label + EOS). Positions are measured from the token length
of the inference prompt (`prompts.build_prompt`), never hard-coded, and checked: the training
tokens must start with exactly the prompt's tokens, and the supervised tokens must be the ids
`LabelTokens` derived for that label, the ids the ranker scores.

Batches are padded on the LEFT, so every answer ends at the last column, as at inference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline import rng_streams
from pipeline.errors import PipelineError
from rerank.model.readout import padded_ends
from rerank.prompting.labels import LabelTokens, encode
from rerank.prompting.prompts import build_training_text, encode_prompt, encode_prompt_ends, label_tokens
from rerank.prompting.style import PromptStyle
from rerank.training.samples import TrainSample, copy_sample

IGNORE_INDEX = -100  # label value that torch's cross_entropy and the HF losses skip


def encode_example(
    history: Sequence[str],
    candidates: Sequence[str],
    target_index: int,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    tokens: LabelTokens,
    supervise_end_of_turn: bool = True,  # paper: the label and EOS carry the loss
    readout: bool = False,  # also each candidate line's last token (the readout head's positions)
) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one training text: `labels` is IGNORE_INDEX everywhere except the
    answer's supervised tokens, which hold their own ids. `history` / `candidates` are titles."""
    if readout:
        prompt_ids, ends = encode_prompt_ends(history, candidates, tokenizer, style)
    else:
        prompt_ids, ends = encode_prompt(history, candidates, tokenizer, style), None
    input_ids = encode(tokenizer, build_training_text(history, candidates, target_index, tokenizer, style))
    n = len(prompt_ids)
    if input_ids[:n] != prompt_ids:
        raise PipelineError(
            "the training text does not start with the inference prompt's tokens (the answer merges with the prompt): "
            "fix the prompt template so the prompt ends with a newline or special token"
        )
    answer = tokens.label_ids[target_index] + ((tokens.terminator_id,) if supervise_end_of_turn else ())
    if tuple(input_ids[n : n + len(answer)]) != answer:
        raise PipelineError(
            f"the answer tokens {input_ids[n : n + len(answer)]} after the prompt differ from the label tokens "
            f"{list(answer)} the ranker scores: derive LabelTokens with the same tokenizer and prompt style"
        )
    labels = [IGNORE_INDEX] * len(input_ids)
    labels[n : n + len(answer)] = answer
    # prompt_length / target_index: what the "labels" loss reads (the prompt is input_ids[:n]).
    example = {"input_ids": input_ids, "labels": labels, "prompt_length": n, "target_index": target_index}
    return example if ends is None else {**example, "candidate_ends": ends}


class TrainingTexts(torch.utils.data.Dataset):
    """The encoded training examples of `samples`, built on access (prompt building is per item, so
    DataLoader workers share it and a capped run never builds what it does not use)."""

    def __init__(
        self,
        samples: Sequence[TrainSample],
        titles: Sequence[str],  # dense id -> title (SplitDataset.titles)
        tokenizer: PreTrainedTokenizerBase,
        style: PromptStyle,
        supervise_end_of_turn: bool = True,  # paper: label + EOS
        tokens: Optional[LabelTokens] = None,  # derived from (tokenizer, style) when None
        reshuffle_seed: Optional[int] = None,  # re-draw candidate orders every epoch from this seed; None = never
        readout: bool = False,  # examples carry candidate_ends (reranker.head readout)
        copy_mix: Optional[tuple[int, float]] = None,  # (seed, N): copy prompts at share 1 - epoch / N; None = never
    ) -> None:
        self.readout = readout
        self.copy_mix = copy_mix
        self.samples = list(samples)
        self.titles = titles
        self.tokenizer = tokenizer
        self.style = style
        self.supervise_end_of_turn = supervise_end_of_turn
        self.tokens = tokens if tokens is not None else label_tokens(tokenizer, style)
        self.reshuffle_seed = reshuffle_seed
        self.epoch = 0  # set by the trainer's EpochCallback at each epoch's start

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        s = epoch_order(self.samples[index], self.epoch, self.reshuffle_seed)
        if self.copy_mix is not None and shown_as_copy(s, self.epoch, *self.copy_mix):
            s = copy_sample(s)
        return encode_example(
            [self.titles[i] for i in s.history],
            [self.titles[i] for i in s.candidates],
            s.target_index,
            self.tokenizer,
            self.style,
            self.tokens,
            self.supervise_end_of_turn,
            self.readout,
        )


def epoch_order(sample: TrainSample, epoch: int, seed: Optional[int]) -> TrainSample:
    """`sample` with its candidates in epoch `epoch`'s order: the sampler's own order in epoch 0 (or
    when `seed` is None), else a uniform permutation seeded by (seed, user, position, epoch). So the
    target's slot is uniform over the labels in every epoch, and a prompt seen again is not seen in
    the same order (no slot can be memorised with its prompt)."""
    if seed is None or epoch == 0:
        return sample
    order = np.random.default_rng([seed, sample.user, sample.position, epoch, rng_streams.EPOCH_ORDER]).permutation(len(sample.candidates))
    cands = tuple(sample.candidates[i] for i in order)
    return dataclasses.replace(sample, candidates=cands, target_index=int(np.flatnonzero(order == sample.target_index)[0]))


def shown_as_copy(sample: TrainSample, epoch: int, seed: int, mix_epochs: float) -> bool:
    """Whether `sample` is shown as its copy prompt in `epoch` (reranker.binding_mix_epochs = `mix_epochs`):
    with probability 1 - epoch / mix_epochs, drawn from (seed, user, position, epoch); never without a history."""
    share = 1.0 - epoch / mix_epochs
    if share <= 0 or not sample.history:
        return False
    return bool(np.random.default_rng([seed, sample.user, sample.position, epoch, rng_streams.BINDING_MIX]).random() < share)


@dataclass(frozen=True)
class LeftPadCollator:
    """Examples -> {"input_ids", "attention_mask", "labels"} tensors, padded on the left."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
            return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value, padding_side="left")

        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad([[1] * len(r) for r in ids], 0),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX),
        }
        if all("prompt_length" in f for f in features):  # the "labels" loss: the prompts alone, as ranked
            prompts = [r[: f["prompt_length"]] for r, f in zip(ids, features)]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id)
            batch["prompt_attention_mask"] = pad([[1] * len(r) for r in prompts], 0)
            batch["target_index"] = torch.tensor([f["target_index"] for f in features], dtype=torch.long)
            if all("candidate_ends" in f for f in features):  # the readout head: line ends in the padded prompts
                width = batch["prompt_input_ids"].shape[1]
                batch["candidate_ends"] = padded_ends([f["candidate_ends"] for f in features], [len(r) for r in prompts], width, torch.device("cpu"))
        return batch


def collator_for(tokenizer: PreTrainedTokenizerBase) -> LeftPadCollator:
    if tokenizer.pad_token_id is None:
        raise PipelineError("the tokenizer has no pad token: load it with rerank.model.sources.load_tokenizer (which sets one)")
    return LeftPadCollator(tokenizer.pad_token_id)
