"""`RerankTrainer`: the transformers Trainer with the reranker's loss (the answer's supervised tokens
only, or the K labels' scores, or the readout head's; plus the optional auxiliary readout and vocab
terms, each logged apart) and ranking validation (NDCG@k of the val rows, also in shuffled order).
`rerank.training.trainer.train_adapter` builds and runs it."""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from pipeline.errors import PipelineError
from rerank.model.readout import AUX_MODULE, line_spans, readout_scores
from rerank.prompting.labels import LabelTokens
from rerank.training.loss import labels_loss_sum, supervised_logits
from rerank.training.validation import ScoreRows, ranking_metrics, shuffled_rows


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
                lines = inputs.get("candidate_ends")  # spans when the lines are shown isolated
                spans = None if lines is None else line_spans(lines)
                term = labels_loss_sum(model, prompts, mask, target, self.train_tokens, self.pad_id, spans=spans)
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
