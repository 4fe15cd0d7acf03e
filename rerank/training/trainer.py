"""LoRA fine-tuning of the reranker with the transformers Trainer (LlamaRec's recipe): one stage
(`rerank.training.stages` runs the stages before it).

`train_adapter` wraps the base model with a peft LoRA adapter and trains it on the training
samples (`build_samples`, encoded by `rerank.training.collate`). The loss is the cross-entropy of the
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

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import get_last_checkpoint

from pipeline.atomic import write_json
from pipeline.config import RerankerConfig
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.errors import PipelineError
from pipeline.run_files import CHECKPOINT_DIR, RERANKER_TENSORBOARD, TRAIN_SUMMARY
from rerank.model.adapter import ADAPTER_DIR, CHECKPOINTING_KWARGS, add_lora, restore_load_dtypes, save_adapter
from rerank.model.compat import checkpointing_args
from rerank.model.readout import AUX_MODULE, attach_readout, readout_scores
from rerank.model.sources import mixed_precision
from rerank.prompting.labels import LabelTokens
from rerank.prompting.prompts import check_labels_shown, label_tokens
from rerank.prompting.style import PromptStyle
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.finite_loss import TRAINING_LOG_ARGS, FiniteLossCallback
from rerank.training.loss import labels_loss_sum, supervised_logits
from rerank.training.samples import TrainSample
from rerank.training.validation import VAL_METRIC, ScoreRows, ranking_metrics, ranking_scorer, select_val_rows, shuffled_rows

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------
# LoRA


# ----------------------------------------------------------------------------------------
# Loss at the supervised positions only


class RerankTrainer(Trainer):
    """The Trainer with the answer-only loss and ranking validation (NDCG@k of the val rows)."""

    def __init__(
        self,
        *args: Any,
        score_rows: Optional[ScoreRows] = None,
        val_rows: Sequence[Mapping[str, Any]] = (),
        loss: str = "vocab",
        vocab_loss_weight: float = 0.0,
        train_tokens: Optional[LabelTokens] = None,
        pad_id: Optional[int] = None,
        val_shuffled_seed: Optional[int] = None,
        head: str = "label_tokens",
        readout_aux_weight: float = 0.0,
        readout_aux_layer: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head, self.readout_aux_weight, self.readout_aux_layer = head, readout_aux_weight, readout_aux_layer
        self.score_rows = score_rows
        self.val_rows = list(val_rows)
        # The same users, candidates in a seeded shuffled order: the content signal with the
        # retriever's order hidden (logged as eval_shuffled_*; early stopping reads the unshuffled).
        self.val_shuffled_rows = shuffled_rows(self.val_rows, val_shuffled_seed) if val_shuffled_seed is not None else []
        if loss not in ("vocab", "labels"):
            raise PipelineError(f"unknown reranker.loss {loss!r}: use vocab or labels")
        if loss == "labels" and (train_tokens is None or pad_id is None):
            raise PipelineError("loss 'labels' needs the training prompts' label tokens and the pad id")
        self.loss_kind = loss
        self.vocab_loss_weight = vocab_loss_weight
        self.train_tokens = train_tokens
        self.pad_id = pad_id
        # Count supervised tokens (vocab) / prompts (labels) over each accumulated batch
        # (num_items_in_batch), so the loss is the mean over the whole optimizer step, as the stock
        # causal-LM loss is.
        self.model_accepts_loss_kwargs = True
        # Each loss term's share of the steps since the last log, logged apart from their sum
        # ("loss") when there are several (labels + aux, labels + vocab): the sum hides which fits.
        self._term_totals: dict[str, torch.Tensor] = {}
        self._terms_logged_at = 0

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True) -> contextlib.AbstractContextManager:
        """The accelerator's autocast (bf16/fp16 on CUDA; none on CPU) around the whole loss. accelerate wraps
        only the model's forward, and the labels loss and the readout call the decoder directly
        (model.get_decoder()): outside autocast a kbit-prepared model runs them in fp32 activations."""
        return self.accelerator.autocast()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """vocab: the supervised-token count (the Trainer's own). labels: {"prompts", "tokens"}, the
        prompt count for the labels term (summed over processes like the token count) and the token
        count for the optional vocab term."""
        tokens = super()._get_num_items_in_batch(batch_samples, device)
        if self.loss_kind == "vocab":
            return tokens
        prompts = torch.tensor(sum(len(b["target_index"]) for b in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            prompts = self.accelerator.gather(prompts).sum()
        return {"prompts": prompts, "tokens": tokens}

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor | int | dict] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else {"tokens": num_items_in_batch}
        loss = torch.zeros((), device=inputs["input_ids"].device)
        logits = None
        if self.loss_kind == "labels":
            prompts, mask, target = inputs["prompt_input_ids"], inputs["prompt_attention_mask"], inputs["target_index"]
            if self.head == "readout":  # the readout head's K scores (`readout_scores`)
                term = F.cross_entropy(readout_scores(model, prompts, mask, inputs["candidate_ends"]), target, reduction="sum")
            else:
                term = labels_loss_sum(model, prompts, mask, target, self.train_tokens, self.pad_id)
            term = self._mean(term, counts.get("prompts"), target.numel())
            loss = loss + self._keep_term("labels", term, model)
            if self.readout_aux_weight > 0:  # the training-only unit beside a label head
                aux = readout_scores(model, prompts, mask, inputs["candidate_ends"], name=AUX_MODULE, layer=self.readout_aux_layer)
                aux_term = self._mean(F.cross_entropy(aux, target, reduction="sum"), counts.get("prompts"), target.numel())
                loss = loss + self.readout_aux_weight * self._keep_term("aux", aux_term, model)
        if self.loss_kind == "vocab" or self.vocab_loss_weight > 0:
            logits, targets = supervised_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            term = self._keep_term("vocab", self._mean(F.cross_entropy(logits.float(), targets, reduction="sum"), counts.get("tokens"), targets.numel()), model)
            loss = loss + (term if self.loss_kind == "vocab" else self.vocab_loss_weight * term)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _keep_term(self, name: str, term: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """Add `term` (this micro-batch's share of the step's mean, unweighted) to its running total."""
        if model.training:
            self._term_totals[name] = self._term_totals.get(name, 0.0) + term.detach()
        return term

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """The Trainer's log, plus loss_<term> (mean per step since the last one) when the loss has
        several terms."""
        if "loss" in logs and self._term_totals:
            steps = max(self.state.global_step - self._terms_logged_at, 1)
            if len(self._term_totals) > 1:
                for name, total in self._term_totals.items():
                    logs[f"loss_{name}"] = nested_gather(total, self.args.parallel_mode).mean().item() / steps
            self._term_totals, self._terms_logged_at = {}, self.state.global_step
        super().log(logs, start_time)

    def _mean(self, total: torch.Tensor, count: Optional[torch.Tensor | int], local: int) -> torch.Tensor:
        """`total` over the optimizer step's `count` (or this batch's `local` when none is given)."""
        if count is None:
            return total / max(local, 1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return total / count * self.args.world_size  # the count is summed over processes; DDP averages gradients
        return total / count

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Rank the validation rows with the current adapter; log and return eval_NDCG@k etc."""
        if self.score_rows is None or not self.val_rows:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        metrics = {}
        try:
            with torch.no_grad():
                for name, rows in (("", self.val_rows), ("shuffled_", self.val_shuffled_rows)):
                    if rows:
                        scores = self.score_rows(model, rows)
                        metrics.update({f"{metric_key_prefix}_{name}{k}": v for k, v in ranking_metrics(scores, rows).items()})
        finally:
            model.train(was_training)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# ----------------------------------------------------------------------------------------
# Validation


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
        lr_scheduler_type="linear",  # warm-up then linear decay (the paper's Trainer default)
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
        reshuffle_seed=seed if cfg.reshuffle_each_epoch else None, readout=cfg.head == "readout" or cfg.readout_aux_weight > 0,
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
    losses = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e and "step" in e]
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
    ckpt_dir = out / CHECKPOINT_DIR
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if cfg.resume and last is None:
        raise PipelineError(f"reranker.resume is set but {ckpt_dir} holds no checkpoint: unset resume to start afresh")
    if not cfg.resume and last is not None:
        raise PipelineError(
            f"{ckpt_dir} already holds checkpoints: set reranker.resume=true to continue, or use a fresh --out"
        )
    return last


