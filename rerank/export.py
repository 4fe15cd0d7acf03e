"""Export a reranker run as one plain Hugging Face model folder: the LoRA adapter merged into the base.

A merged folder ranks without peft, loads with `AutoModelForCausalLM.from_pretrained(DIR)` and runs
one matmul per layer instead of base + low-rank. `export_merged(RUN, DIR)` writes, all at once
(built in a temporary folder and renamed, so a failure leaves no DIR):

- the merged weights + config.json + generation_config.json (save_pretrained), and the tokenizer;
- prompt_style.json: the adapter's prompt format, unchanged;
- readout.safetensors (reranker.head readout): the trained readout unit (rerank/readout.py);
- config.yaml: RUN/config.yaml with reranker.model = DIR's absolute path, so every script that takes
  reranker.model (or --set reranker.model=DIR) ranks with it and a server finds the run's dataset;
- export.json: where it came from (run, adapter, base model, git commits) and, for a calibrated run,
  RUN/metrics.json's val calibration {method, prior}, so serving subtracts the same position prior.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from pipeline.atomic import atomic_dir, write_json, write_yaml
from pipeline.config import load_config, to_dict
from pipeline.errors import PipelineError
from pipeline.rundir import _git_commit
from rerank.load_run import RerankerRun, open_run
from rerank.readout import READOUT_MODULE, has_readout, save_readout_unit
from rerank.train import resolve_adapter_dir

EXPORT_FILE = "export.json"


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


def export_merged(run_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Merge RUN's adapter into its base model and write the folder described above to `out`
    (a new or empty folder); returns its absolute path. `overrides` (--set) change how the base is
    loaded for the merge (reranker.device, reranker.dtype), not the config.yaml written."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"--out {out} already exists and is not an empty folder: pass a new folder for the export")
    run = open_run(run_dir, overrides)
    if run.cfg.reranker.load_in_4bit:
        # Merging into NF4 weights re-quantises them, which loses most of the LoRA update.
        raise PipelineError("cannot merge LoRA into a 4-bit base: add --set reranker.load_in_4bit=false (the merged folder holds full weights)")
    peft_model, tokenizer, style = run.load_model()
    merged = merge_lora(peft_model)
    info = export_info(run, merged)
    config = load_config(run.path / "config.yaml")  # the run's own, without the load-time overrides
    config = dataclasses.replace(config, reranker=dataclasses.replace(config.reranker, model=str(out)))
    with atomic_dir(out) as tmp:
        save_merged(merged, tmp)
        tokenizer.save_pretrained(tmp)
        style.save(tmp)
        write_yaml(tmp / "config.yaml", to_dict(config))
        write_json(tmp / EXPORT_FILE, info)
    return out


def save_merged(merged: PreTrainedModel, directory: Path) -> None:
    """save_pretrained of the merged model; a readout unit (reranker.head readout) goes to its own
    file (readout.safetensors), which from_pretrained does not know and rerank.models attaches."""
    if not has_readout(merged):
        merged.save_pretrained(directory)
        return
    unit = getattr(merged, READOUT_MODULE)
    delattr(merged, READOUT_MODULE)
    try:
        merged.save_pretrained(directory)
    finally:
        setattr(merged, READOUT_MODULE, unit)
    save_readout_unit(merged, directory)


def export_info(run: RerankerRun, merged: PreTrainedModel) -> dict[str, Any]:
    """export.json's content: provenance, the weights' dtype, and the calibration serving needs."""
    return {
        "source_run": str(run.path.absolute()),
        "adapter": str(resolve_adapter_dir(run.path).absolute()),
        "base_model": run.cfg.reranker.model,
        "dtype": str(next(merged.parameters()).dtype).replace("torch.", ""),
        "git_commit": _git_commit(),  # the code that merged
        "source_git_commit": _read_json(run.path / "run.json").get("git_commit"),  # the code that trained
        "tie_word_embeddings": bool(getattr(merged.config, "tie_word_embeddings", False)),
        "calibration": run_calibration(run.path),
    }


def run_calibration(run_dir: Path) -> Optional[dict[str, Any]]:
    """RUN/metrics.json's val calibration {method, prior} (the prior estimated on validation and
    subtracted from every ranking), or None when the run is not calibrated."""
    section = _read_json(run_dir / "metrics.json").get("val", {}).get("calibration")
    if not section or section.get("method", "none") == "none":
        return None
    return {"method": section["method"], "prior": section["prior"]}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e.msg}): the run directory is damaged, rerun it") from None
