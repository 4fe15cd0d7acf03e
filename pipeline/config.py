"""Typed configuration: every YAML under configs/ is loaded into these dataclasses, once.

`load_config(path, overrides)` reads the YAML, applies `--set dotted.key=value` overrides, and
builds the dataclasses, checking every key and type. Unknown keys, wrong types and bad values
fail at start with a one-line `PipelineError` naming the key and the fix. Nothing later in the
pipeline re-reads raw YAML or overrides a setting silently.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import PipelineError

METRIC_KS = (1, 5, 10, 20, 50)  # full-catalogue cut-offs reported for every retriever


# Values that modules elsewhere check too: named here once and imported there.
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # reranker.dtype besides "auto"
CalibrationMethod = Literal["none", "permuted", "content_free"]  # reranker.calibration
CALIBRATION_METHODS: tuple[str, ...] = typing.get_args(CalibrationMethod)

@dataclass
class DataConfig:
    # "ml-100k": classic MovieLens 100K bundled in the recbole wheel (no download; the default).
    # "ml-latest-small": the paper's "ML-100k" (ratings.csv + movies.csv) from `path`.
    # "amazon": Amazon 2014 ratings_<category>.csv + meta_<category>.json.gz from `path`.
    # "generic": `path`/interactions.csv (user,item,timestamp[,rating]) + `path`/items.csv (item,title).
    dataset: Literal["ml-100k", "ml-latest-small", "amazon", "generic"] = "ml-100k"
    path: Optional[str] = None  # directory with the raw files (not needed for ml-100k)
    category: Optional[str] = None  # amazon only: "Beauty", "Video_Games", ...
    min_rating: Optional[float] = None  # keep ratings >= this; None keeps all (as LlamaRec)
    min_user_count: int = 5  # iterative k-core: users with fewer interactions are dropped
    min_item_count: int = 5  # ... and items with fewer
    # Keep only the first N users (by original id order) before k-core: small slices for
    # smoke runs and tests. None = all users.
    max_users: Optional[int] = None
    cache_dir: str = ".cache/data"  # preprocessed datasets, keyed by a hash of this section

    def validate(self) -> None:
        if self.dataset != "ml-100k" and not self.path:
            raise PipelineError(f"data.path is required for dataset {self.dataset!r}: set it to the directory with the raw files")
        if self.dataset == "amazon" and not self.category:
            raise PipelineError("data.category is required for dataset 'amazon': set it to e.g. Beauty or Video_Games")
        if self.min_user_count < 3:
            raise PipelineError("data.min_user_count must be >= 3: leave-one-out needs train, val and test items per user")
        if self.min_item_count < 1:
            raise PipelineError("data.min_item_count must be >= 1")
        if self.max_users is not None and self.max_users < 1:
            raise PipelineError("data.max_users must be a positive integer or null")


@dataclass
class RetrieverConfig:
    # lrurec: ours (paper's retriever); pop: popularity; the rest: recbole model classes.
    model: Literal["lrurec", "pop", "sasrec", "bert4rec", "narm", "gru4rec"] = "lrurec"
    max_len: int = 200  # input history length (paper: 200 for MovieLens, 50 for Amazon)
    hidden: int = 64  # item embedding / model width (paper: 64)
    n_blocks: int = 2  # LRU blocks (paper: 2); layers for the recbole models
    dropout: float = 0.1  # embedding / feed-forward dropout
    attn_dropout: float = 0.1  # dropout inside the LRU layer (attention dropout for SASRec/BERT4Rec)
    # Optimiser (`retrieval.training.make_optimizer`): "adamw" is LRURec's paper setting (decoupled
    # weight decay); "adam" with weight_decay 0 and grad_clip null is recbole's usual one (its
    # weight_decay, when set, is Adam's L2 penalty).
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3  # paper
    weight_decay: float = 0.01  # paper (AdamW)
    grad_clip: Optional[float] = 5.0  # max grad norm (paper); null = no clipping
    batch_size: int = 64
    max_epochs: int = 200  # upper bound; early stopping normally ends training first
    patience: int = 10  # epochs without validation NDCG@10 improvement before stopping
    # Early stopping on the mean validation NDCG@10 of the last `smooth_window` validations (patience
    # counts those), so a one-epoch spike on 943 users is not what stops or selects; the weights kept
    # are the best single epoch inside the best window. 1 = the raw curve (the paper's rule).
    smooth_window: int = 1
    eval_every: int = 1  # epochs between validations
    # recbole models trained on prefixes (train_on below; by default bert4rec): every prefix
    # of every train sequence is ~96K instances per epoch on ML-100K; this samples that many per epoch
    # instead (seeded), with validation every N instances. None = every prefix (recbole's own
    # behaviour). A model trained on windows refuses it when trained (not checked here, so old run
    # directories still load); lrurec/pop ignore it.
    instances_per_epoch: Optional[int] = None
    # recbole models: what one training row is (`retrieval.recbole_models.objective`). "windows": windows of
    # <= max_len of each train sequence, every position once per epoch (sasrec/gru4rec: next-item loss
    # at every position, narm through its attention restated per position; bert4rec: its cloze loss on
    # the windows). "prefixes": one instance per prefix, the model's own calculate_loss (recbole's
    # sequential augmentation). null = the model's default: windows for sasrec/gru4rec/narm, prefixes
    # for bert4rec (measured better on ML-100K). lrurec always trains on windows; pop ignores it.
    train_on: Optional[Literal["windows", "prefixes"]] = None
    top_k: int = 20  # candidates written per user (paper: 20)
    # Also write candidates_train_prefixes.jsonl: the top_k (history masked) after every prefix of
    # each user's train sequence, the reranker's per-prefix hard negatives. 0 = do not write it;
    # N = each user's last N prefixes; null = every prefix.
    prefix_candidates: Optional[int] = 0
    device: str = "auto"  # "auto" = cuda if available else cpu

    def validate(self) -> None:
        for name in ("max_len", "hidden", "n_blocks", "batch_size", "max_epochs", "patience", "eval_every", "top_k", "smooth_window"):
            if getattr(self, name) < 1:
                raise PipelineError(f"retriever.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise PipelineError(f"retriever.{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.lr <= 0:
            raise PipelineError(f"retriever.lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            raise PipelineError(f"retriever.weight_decay must be >= 0 (got {self.weight_decay})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise PipelineError(f"retriever.grad_clip must be > 0, or null for no clipping (got {self.grad_clip})")
        if self.prefix_candidates is not None and self.prefix_candidates < 0:
            raise PipelineError(f"retriever.prefix_candidates must be >= 0 or null (got {self.prefix_candidates})")
        if self.instances_per_epoch is not None and self.instances_per_epoch < 1:
            raise PipelineError(f"retriever.instances_per_epoch must be a positive integer or null (got {self.instances_per_epoch})")


@dataclass
class RerankerConfig:
    model: str = "tiny-qwen2"  # HF id or local path; or "smollm2-135m-instruct" / "tiny-qwen2"
    # Model loading (`rerank.model.sources.load_model_and_tokenizer`).
    dtype: str = "auto"  # "auto" = bfloat16 on GPU (float16 if unsupported), float32 on CPU
    device: str = "auto"  # "auto" = cuda if available else cpu
    load_in_4bit: bool = False  # NF4 base weights via bitsandbytes (paper: 4-bit); CUDA only
    # "hf" only: "unsloth" is refused at load (`rerank.model.sources.UNSLOTH_DROPPED` says why); the key stays
    # so a config naming it gets that reason, not "unknown value".
    backend: Literal["hf", "unsloth"] = "hf"
    model_cache_dir: str = ".cache/models"  # where tiny-qwen2 / smollm2-135m-instruct are built once
    # Labels (`rerank.prompting.labels`): "letters" (A..T), "numbers" (1..20), or "custom" (custom_labels).
    label_scheme: Literal["letters", "numbers", "custom"] = "letters"
    custom_labels: Optional[list[str]] = None  # label_scheme=custom only: the labels, candidate 1 first
    # Closing sentence of the prompt; {first}/{last} become the first and K-th label. None = the
    # scheme's own ("Answer with only one letter (A-T).").
    answer_instruction: Optional[str] = None
    # Prompt (`rerank.prompting.prompts.build_prompt`).
    # Where each candidate's label sits on its line: "before" the title ("A) Title", the paper's place),
    # "after" it ("- Title (A)": under causal attention the label token can then carry the title), or "both".
    label_position: Literal["before", "after", "both"] = "before"
    prompt_template: Literal["auto", "chat", "alpaca"] = "auto"  # auto: the tokenizer's chat template if any, else Alpaca-style
    max_history: int = 20  # most recent history items shown (paper: 20)
    title_max_tokens: int = 32  # each title cut to this many tokens (paper: 32)
    max_prompt_tokens: int = 1536  # longer prompts drop history oldest first, never candidates (paper: 1536)
    # Ranking (`rerank.inference.ranker.rank_rows`).
    # Prompts per forward pass, sorted by length so a batch wastes little padding; 16 prompts of
    # ~600 tokens fit a 7B model in bf16 with room to spare, and larger batches gain nothing on CPU.
    rank_batch_size: int = 16
    # Candidate orders averaged per user (position-bias control); 1 = the retriever's order only,
    # one pass per user (paper). P > 1 costs P passes: the original order, then seeded shuffles.
    rank_permutations: int = 1
    # Training (`train_adapter`). Samples (`rerank.training.samples.build_samples`): every prefix of each user's TRAIN
    # sequence is a prompt; its candidates are the target + negatives, shuffled.
    # "random": negatives drawn uniformly from items outside the user's history so far (paper);
    # "retriever": the user's candidates_train.jsonl top-K first (hard negatives), topped up at random.
    # "mix": a `retriever_negative_ratio` share of the K-1 negatives from the retriever, the rest random.
    # The retriever's candidates are those of the sample's own prefix when the retriever run wrote
    # candidates_train_prefixes.jsonl (retriever.prefix_candidates), else the user's last train item's.
    train_negatives: Literal["random", "retriever", "mix"] = "random"
    retriever_negative_ratio: float = 0.5  # mix only: share of the negatives taken from the retriever
    # retriever/mix only: keep just the prefixes whose target is among the retriever's candidates for
    # that very prefix (candidates_train_prefixes.jsonl), as every val/test prompt's is (covered users).
    # Otherwise a prefix the retriever missed shows its target beside the retriever's favourites: an
    # "odd one out" a model learns instead of the next item (scripts/probe_states.py on SmolLM2: held-out
    # uncovered training prompts NDCG@10 0.34, covered ones 0.26, val 0.24, chance 0.23; default.yaml).
    train_covered_only: bool = False
    train_candidates: int = 20  # candidates per training prompt, target included (paper: 1 + 19 negatives)
    train_min_history: int = 1  # a prefix needs this many earlier items (paper: 1, targets from the 2nd item on)
    train_max_prefixes_per_user: Optional[int] = None  # only each user's last N prefixes (CPU runs); None = all (paper)
    max_train_samples: Optional[int] = None  # seeded uniform sample of this many prefixes (CPU runs); None = all (paper)
    supervise_end_of_turn: bool = True  # loss on label + end-of-turn token (paper: label + EOS); false = label only
    # Training loss (`RerankTrainer.compute_loss`). "vocab": cross-entropy over the whole vocabulary on the
    # answer's tokens (paper). "labels": cross-entropy over the K candidate labels' scores, the same
    # scores the ranker reads (`rerank.inference.ranker.label_scores`), so every gradient step is about which candidate,
    # never about the answer's format.
    loss: Literal["vocab", "labels"] = "vocab"
    # How a candidate is scored (one forward pass either way). "label_tokens": the probability of its
    # label at the answer position (paper). "readout": a trained linear unit on the hidden state at
    # the end of the candidate's own prompt line (`rerank.model.readout`), label-free, so it needs no
    # binding of content to a symbol; trained with loss "labels" (the same K-way cross-entropy).
    head: Literal["label_tokens", "readout"] = "label_tokens"
    # How the forward shows the candidate lines. "causal": as written, so a line's states also read
    # the lines drawn above it (a re-drawn order changes every line's state). "isolated": each line
    # attends to the shared prefix (instruction, history, header) and to itself only, at the same
    # positions wherever it is drawn (one 4D attention mask, still one forward pass): a readout score
    # depends on the history and its own line only. The answer position (label heads) sees every
    # line. Loss labels only; local scoring only (vLLM and generation show the prompt as written).
    candidate_attention: Literal["causal", "isolated"] = "causal"
    # Label head only: + this x the readout loss of a training-only unit at each candidate's line end
    # (a second forward pass), so the model learns to put each candidate's content score at the end of
    # its line, where the label head can copy it from; the unit is dropped after training. 0 = off.
    readout_aux_weight: float = 0.0
    # The decoder layer (1..L) whose output at the line ends the auxiliary unit reads; None = the last.
    # A middle layer puts the content score where the layers above it can still attend to it from the
    # answer position and copy the label beside it (the last layer's states feed nothing after them).
    # Needs LoRA at and below that layer (lora_layers > L - layer).
    readout_aux_layer: Optional[int] = None
    vocab_loss_weight: float = 0.0  # loss "labels" only: + this x the "vocab" loss (a second forward pass when > 0)
    # Re-draw each training prompt's candidate order every epoch (seeded by sample and epoch): the
    # target's slot stays uniform over the labels, so no position prior can be learned from repeats.
    reshuffle_each_epoch: bool = True
    lora_r: int = 8  # LoRA rank (paper)
    lora_alpha: int = 32  # LoRA scale numerator: updates scaled by alpha / r (paper)
    lora_dropout: float = 0.05  # dropout on the LoRA input (paper)
    # Layers that get LoRA (paper: q_proj, v_proj); "all-linear" = every linear layer but the output head.
    lora_target_modules: Union[Literal["all-linear"], list[str]] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoRA in the last N transformer layers only (peft layers_to_transform): backward stops below
    # them, so a step costs ~1 + 2N/L forward passes instead of 3 (CPU recipes). None = every layer (paper).
    lora_layers: Optional[int] = None
    learning_rate: float = 1e-4  # peak learning rate (paper)
    num_epochs: float = 1.0  # passes over the samples (paper: 1); early stopping may end training sooner
    train_batch_size: int = 16  # prompts per device per forward pass (paper: 16 on MovieLens, 12 on Amazon)
    grad_accum_steps: int = 1  # batches per optimizer step (paper: 1)
    warmup_steps: int = 100  # linear warm-up steps, then linear decay to 0 (paper: 100)
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA weights (paper: the Trainer's default, 0)
    max_grad_norm: float = 1.0  # gradient clipping (paper: the Trainer's default, 1.0)
    # A transformers optimizer name; the paper's "paged_adamw_32bit" needs bitsandbytes on CUDA.
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower (paper: on)
    eval_steps: int = 100  # optimizer steps between validations, each followed by a checkpoint (paper: 100)
    patience: int = 20  # validations without a better val NDCG@10 before stopping early (paper: 20)
    # Validation ranks a seeded sample of this many covered val users (rank_batch_size prompts per
    # pass); None = all (paper).
    val_max_users: Optional[int] = None
    # Validation also ranks the same users with their candidates in a seeded shuffled order
    # (eval_shuffled_NDCG@k): the LLM's content signal with the retriever's order hidden. Costs a
    # second pass over the validation users.
    val_shuffled: bool = True
    # Which validation NDCG@10 early stopping and the kept adapter follow: "retriever_order" (paper)
    # or "shuffled" (the content signal alone: the position prior is calibration's job).
    best_by: Literal["retriever_order", "shuffled"] = "retriever_order"
    # Position prior removed at ranking (`rerank.inference.calibration`): "none"; "permuted": each slot's mean
    # score over validation prompts in seeded shuffled candidate orders (content averages out, the
    # slot's prior stays); "content_free": slot scores of one prompt whose history and candidates
    # are "N/A". The prior is subtracted from each slot's score before orders are averaged.
    calibration: CalibrationMethod = "none"
    calibration_users: Optional[int] = 64  # permuted: covered val users scored (None = all)
    calibration_orders: int = 2  # permuted: shuffled orders per user
    # Fusion with the retriever (`rerank.inference.fusion`): final = z(LLM) + w * z(retriever score), z the
    # per-user standardisation over the candidates; w picked on the validation users from
    # fusion_weights (the best val NDCG@10; ties to the smaller w), then applied to test.
    # False = the LLM alone (w = 0).
    fusion: bool = False
    fusion_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
    )
    logging_steps: int = 10  # optimizer steps between training-loss logs to TensorBoard (paper: 10)
    save_total_limit: int = 3  # checkpoints kept under <run>/checkpoints; the best one always survives (paper: 3)
    dataloader_workers: int = 0  # processes building prompts; 0 = the training process (prompt building is cheap)
    resume: bool = False  # continue from the last checkpoint under <run>/checkpoints (same config and samples)
    # Stage 1, optional domain-adaptive pre-training (not in the paper; `pretrain_stage`): causal-LM
    # loss on every token of the users' TRAIN histories rendered as text (windows of max_history
    # items in the prompt's history format), training the LoRA adapter that the reranking fine-tune
    # (stage 2) then continues. 0 = off (paper: fine-tune only).
    pretrain_steps: int = 0
    pretrain_learning_rate: float = 1e-4  # stage-1 peak learning rate (linear decay, no warm-up)
    pretrain_batch_size: int = 8  # history windows per stage-1 optimizer step
    # Binding warm-up (`binding_warmup_stage`): optimizer steps on copy prompts (the answer is the candidate
    # whose title closes the history) before the real training, which continues that adapter. 0 = off.
    binding_warmup_steps: int = 0
    # Copy prompts mixed into the real training at a falling share (`rerank.training.collate.TrainingTexts`):
    # in epoch e (from 0) each prompt is shown as its copy prompt with probability 1 - e / N, seeded
    # per prompt and epoch, so by epoch N only real prompts remain. After a warm-up alone the real
    # task drops the copy circuit (the letters fall back to uniform); the mix keeps asking for it while
    # the real task asks it to carry a predicted content score (readout_aux_weight). 0 = off.
    binding_mix_epochs: float = 0.0

    def validate(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise PipelineError(f"reranker.dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if (self.label_scheme == "custom") != bool(self.custom_labels):
            raise PipelineError(
                "reranker.custom_labels must be set exactly when reranker.label_scheme is 'custom': set both or neither"
            )
        if self.custom_labels and len(set(self.custom_labels)) != len(self.custom_labels):
            raise PipelineError("reranker.custom_labels repeats a label: every label must be distinct")
        if self.answer_instruction is not None and not all(p in self.answer_instruction for p in ("{first}", "{last}")):
            raise PipelineError("reranker.answer_instruction must contain {first} and {last}: add both placeholders")
        if self.max_history < 0:
            raise PipelineError(f"reranker.max_history must be >= 0 (got {self.max_history})")
        for name in ("title_max_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise PipelineError(f"reranker.{name} must be >= 1 (got {getattr(self, name)})")
        # Ranking (`rank_rows`).
        for name in ("rank_batch_size", "rank_permutations"):
            if getattr(self, name) < 1:
                raise PipelineError(f"reranker.{name} must be >= 1 (got {getattr(self, name)})")
        # Training (`train_adapter`).
        if self.backend == "unsloth":  # at load, not when the model loads (after the retriever has trained)
            raise PipelineError(
                "reranker.backend 'unsloth' is not supported (unsloth ignores the answer-only loss's logits_to_keep and "
                "pins older transformers/trl; README, GPU): use reranker.backend=hf"
            )
        if not self.fusion_weights:
            raise PipelineError("reranker.fusion_weights is empty: give at least one weight (0 = the LLM alone)")
        if self.train_candidates < 2:
            raise PipelineError(f"reranker.train_candidates must be >= 2: the target and at least one negative (got {self.train_candidates})")
        for name in ("train_min_history", "warmup_steps", "dataloader_workers", "pretrain_steps", "binding_warmup_steps", "binding_mix_epochs"):
            if getattr(self, name) < 0:
                raise PipelineError(f"reranker.{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("train_max_prefixes_per_user", "max_train_samples", "val_max_users"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PipelineError(f"reranker.{name} must be a positive integer or null (got {getattr(self, name)})")
        for name in ("lora_r", "train_batch_size", "grad_accum_steps", "eval_steps", "patience", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise PipelineError(f"reranker.{name} must be >= 1 (got {getattr(self, name)})")
        if self.pretrain_batch_size < 1:
            raise PipelineError(f"reranker.pretrain_batch_size must be >= 1 (got {self.pretrain_batch_size})")
        for name in ("lora_alpha", "learning_rate", "num_epochs", "max_grad_norm", "pretrain_learning_rate"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"reranker.{name} must be > 0 (got {getattr(self, name)})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PipelineError(f"reranker.lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.weight_decay < 0:
            raise PipelineError(f"reranker.weight_decay must be >= 0 (got {self.weight_decay})")
        if not self.lora_target_modules:
            raise PipelineError("reranker.lora_target_modules is empty: name the layers to adapt, e.g. [q_proj, v_proj] or all-linear")
        if self.best_by == "shuffled" and not self.val_shuffled:
            raise PipelineError("reranker.best_by shuffled needs the shuffled validation: set reranker.val_shuffled=true")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise PipelineError(f"reranker.lora_layers must be a positive integer or null (got {self.lora_layers})")
        if not 0.0 <= self.retriever_negative_ratio <= 1.0:
            raise PipelineError(f"reranker.retriever_negative_ratio must be in [0, 1] (got {self.retriever_negative_ratio})")
        if self.train_covered_only and self.train_negatives == "random":
            raise PipelineError("reranker.train_covered_only reads the retriever's candidates: set train_negatives=retriever or mix")
        if self.vocab_loss_weight < 0:
            raise PipelineError(f"reranker.vocab_loss_weight must be >= 0 (got {self.vocab_loss_weight})")
        if self.head == "readout" and (self.loss != "labels" or self.vocab_loss_weight > 0):
            raise PipelineError("reranker.head readout is trained with the K-way loss alone: set reranker.loss=labels and vocab_loss_weight=0")
        if self.candidate_attention == "isolated" and (self.loss != "labels" or self.vocab_loss_weight > 0):
            raise PipelineError(
                "reranker.candidate_attention isolated is trained through the ranker's own scores (loss labels): "
                "set reranker.loss=labels and vocab_loss_weight=0, or candidate_attention=causal"
            )
        if self.readout_aux_weight < 0:
            raise PipelineError(f"reranker.readout_aux_weight must be >= 0 (got {self.readout_aux_weight})")
        if self.readout_aux_weight > 0 and (self.head != "label_tokens" or self.loss != "labels"):
            raise PipelineError("reranker.readout_aux_weight helps a label head trained with the K-way loss: set reranker.head=label_tokens and reranker.loss=labels")
        if self.readout_aux_layer is not None and (self.readout_aux_layer < 1 or self.readout_aux_weight == 0):
            raise PipelineError(
                f"reranker.readout_aux_layer ({self.readout_aux_layer}) is a decoder layer >= 1 read by the auxiliary unit: "
                "set reranker.readout_aux_weight > 0 with it, or leave it null"
            )
        if self.head == "readout" and self.pretrain_steps > 0:  # its adapter has no readout unit to continue
            raise PipelineError("reranker.head readout does not continue a pre-training stage's adapter: set reranker.pretrain_steps=0")
        if self.vocab_loss_weight > 0 and self.loss != "labels":
            raise PipelineError("reranker.vocab_loss_weight adds a vocab term to loss 'labels': set reranker.loss=labels or the weight to 0")
        if self.calibration_users is not None and self.calibration_users < 1:
            raise PipelineError(f"reranker.calibration_users must be a positive integer or null (got {self.calibration_users})")
        if self.calibration_orders < 1:
            raise PipelineError(f"reranker.calibration_orders must be >= 1 (got {self.calibration_orders})")
        if not self.fusion_weights or any(w < 0 for w in self.fusion_weights):
            raise PipelineError(f"reranker.fusion_weights must be a non-empty list of weights >= 0 (got {self.fusion_weights})")


@dataclass
class AnalysisConfig:
    """Settings of the analysis scripts (compare_labels.py, generation_baseline.py,
    position_bias.py, compare_training.py); the pipeline stages ignore this section."""

    split: Literal["val", "test"] = "test"  # the split the analyses rank and report
    # Covered users the model-running analyses (generation, position bias) look at: a seeded
    # uniform sample, so CPU runs stay short. None = all covered users.
    max_users: Optional[int] = None
    # compare_labels.py / compare_training.py: variant name -> reranker overrides. Each variant is a
    # full reranker run (train + rank) on the same candidates, data, model, seed and budget, so a
    # third label scheme is one more entry here, e.g.
    #   lower: {label_scheme: custom, custom_labels: [a, b, ..., t]}
    variants: dict[str, dict] = field(default_factory=dict)
    # generation_baseline.py: transformers' generate, greedy. "greedy": the model's one answer
    # (top-1 only); "list": asked for every label, best first (a full ranking).
    generation_modes: list[str] = field(default_factory=lambda: ["greedy", "list"])
    generation_batch_size: int = 8  # prompts per generate call
    # position_bias.py: candidate orders per user; the first is the retriever's, the second a
    # seeded shuffle, and all of them are averaged for the permutation-averaged ranking.
    position_permutations: int = 4

    def validate(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise PipelineError(f"analysis.max_users must be a positive integer or null (got {self.max_users})")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                raise PipelineError(f"analysis.variants.{name} must be a mapping of reranker keys, got {overrides!r}")
        bad = [m for m in self.generation_modes if m not in ("greedy", "list")]
        if bad or not self.generation_modes:
            raise PipelineError(f"analysis.generation_modes must list greedy and/or list (got {self.generation_modes})")
        if self.generation_batch_size < 1:
            raise PipelineError(f"analysis.generation_batch_size must be >= 1 (got {self.generation_batch_size})")
        if self.position_permutations < 2:
            raise PipelineError(
                f"analysis.position_permutations must be >= 2: the retriever order and at least one shuffle (got {self.position_permutations})"
            )


@dataclass
class ServeConfig:
    """scripts/serve.py: the HTTP front end (`serving.app.create_app`) and what scores behind it."""

    host: str = "127.0.0.1"  # loopback by default: exposing a model is the operator's choice (--host 0.0.0.0)
    port: int = 8000
    # "local": the run's model in this process; "vllm": a vLLM server's /v1/completions
    # (`serving.vllm_backend.VLLMScorer`; single-token labels only), the scale-out path on GPUs.
    backend: Literal["local", "vllm"] = "local"
    # Concurrent requests are gathered into one forward pass: at most this many requests ...
    max_batch_size: int = 8
    # ... waiting at most this long after the first one arrived (latency traded for throughput).
    max_wait_ms: float = 10.0
    # Requests waiting for a forward pass; beyond it the server answers 503 at once rather than
    # queueing without bound (a client retries; the server keeps its latency).
    max_queue: int = 256
    # Subtract the run's position prior (reranker.calibration, estimated on validation prompts) from
    # the label scores, as the run's `llm_scores` did; false serves the raw label scores.
    calibration: bool = True
    name: Optional[str] = None  # model name in responses and /info; None = the run / model folder name
    vllm_url: Optional[str] = None  # backend vllm: the server's base URL, e.g. http://127.0.0.1:8001
    vllm_model: str = "reranker"  # backend vllm: the served name of the LoRA adapter (--lora-modules NAME=DIR)
    vllm_timeout_s: float = 60.0  # backend vllm: seconds per HTTP request before it counts as failed

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise PipelineError(f"serve.port must be 0..65535 (got {self.port})")
        if self.max_batch_size < 1:
            raise PipelineError(f"serve.max_batch_size must be >= 1 (got {self.max_batch_size})")
        if self.max_wait_ms < 0:
            raise PipelineError(f"serve.max_wait_ms must be >= 0 (got {self.max_wait_ms})")
        if self.max_queue < 1:
            raise PipelineError(f"serve.max_queue must be >= 1 (got {self.max_queue})")
        if self.backend == "vllm" and not self.vllm_url:
            raise PipelineError("serve.backend=vllm needs serve.vllm_url: set it to the vLLM server's base URL, e.g. http://127.0.0.1:8001")
        if self.vllm_timeout_s <= 0:
            raise PipelineError(f"serve.vllm_timeout_s must be > 0 (got {self.vllm_timeout_s})")


@dataclass
class OverfitConfig:
    """scripts/overfit_check.py (`rerank.overfit.run_check`): the learnability check, the reranker section's
    recipe trained on a handful of its own training prompts."""

    n_prompts: int = 32  # training prompts fitted (the reranker's max_train_samples during the check)
    epochs: int = 12  # passes over them; the loss and top-1 are measured after each
    # "redrawn": candidate orders re-drawn every epoch (only content-to-label binding fits);
    # "fixed": one order per prompt (memorising "which label for this prompt" fits).
    modes: list[Literal["redrawn", "fixed"]] = field(default_factory=lambda: ["redrawn", "fixed"])

    def validate(self) -> None:
        for name in ("n_prompts", "epochs"):
            if getattr(self, name) < 1:
                raise PipelineError(f"overfit.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise PipelineError(f"overfit.modes must list redrawn and/or fixed once each (got {self.modes})")


@dataclass
class ProbeConfig:
    """scripts/probe_states.py (`analysis.state_probe`): a linear unit fitted on the frozen model's
    candidate-line states of training prompts, scored on held-out users' prompts and on val."""

    n_prompts: int = 1200  # training prompts (the reranker section's samples): ~20 min of forwards on 2 cores
    held_out: float = 0.25  # share of their users whose prompts score the probe instead of fitting it
    val_max_users: Optional[int] = None  # covered val users scored, shuffled order (None = all)
    weight_decay: float = 1e-3  # L2 on the unit's weights (standardised states)
    steps: int = 300  # full-batch Adam steps

    def validate(self) -> None:
        for name in ("n_prompts", "steps"):
            if getattr(self, name) < 1:
                raise PipelineError(f"probe.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 < self.held_out < 1.0:
            raise PipelineError(f"probe.held_out must be in (0, 1) (got {self.held_out})")
        if self.weight_decay < 0:
            raise PipelineError(f"probe.weight_decay must be >= 0 (got {self.weight_decay})")
        if self.val_max_users is not None and self.val_max_users < 1:
            raise PipelineError(f"probe.val_max_users must be >= 1 or null (got {self.val_max_users})")


@dataclass
class Config:
    seed: int = 0  # every RNG (python, numpy, torch) is seeded from this
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    overfit: OverfitConfig = field(default_factory=OverfitConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # train_reranker.py: the retriever run directory whose candidates_<split>.jsonl are reranked.
    # run_experiment.py writes both stages into --out and ignores this.
    retriever_run: Optional[str] = None

    def validate(self) -> None:
        for name in self.analysis.variants:
            variant_config(self, name)  # every variant's reranker keys are checked at start too


def variant_config(cfg: Config, name: str) -> Config:
    """`cfg` with analysis.variants[name] applied to its reranker section (validated like the rest)."""
    if name not in cfg.analysis.variants:
        raise PipelineError(f"no variant {name!r} in analysis.variants (have: {', '.join(cfg.analysis.variants) or 'none'})")
    merged = {**to_dict(cfg.reranker), **cfg.analysis.variants[name]}
    reranker = build(RerankerConfig, merged, prefix=f"analysis.variants.{name}.")
    return dataclasses.replace(cfg, reranker=reranker)


# ----------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), cls=Config):
    """YAML file (or None for defaults) + `dotted.key=value` overrides -> validated `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"config file not found: {path} (pass --config with a YAML under configs/)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "syntax error"
            raise PipelineError(f"config file {path} is not valid YAML ({first}): fix its syntax") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return build(cls, raw, prefix="")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {item!r} is not of the form dotted.key=value")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PipelineError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def build(cls, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping, type-checking each field; then call validate()."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{where} must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PipelineError(
            f"unknown config key {prefix}{unknown[0]!r} in {where}: valid keys are {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(a, value, key)
            except PipelineError as e:
                errors.append(str(e))
        raise PipelineError(errors[0])
    if origin is Literal:
        if value not in args:
            raise PipelineError(f"config key {key} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"config key {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string: take it as the number meant
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"config key {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan/.inf (or 1e999): every later number would be meaningless
            raise PipelineError(f"config key {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"config key {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"config key {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PipelineError(f"config key {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in the schema, not input


def to_dict(cfg) -> dict:
    """The fully resolved config as plain data (what config.yaml in a run directory holds)."""
    return dataclasses.asdict(cfg)
