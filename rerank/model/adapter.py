"""The LoRA adapter: its config, adding it to a base (QLoRA preparation included), saving, loading, merging."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    PreTrainedModel,
    set_seed,
)

from pipeline.atomic import atomic_dir
from pipeline.config import RerankerConfig
from pipeline.errors import PipelineError
from pipeline.run_files import ADAPTER_DIR
from rerank.model.readout import READOUT_MODULE, adapter_has_readout, attach_readout, has_readout
from rerank.prompting.style import PromptStyle


def lora_config(cfg: RerankerConfig, n_layers: Optional[int] = None) -> LoraConfig:
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


def add_lora(model: PreTrainedModel, cfg: RerankerConfig, seed: int, init_adapter: Optional[Path] = None) -> PeftModel:
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


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """The base model with the LoRA deltas added into its weights (peft's merge_and_unload; works in
    place: pass a deepcopy to keep `model`). Weights tied to another layer that the adapter changes
    are untied first (see `_untie_adapted_weights`), so the merged model computes what the adapter did."""
    untied = _untie_adapted_weights(model)
    with warnings.catch_warnings():
        if untied:  # peft's warnings about tied adapted layers: handled by the untying
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*no longer tied.*", category=UserWarning)
        merged = model.merge_and_unload()
    if untied:
        merged.config.tie_word_embeddings = False  # else from_pretrained would tie them back together
    return merged


def _untie_adapted_weights(model: PeftModel) -> list[str]:
    """Merging adds a layer's LoRA delta to its base weight in place. A weight shared with another
    layer (lm_head tied to embed_tokens, tie_word_embeddings) would then change both, while the
    adapter changed one: peft only warns, and the logits come out wrong. Give each such adapted
    layer its own copy of the weight; returns the names of the layers untied."""
    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    untied = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is not None and uses[weight.data_ptr()] > 1:
            base.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(name)
    return untied
