"""LoRA fine-tuning of the reranker with the transformers Trainer (LlamaRec's recipe): one stage
(`rerank.training.stages` runs the stages before it).

`train_adapter` wraps the base model with a peft LoRA adapter and trains it on the training
samples (`build_samples`, encoded by `rerank.training.collate`) with `RerankTrainer`
(`rerank.training.rerank_trainer`). The loss is the cross-entropy of the
answer's supervised tokens only (label + end of turn), and only those positions are projected onto
the vocabulary: the model's `logits_to_keep` gets a boolean (batch, sequence) mask of the positions
that predict a supervised token, so the (sequence x vocabulary) logits are never formed (with
transformers versions that take no boolean mask, the columns holding them: `rerank.model.compat.masked_logits`).

Every `eval_steps` optimizer steps (and at the end) the adapter ranks the validation rows (covered
val users, capped by `val_max_users`) with the ranker (`rank_rows`) and logs NDCG/Recall/MRR@k
to TensorBoard (<run>/tensorboard); a checkpoint follows each validation (<run>/checkpoints,
resumable). Training stops after `patience` validations without a better NDCG@10, the best
checkpoint is loaded back and saved as <run>/adapter (peft format: adapter_config.json +
adapter_model.safetensors, with prompt_style.json beside it). `load_adapter` reads it back.

Runs under `accelerate launch` too: all training goes through the Trainer.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint

from pipeline.atomic import write_json
from pipeline.config import RerankerConfig
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.errors import PipelineError
from pipeline.run_files import CHECKPOINT_DIR, RERANKER_TENSORBOARD, TRAIN_SUMMARY
from rerank.model.adapter import ADAPTER_DIR, CHECKPOINTING_KWARGS, add_lora, restore_load_dtypes, save_adapter
from rerank.model.compat import checkpointing_args
from rerank.model.readout import AUX_MODULE, attach_readout
from rerank.model.sources import mixed_precision
from rerank.prompting.prompts import check_labels_shown, label_tokens
from rerank.prompting.style import PromptStyle
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.finite_loss import TRAINING_LOG_ARGS, FiniteLossCallback
from rerank.training.rerank_trainer import RerankTrainer
from rerank.training.samples import TrainSample
from rerank.training.validation import VAL_METRIC, ScoreRows, ranking_scorer, select_val_rows

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Training


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    ds: SplitDataset,
    train_samples: Sequence[TrainSample],
    val_rows: Sequence[Mapping[str, Any]],
    cfg: RerankerConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    score_rows: Optional[ScoreRows] = None,
    callbacks: Sequence[TrainerCallback] = (),
    init_adapter: Optional[Path] = None,
    keep_lora: bool = True,
    stages: Optional[Mapping[str, Optional[str]]] = None,
) -> dict[str, Any]:
    """One training run of a LoRA adapter; save the best one to <out_dir>/adapter and return a
    summary (also written to <out_dir>/train_summary.json). The stages before it (pre-training, the
    binding warm-up) are run by `rerank.training.stages.train_reranker`, which then calls this.

    `val_rows`: val candidates rows (original ids), reduced here to covered users (and
    `val_max_users`); with none, there is no validation and the last adapter is kept.
    `score_rows`: the validation scorer, default the ranker; `callbacks`: more Trainer callbacks
    (e.g. the learnability check's per-epoch scoring, `rerank.overfit`); `init_adapter`: an adapter
    to continue (an earlier stage's); `keep_lora=False` takes the LoRA layers out of `model` at the
    end (a stage whose adapter the next one loads); `stages`: the earlier stages' adapters, recorded
    in the summary. `model` gets the LoRA layers in place and holds the best adapter afterwards
    (call `model.eval()` before ranking with it)."""
    out = Path(out_dir)
    _check_aux_layer(cfg, model.config.num_hidden_layers)
    resume_from = check_start(out, cfg, train_samples)
    val = select_val_rows(val_rows, cfg.val_max_users, seed)
    if not val:
        log.warning("no covered validation rows: training without validation or early stopping, keeping the last adapter")
    if val and score_rows is None:
        score_rows = ranking_scorer(tokenizer, style, titles_by_item(ds), cfg.rank_batch_size)
    ckpt_dir = out / CHECKPOINT_DIR
    peft_model = add_lora(model, cfg, seed, init_adapter)
    best_metric = VAL_METRIC if cfg.best_by == "retriever_order" else f"shuffled_{VAL_METRIC}"
    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        # Warm-up, then linear decay (the paper's Trainer default). A constant rate after the warm-up
        # did not fit the learnability check better (overfit.yaml), so there is no key for it.
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        **mixed_precision(on_cuda),  # autocast in the GPU's half type; fp32 on CPU
        use_cpu=not on_cuda,
        # gradient checkpointing, under this transformers' argument names (`checkpointing_args`)
        **checkpointing_args(cfg.gradient_checkpointing, CHECKPOINTING_KWARGS),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        **TRAINING_LOG_ARGS,  # a NaN loss is logged as NaN (`FiniteLossCallback`)
        report_to="none",  # TensorBoard is added below with its folder in the run directory
        eval_strategy="steps" if val else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,  # a checkpoint after every validation, so the best one exists
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=bool(val),
        metric_for_best_model=best_metric if val else None,
        greater_is_better=True,
        restore_callback_states_from_checkpoint=True,  # resume keeps the early-stopping counter
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=cfg.dataloader_workers,
        remove_unused_columns=False,  # the collator's keys are exactly the model's inputs
        label_names=["labels"],
    )
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(out / RERANKER_TENSORBOARD)
    tokens = label_tokens(tokenizer, style)
    if cfg.head == "label_tokens":
        check_labels_shown(tokenizer, style)
    train_dataset = TrainingTexts(
        train_samples, ds.titles, tokenizer, style, cfg.supervise_end_of_turn, tokens,
        reshuffle_seed=seed if cfg.reshuffle_each_epoch else None, readout=cfg.head == "readout" or cfg.readout_aux_weight > 0 or cfg.candidate_attention == "isolated",
        copy_mix=(seed, cfg.binding_mix_epochs) if cfg.binding_mix_epochs > 0 else None,
    )
    if cfg.readout_aux_weight > 0:
        # Trained by the Trainer (a new, trainable submodule), never saved with the adapter, removed below.
        attach_readout(peft_model.get_base_model(), name=AUX_MODULE)
    diverged = FiniteLossCallback("reranker training", f"lower reranker.learning_rate (now {cfg.learning_rate:g}) or reranker.max_grad_norm")
    callbacks = [tensorboard, EpochCallback(train_dataset), diverged, *callbacks]
    callbacks += [EarlyStoppingCallback(early_stopping_patience=cfg.patience)] if val else []
    k = _train_candidate_count(train_samples)
    multi_token = any(len(seq) > 1 for seq in tokens.for_k(k).scored_ids)
    if cfg.loss == "labels" and cfg.gradient_checkpointing and multi_token:
        raise PipelineError(
            "loss 'labels' scores multi-token labels on the prompt's KV cache, which gradient checkpointing disables: "
            "set reranker.gradient_checkpointing=false, or use single-token labels (letters)"
        )
    trainer = RerankTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=val or None,  # not iterated (evaluate ranks val rows); the Trainer wants one
        data_collator=collator_for(tokenizer),
        callbacks=callbacks,
        score_rows=score_rows,
        val_rows=val,
        loss=cfg.loss,
        vocab_loss_weight=cfg.vocab_loss_weight,
        train_tokens=tokens.for_k(k),
        pad_id=tokenizer.pad_token_id,
        val_shuffled_seed=seed if cfg.val_shuffled else None,
        head=cfg.head,
        readout_aux_weight=cfg.readout_aux_weight,
        readout_aux_layer=cfg.readout_aux_layer,
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    restore_load_dtypes(model)  # a 4-bit base: ranked as --resume loads it
    if cfg.readout_aux_weight > 0:
        delattr(peft_model.get_base_model(), AUX_MODULE)  # a training aid only: the label head ranks

    adapter_dir = out / ADAPTER_DIR
    if trainer.is_world_process_zero():
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), style, adapter_dir)
    trainer.accelerator.wait_for_everyone()
    state = trainer.state
    history = [
        {"step": e["step"], **{k[len("eval_") :]: v for k, v in e.items() if k.startswith("eval_")}}
        for e in state.log_history
        if f"eval_{VAL_METRIC}" in e
    ]
    losses = [
        {"step": e["step"], "loss": e["loss"], **({"learning_rate": e["learning_rate"]} if "learning_rate" in e else {})}
        for e in state.log_history
        if "loss" in e and "step" in e
    ]
    summary = {
        "loss": cfg.loss,
        "head": cfg.head,
        "n_train_samples": len(train_samples),
        "n_val_users": len(val),
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "stopped_early": state.global_step < state.max_steps,
        "best_metric": {best_metric: state.best_metric} if val else None,
        "best_step": state.best_global_step if val else state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from": resume_from,
        "adapter_dir": str(adapter_dir),
        "validations": history,
        "train_losses": losses,
        **{"pretrain_adapter": None, "binding_warmup_adapter": None, **(stages or {})},
    }
    if trainer.is_world_process_zero():
        write_json(out / TRAIN_SUMMARY, summary)
    if not keep_lora:
        trainer.accelerator.unwrap_model(trainer.model).unload()  # the LoRA layers come out (not merged)
    return summary


class EpochCallback(TrainerCallback):
    """Tells the training prompts which epoch runs (their candidate order is re-drawn per epoch).
    state.epoch is the float progress, restored on resume, so a resumed epoch gets its own order."""

    def __init__(self, dataset: TrainingTexts) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.epoch = int(state.epoch + 1e-6) if state.epoch else 0


def _check_aux_layer(cfg: RerankerConfig, n_layers: int) -> None:
    """reranker.readout_aux_layer must be one of the model's layers, with LoRA at or below it: a unit
    reading states no adapter can change learns a probe of the frozen model, and teaches nothing."""
    layer = cfg.readout_aux_layer
    if layer is None:
        return
    if layer > n_layers:
        raise PipelineError(f"reranker.readout_aux_layer {layer} is beyond the model's {n_layers} layers: choose 1..{n_layers}")
    if cfg.lora_layers is not None and n_layers - cfg.lora_layers >= layer:
        raise PipelineError(
            f"reranker.readout_aux_layer {layer} reads states below every LoRA layer (the top {cfg.lora_layers} of {n_layers}): "
            f"set reranker.lora_layers >= {n_layers - layer + 1}, or a higher readout_aux_layer"
        )


def _train_candidate_count(samples: Sequence[TrainSample]) -> int:
    """K of the training prompts (one label set for the labels loss): every sample has the same."""
    counts = {len(s.candidates) for s in samples}
    if len(counts) != 1:
        raise PipelineError(f"training prompts have different candidate counts {sorted(counts)}: the sampler gives each the same K")
    return counts.pop()


def check_start(out: Path, cfg: RerankerConfig, train_samples: Sequence[TrainSample]) -> Optional[str]:
    """The checkpoint to resume from (None: a fresh start), after the checks that must pass before
    any training (of any stage) spends time: there are samples, and `reranker.resume` agrees with
    the checkpoints in <out>/checkpoints."""
    if not train_samples:
        raise PipelineError("no training samples: check the dataset and reranker.max_train_samples")
    # The mix's share falls per whole epoch (`shown_as_copy`): epochs 0..ceil(N)-1 hold copy prompts.
    if cfg.binding_mix_epochs > 0 and math.ceil(cfg.binding_mix_epochs) >= cfg.num_epochs:
        raise PipelineError(
            f"reranker.binding_mix_epochs {cfg.binding_mix_epochs:g} mixes copy prompts into every one of the "
            f"{cfg.num_epochs:g} epochs (the share falls per whole epoch): raise reranker.num_epochs above "
            f"{math.ceil(cfg.binding_mix_epochs)}, or lower binding_mix_epochs"
        )
    ckpt_dir = out / CHECKPOINT_DIR
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if cfg.resume and last is None:
        raise PipelineError(f"reranker.resume is set but {ckpt_dir} holds no checkpoint: unset resume to start afresh")
    if not cfg.resume and last is not None:
        raise PipelineError(
            f"{ckpt_dir} already holds checkpoints: set reranker.resume=true to continue, or use a fresh --out"
        )
    return last


