"""LoRA fine-tuning of the reranker with the transformers Trainer (LlamaRec's recipe).

`train_reranker` wraps the base model with a peft LoRA adapter and trains it on the training
samples (rerank/samples.py, encoded by rerank/collate.py). The loss is the cross-entropy of the
answer's supervised tokens only (label + end of turn), and only those positions are projected onto
the vocabulary: the model's `logits_to_keep` gets a boolean (batch, sequence) mask of the positions
that predict a supervised token, so the (sequence x vocabulary) logits are never formed (with
transformers versions that take no boolean mask, the columns holding them: rerank/compat.py).

Every `eval_steps` optimizer steps (and at the end) the adapter ranks the validation rows (covered
val users, capped by `val_max_users`) with the ranker (rerank/ranker.py) and logs NDCG/Recall/MRR@k
to TensorBoard (<run>/tensorboard); a checkpoint follows each validation (<run>/checkpoints,
resumable). Training stops after `patience` validations without a better NDCG@10, the best
checkpoint is loaded back and saved as <run>/adapter (peft format: adapter_config.json +
adapter_model.safetensors, with prompt_style.json beside it). `load_adapter` reads it back.

Runs under `accelerate launch` too: all training goes through the Trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint

from pipeline.atomic import atomic_dir, write_json
from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, metrics_from_ranks
from rerank.collate import IGNORE_INDEX, TrainingTexts, collator_for
from rerank.compat import checkpointing_args, masked_logits
from rerank.evaluate import covered_sample
from rerank.finite_loss import TRAINING_LOG_ARGS, FiniteLossCallback
from rerank.labels import LabelTokens
from rerank.models import resolve_dtype
from rerank.pretrain import pretrain_stage
from rerank.prompts import PromptStyle, label_tokens
from rerank.readout import AUX_MODULE, READOUT_MODULE, adapter_has_readout, attach_readout, has_readout, readout_scores
from rerank.samples import TrainSample
from rerank.warmup import binding_warmup_stage

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the best adapter, peft format, + prompt_style.json
CHECKPOINT_DIR = "checkpoints"  # Trainer checkpoints (adapter, optimizer, scheduler, RNG, state)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files
SUMMARY_FILE = "train_summary.json"
VAL_KS = (1, 5, 10)  # validation cut-offs (paper: rerank_metric_ks)
VAL_METRIC = "NDCG@10"  # early stopping / best adapter metric (paper)

# (model, covered val rows) -> each row's scores aligned with row["candidates"].
ScoreRows = Callable[[torch.nn.Module, Sequence[Mapping[str, Any]]], list[list[float]]]


# ----------------------------------------------------------------------------------------
# LoRA


def lora_config(cfg: Any, n_layers: Optional[int] = None) -> LoraConfig:
    """The LoRA adapter a `pipeline.config.RerankerConfig` asks for; `n_layers`: the model's
    transformer layer count (needed with cfg.lora_layers)."""
    layers = None
    if cfg.lora_layers is not None:
        if n_layers is None:
            raise PipelineError("reranker.lora_layers needs the model's layer count (config.num_hidden_layers)")
        if cfg.lora_layers > n_layers:
            raise PipelineError(f"reranker.lora_layers {cfg.lora_layers} > the model's {n_layers} layers: lower it or set null")
        layers = list(range(n_layers - cfg.lora_layers, n_layers))  # the top layers, nearest the output
    return LoraConfig(
        layers_to_transform=layers,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # "all-linear": peft's own selection (every linear layer except the output head)
        target_modules=cfg.lora_target_modules if isinstance(cfg.lora_target_modules, str) else list(cfg.lora_target_modules),
        bias="none",  # LlamaRec: only the low-rank matrices train
        task_type="CAUSAL_LM",
        # the readout head's linear unit trains whole and is saved with the adapter
        modules_to_save=[READOUT_MODULE] if cfg.head == "readout" else None,
    )


def add_lora(model: PreTrainedModel, cfg: Any, seed: int, init_adapter: Optional[Path] = None) -> PeftModel:
    """`model` wrapped with a fresh LoRA adapter, initialised from `seed` (or, with `init_adapter`,
    the trainable adapter saved there: stage 2 of a two-stage run). The LoRA layers are injected
    into `model` itself (peft works in place), so `model` runs the adapter afterwards."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # QLoRA, as the paper: the unquantised weights in fp32 for training (restore_load_dtypes undoes it after).
        if not hasattr(model, _LOAD_DTYPES):  # the first stage's record: a later stage finds them upcast already
            setattr(model, _LOAD_DTYPES, [(p, p.dtype) for p in model.parameters()])
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS
        )
    set_seed(seed)
    if cfg.head == "readout" and not has_readout(model):
        attach_readout(model)  # trained and saved by peft as a modules_to_save module
    if init_adapter is not None:
        return load_adapter(model, init_adapter, is_trainable=True)
    try:
        with _quiet_peft():
            if cfg.lora_target_modules == "all-linear" and (cfg.lora_layers is not None or cfg.head == "readout"):
                # peft takes layers_to_transform only with named modules: name every linear layer but the
                # head (and the readout unit, which trains whole)
                cfg = dataclasses.replace(cfg, lora_target_modules=linear_layer_names(model))
            return get_peft_model(model, lora_config(cfg, getattr(model.config, "num_hidden_layers", None)))
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"cannot add LoRA to {type(model).__name__} ({first}): fix reranker.lora_target_modules") from e


_LOAD_DTYPES = "_rerank_load_dtypes"  # attribute of a kbit base: [(parameter, dtype as loaded)]
# Non-reentrant checkpointing works through frozen inputs (LoRA) without an input-grad hook; the Trainer's and
# peft's kbit preparation get the same.
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def restore_load_dtypes(model: torch.nn.Module) -> None:
    """Cast the weights peft's kbit preparation upcast to fp32 back to their load dtype, so a trained 4-bit
    model ranks in the build that --resume and rank_reranker.py load (a fresh NF4 base + the adapter)."""
    for param, dtype in getattr(model, _LOAD_DTYPES, ()):
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def mixed_precision(on_cuda: bool) -> dict[str, bool]:
    """TrainingArguments' autocast flags: the GPU's half type as the model loads in it (resolve_dtype: bf16
    where native, else fp16); none on CPU (fp32)."""
    half = resolve_dtype("auto", "cuda") if on_cuda else None
    return {"bf16": half is torch.bfloat16, "fp16": half is torch.float16}


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    """The distinct names of the model's linear layers except the output head (what peft's
    "all-linear" selects), e.g. [down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj]."""
    head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    names.discard(READOUT_MODULE)  # the readout unit trains whole (modules_to_save), never through LoRA
    return sorted(names)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: hide that FutureWarning only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ----------------------------------------------------------------------------------------
# Loss at the supervised positions only


def supervised_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets): the vocabulary logits at each position that predicts a supervised token
    (labels != IGNORE_INDEX), (N, V), and those N tokens. Only these N positions go through the
    output layer. Positions count real tokens only, as at ranking, so left padding changes nothing."""
    predicts = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
    keep = F.pad(predicts, (0, 1), value=False)  # (B, L) bool: the positions whose logits we need
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # The boolean mask where this transformers takes one, its columns otherwise (rerank/compat.py).
    logits = masked_logits(model, keep, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    n = int(predicts.sum())
    if logits.dim() != 2 or logits.shape[0] != n:
        raise PipelineError(
            f"{type(model).__name__} ignored the boolean logits_to_keep mask (logits {tuple(logits.shape)}, want ({n}, V)): "
            "use a transformers causal LM class that supports it (transformers >= 5)"
        )
    return logits, labels[:, 1:][predicts]


def labels_loss_sum(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_index: torch.Tensor,
    tokens: LabelTokens,
    pad_id: int,
) -> torch.Tensor:
    """Sum over the batch of the cross-entropy over the K candidate labels: -log softmax_k(score_k)
    at the target's label, score_k the ranker's own label score (`ranker.label_scores`, one
    definition for training and ranking). Only the label rows of the output layer are used at the
    answer position (the log-partition there is the same for every label and cancels)."""
    from rerank.ranker import label_scores, plan_for

    scores = label_scores(model, prompt_ids, prompt_mask, tokens.scored_ids, plan_for(tokens), pad_id, normalized=False)
    return F.cross_entropy(scores, target_index, reduction="sum")


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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head, self.readout_aux_weight = head, readout_aux_weight
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
            if self.head == "readout":  # the readout head's K scores (rerank/readout.py)
                term = F.cross_entropy(readout_scores(model, prompts, mask, inputs["candidate_ends"]), target, reduction="sum")
            else:
                term = labels_loss_sum(model, prompts, mask, target, self.train_tokens, self.pad_id)
            loss = loss + self._mean(term, counts.get("prompts"), target.numel())
            if self.readout_aux_weight > 0:  # the training-only unit beside a label head
                aux = readout_scores(model, prompts, mask, inputs["candidate_ends"], name=AUX_MODULE)
                aux_term = F.cross_entropy(aux, target, reduction="sum")
                loss = loss + self.readout_aux_weight * self._mean(aux_term, counts.get("prompts"), target.numel())
        if self.loss_kind == "vocab" or self.vocab_loss_weight > 0:
            logits, targets = supervised_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            term = self._mean(F.cross_entropy(logits.float(), targets, reduction="sum"), counts.get("tokens"), targets.numel())
            loss = loss + (term if self.loss_kind == "vocab" else self.vocab_loss_weight * term)
        return (loss, {"logits": logits}) if return_outputs else loss

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


def ranking_metrics(scores: Sequence[Sequence[float]], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """NDCG/Recall/MRR@VAL_KS of rows scored by `scores` (target rank among each row's candidates)."""
    if len(scores) != len(rows):
        raise PipelineError(f"the scorer returned {len(scores)} score lists for {len(rows)} rows: fix the scorer")
    ranks = [candidate_rank(s, r["candidates"], r["target"]) for s, r in zip(scores, rows)]
    return metrics_from_ranks(ranks, VAL_KS)


def shuffled_rows(rows: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    """`rows` with each row's candidates (and their scores) in a permutation seeded by (seed, user):
    what the LLM sees when the retriever's order carries no information."""
    out = []
    for row in rows:
        order = np.random.default_rng([seed, _SHUFFLE_STREAM, *str(row["user"]).encode()]).permutation(len(row["candidates"]))
        out.append({**row, "candidates": [row["candidates"][i] for i in order], "scores": [row["scores"][i] for i in order]})
    return out


_SHUFFLE_STREAM = 3  # apart from the validation users' draw


def select_val_rows(rows: Sequence[Mapping[str, Any]], max_users: Optional[int], seed: int) -> list[Mapping[str, Any]]:
    """The covered rows (target among the candidates: the users the reranker sees), a seeded uniform
    sample of `max_users` of them when given, in file order."""
    return covered_sample(rows, max_users, seed, _VAL_STREAM)


_VAL_STREAM = 2  # the validation users' draw


def ranking_scorer(
    tokenizer: PreTrainedTokenizerBase, style: PromptStyle, titles_by_item: Mapping[str, str], batch_size: int
) -> ScoreRows:
    """The ranker (rerank/ranker.py, one pass, the retriever's candidate order) as a ScoreRows."""
    from rerank.ranker import rank_rows

    def score(model: torch.nn.Module, rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        return rank_rows(model, tokenizer, style, rows, titles_by_item, batch_size=batch_size, progress=False)

    return score


# ----------------------------------------------------------------------------------------
# Training


def train_reranker(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    ds: SplitDataset,
    train_samples: Sequence[TrainSample],
    val_rows: Sequence[Mapping[str, Any]],
    cfg: Any,
    out_dir: str | Path,
    *,
    seed: int = 0,
    score_rows: Optional[ScoreRows] = None,
    callbacks: Sequence[TrainerCallback] = (),
    init_adapter: Optional[Path] = None,
    keep_lora: bool = True,
) -> dict[str, Any]:
    """Train a LoRA adapter; save the best one to <out_dir>/adapter and return a summary (also
    written to <out_dir>/train_summary.json).

    `cfg`: a RerankerConfig; `val_rows`: val candidates rows (original ids), reduced here to covered
    users (and `val_max_users`); with none, there is no validation and the last adapter is kept.
    `score_rows`: the validation scorer, default the ranker; `callbacks`: more Trainer callbacks
    (e.g. the learnability check's per-epoch scoring, rerank/overfit.py); `init_adapter`: an adapter
    to continue (an earlier stage's); `keep_lora=False` takes the LoRA layers out of `model` at the
    end (a stage whose adapter the next one loads). `model` gets the LoRA layers in place
    and holds the best adapter afterwards (call `model.eval()` before ranking with it)."""
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    resume_from = _checkpoint_to_resume(ckpt_dir, cfg.resume)
    if not train_samples:
        raise PipelineError("no training samples: check the dataset and reranker.max_train_samples")
    val = select_val_rows(val_rows, cfg.val_max_users, seed)
    if not val:
        log.warning("no covered validation rows: training without validation or early stopping, keeping the last adapter")
    if val and score_rows is None:
        titles = {item: title for item, title in zip(ds.item_ids[1:], ds.titles[1:])}
        score_rows = ranking_scorer(tokenizer, style, titles, cfg.rank_batch_size)

    # Stage 1 (optional): domain-adaptive pre-training; stage 2 continues its adapter.
    pretrained = pretrain_stage(model, tokenizer, style, ds, cfg, out, seed) if cfg.pretrain_steps > 0 else None
    init_adapter = pretrained or init_adapter
    # Optional binding warm-up on copy prompts (rerank/warmup.py); the real training continues it.
    warmed = binding_warmup_stage(model, tokenizer, style, ds, train_samples, cfg, out, seed, init_adapter) if cfg.binding_warmup_steps > 0 else None
    init_adapter = warmed or init_adapter
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
        # gradient checkpointing, under this transformers' argument names (rerank/compat.py)
        **checkpointing_args(cfg.gradient_checkpointing, CHECKPOINTING_KWARGS),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        **TRAINING_LOG_ARGS,  # a NaN loss is logged as NaN (rerank/finite_loss.py)
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
    tensorboard.logging_dir = str(out / TENSORBOARD_DIR)
    tokens = label_tokens(tokenizer, style)
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
        "pretrain_adapter": str(pretrained) if pretrained is not None else None,
        "binding_warmup_adapter": str(warmed) if warmed is not None else None,
    }
    if trainer.is_world_process_zero():
        write_json(out / SUMMARY_FILE, summary)
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


def _train_candidate_count(samples: Sequence[TrainSample]) -> int:
    """K of the training prompts (one label set for the labels loss): every sample has the same."""
    counts = {len(s.candidates) for s in samples}
    if len(counts) != 1:
        raise PipelineError(f"training prompts have different candidate counts {sorted(counts)}: the sampler gives each the same K")
    return counts.pop()


def _checkpoint_to_resume(ckpt_dir: Path, resume: bool) -> Optional[str]:
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume and last is None:
        raise PipelineError(f"reranker.resume is set but {ckpt_dir} holds no checkpoint: unset resume to start afresh")
    if not resume and last is not None:
        raise PipelineError(
            f"{ckpt_dir} already holds checkpoints: set reranker.resume=true to continue, or use a fresh --out"
        )
    return last


def save_adapter(model: PeftModel, style: PromptStyle, adapter_dir: Path) -> None:
    """peft's save_pretrained + prompt_style.json, written to a temporary folder and renamed into place."""
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(str(tmp))
        style.save(tmp)


def resolve_adapter_dir(directory: str | Path) -> Path:
    """The adapter folder: `directory` itself, or its adapter/ (a training run directory)."""
    d = Path(directory)
    for cand in (d, d / ADAPTER_DIR):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise PipelineError(f"no adapter_config.json in {d} or {d / ADAPTER_DIR}: point to a reranker training run or its adapter folder")


def load_adapter(base_model: PreTrainedModel, directory: str | Path, is_trainable: bool = False) -> PeftModel:
    """The trained reranker: `base_model` (a fresh one: peft injects the layers in place) with the
    adapter from `directory` (a run directory or its adapter/), in eval mode. Its prompt format:
    `PromptStyle.load(resolve_adapter_dir(directory))`."""
    path = resolve_adapter_dir(directory)
    if adapter_has_readout(path) and not has_readout(base_model):
        attach_readout(base_model)  # the module peft restores the trained readout into
    with _quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
    if not is_trainable:
        model.eval()
    return model
