"""Stage 1 of a two-stage run: domain-adaptive pre-training on users' histories as text.

Not in LlamaRec (which fine-tunes only); an option to test whether first teaching the model the
catalogue and the order users move through it helps the reranking fine-tune. Each user's TRAIN
sequence (all but the last two items, so no validation or test item is ever seen) is cut into
consecutive windows of `max_history` items, rendered exactly as a prompt's history
(`prompts.history_text`: "User history:" + numbered titles, cut to `title_max_tokens`), followed by
the EOS token. A LoRA adapter (the same configuration as stage 2) learns the causal-LM loss on every
token for `pretrain_steps` optimizer steps with the stock Trainer; it is saved to
<run>/pretrain_adapter and stage 2 (`train_adapter`) continues training that adapter on the
reranking task instead of a fresh one. So the final <run>/adapter holds both stages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback

from pipeline.atomic import write_json
from pipeline.config import RerankerConfig
from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from rerank.prompting.labels import encode
from rerank.prompting.prompts import history_text
from rerank.prompting.style import PromptStyle
from rerank.training.collate import IGNORE_INDEX
from rerank.training.finite_loss import TRAINING_LOG_ARGS, FiniteLossCallback

PRETRAIN_ADAPTER_DIR = "pretrain_adapter"  # the stage-1 adapter (peft format), stage 2 starts from it
PRETRAIN_SUMMARY = "pretrain_summary.json"  # written last: its presence means stage 1 finished
PRETRAIN_TENSORBOARD = "tensorboard/pretrain"  # stage-1 training loss, beside stage 2's logs


def history_windows(ds: SplitDataset, window: int) -> list[tuple[int, tuple[int, ...]]]:
    """(user, dense item ids) for consecutive, non-overlapping windows of `window` items of each
    user's train sequence, oldest first; a last window shorter than 2 items is dropped (nothing to
    predict from)."""
    if window < 2:
        raise PipelineError(f"pre-training windows need at least 2 history items (max_history = {window}): raise reranker.max_history")
    out = []
    for u in range(ds.n_users):
        seq = ds.train_sequence(u)
        for start in range(0, len(seq), window):
            chunk = tuple(seq[start : start + window])
            if len(chunk) >= 2:
                out.append((u, chunk))
    return out


class HistoryTexts(torch.utils.data.Dataset):
    """Token ids of each history window's text + EOS; every token carries loss."""

    def __init__(self, windows: Sequence[tuple[int, tuple[int, ...]]], titles: Sequence[str],
                 tokenizer: PreTrainedTokenizerBase, style: PromptStyle) -> None:
        if tokenizer.eos_token_id is None:
            raise PipelineError("the tokenizer has no EOS token to end a pre-training text: use a tokenizer that has one")
        self.windows, self.titles, self.tokenizer, self.style = list(windows), titles, tokenizer, style

    def __len__(self) -> int:
        return len(self.windows)

    def text(self, index: int) -> str:
        return history_text([self.titles[i] for i in self.windows[index][1]], self.tokenizer, self.style)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = encode(self.tokenizer, self.text(index)) + [self.tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}


class RightPadCollator:
    """Causal-LM batches padded on the right (positions then start at 0 for every row, as the stock
    loss expects); padding carries no loss. The EOS ending each text keeps its loss even when the
    pad token is the EOS token (masking by id, as the stock LM collator does, would drop it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            ids[r, :n] = torch.tensor(f["input_ids"])
            labels[r, :n] = torch.tensor(f["labels"])
            mask[r, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    ds: SplitDataset,
    cfg: RerankerConfig,
    out_dir: str | Path,
    seed: int = 0,
) -> Path:
    """Run stage 1 (or find it finished) and return the stage-1 adapter folder. `model` is left
    without LoRA layers, ready for stage 2 to load the adapter for training."""
    from rerank.model.adapter import add_lora, save_adapter
    from rerank.model.sources import mixed_precision  # `rerank.training.trainer` imports this module for stage 2

    out = Path(out_dir)
    adapter_dir = out / PRETRAIN_ADAPTER_DIR
    if (out / PRETRAIN_SUMMARY).is_file() and (adapter_dir / "adapter_config.json").is_file():
        return adapter_dir  # finished before (a resumed run): stage 1 is not repeated
    if cfg.pretrain_steps < 1:
        raise PipelineError("pretrain_stage called with reranker.pretrain_steps = 0: set it to the stage-1 step count")
    texts = HistoryTexts(history_windows(ds, style.max_history), ds.titles, tokenizer, style)
    if len(texts) == 0:
        raise PipelineError("no train history has 2 or more items to pre-train on: check the dataset")
    peft_model = add_lora(model, cfg, seed)
    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(out / "pretrain_checkpoints"),  # nothing is saved there (save_strategy no)
        per_device_train_batch_size=cfg.pretrain_batch_size,
        max_steps=cfg.pretrain_steps,
        learning_rate=cfg.pretrain_learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        **mixed_precision(on_cuda),  # bf16 only where the GPU has it natively, as stage 2 (`train_adapter`)
        use_cpu=not on_cuda,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        **TRAINING_LOG_ARGS,  # a NaN loss is logged as NaN (`FiniteLossCallback`)
        report_to="none",
        save_strategy="no",  # a short stage: an interrupted stage 1 is simply run again
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
    )
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(out / PRETRAIN_TENSORBOARD)
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=texts,
        data_collator=RightPadCollator(tokenizer.pad_token_id),
        callbacks=[tensorboard, FiniteLossCallback("reranker pre-training", f"lower reranker.pretrain_learning_rate (now {cfg.pretrain_learning_rate:g})")],
    )
    result = trainer.train()
    if trainer.is_world_process_zero():
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), style, adapter_dir)
        write_json(out / PRETRAIN_SUMMARY, {
            "n_windows": len(texts),
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "losses": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
            "adapter_dir": str(adapter_dir),
        })
    trainer.accelerator.wait_for_everyone()
    peft_model.unload()  # the LoRA layers come out of `model` (not merged): stage 2 loads the saved adapter
    return adapter_dir
