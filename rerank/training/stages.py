"""The reranker's training, stage by stage: optional domain-adaptive pre-training
(`reranker.pretrain_steps`), an optional binding warm-up (`reranker.binding_warmup_steps`), then the
real training (`train_adapter`), each stage continuing the previous one's adapter. Every stage keeps
its own folder in the run directory, and a finished stage is not trained again on --resume."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from pipeline.config import RerankerConfig
from pipeline.data.dataset import SplitDataset
from rerank.prompting.style import PromptStyle
from rerank.training.pretrain import pretrain_stage
from rerank.training.samples import TrainSample
from rerank.training.trainer import check_start, train_adapter
from rerank.training.validation import ScoreRows
from rerank.training.warmup import binding_warmup_stage


def train_reranker(
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
) -> dict[str, Any]:
    """Train the reranker's adapter through every stage `cfg` asks for and return the last stage's
    summary (`train_adapter`: the best adapter in <out_dir>/adapter, <out_dir>/train_summary.json),
    which records the earlier stages' adapters."""
    out = Path(out_dir)
    if cfg.pretrain_steps > 0 or cfg.binding_warmup_steps > 0:
        check_start(out, cfg, train_samples)  # train_adapter's own checks, before an earlier stage spends time
    pretrained = pretrain_stage(model, tokenizer, style, ds, cfg, out, seed) if cfg.pretrain_steps > 0 else None
    warmed = (
        binding_warmup_stage(model, tokenizer, style, ds, train_samples, cfg, out, seed, pretrained)
        if cfg.binding_warmup_steps > 0
        else None
    )
    return train_adapter(
        model, tokenizer, style, ds, train_samples, val_rows, cfg, out, seed=seed, score_rows=score_rows, callbacks=callbacks,
        init_adapter=warmed or pretrained,
        stages={"pretrain_adapter": _str(pretrained), "binding_warmup_adapter": _str(warmed)},
    )


def _str(path: Optional[Path]) -> Optional[str]:
    return str(path) if path is not None else None
