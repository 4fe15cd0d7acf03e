"""Export a reranker run as one plain Hugging Face model folder: the LoRA adapter merged into the base.

The adapter is merged into the weights it was trained against: a 4-bit run's NF4 base, dequantised
(`dequantized`; a CUDA GPU loads it), not the original checkpoint's weights. A merged folder ranks without peft, loads with `AutoModelForCausalLM.from_pretrained(DIR)` and runs
one matmul per layer instead of base + low-rank. `export_merged(RUN, DIR)` writes, all at once
(built in a temporary folder and renamed, so a failure leaves no DIR):

- the merged weights + config.json + generation_config.json (save_pretrained), and the tokenizer;
- prompt_style.json: the adapter's prompt format, unchanged;
- readout.safetensors (reranker.head readout): the trained readout unit (`rerank.model.readout`);
- config.yaml: RUN/config.yaml with reranker.model = DIR's absolute path, so every script that takes
  reranker.model (or --set reranker.model=DIR) ranks with it and a server finds the run's dataset, and
  reranker.load_in_4bit false: the folder holds full weights, which an NF4 load would re-quantise, rounding
  the merged LoRA update away;
- export.json: where it came from (run, adapter, base model, git commits) and, for a calibrated run,
  RUN/metrics.json's val calibration {method, prior}, so serving subtracts the same position prior.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from peft import PeftModel
from transformers import PreTrainedModel

from pipeline.atomic import atomic_dir, write_json, write_yaml
from pipeline.config import RerankerConfig, load_config, to_dict
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON, RUN_JSON
from pipeline.rundir import git_commit
from rerank.load_run import RerankerRun, open_run
from rerank.model.adapter import merge_lora, resolve_adapter_dir
from rerank.model.readout import READOUT_MODULE, has_readout, save_readout_unit
from rerank.prompting.style import PromptStyle

EXPORT_FILE = "export.json"


def export_merged(run_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Merge RUN's adapter into its base model and write the folder described above to `out`
    (a new or empty folder); returns its absolute path. `overrides` (--set) change how the base is
    loaded for the merge (reranker.device, reranker.dtype), not the config.yaml written."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"--out {out} already exists and is not an empty folder: pass a new folder for the export")
    run = open_run(run_dir, overrides)
    config = load_config(run.path / CONFIG_YAML)  # the run's own, without the load-time overrides
    check_trained_base(config.reranker, run.cfg.reranker)
    peft_model, tokenizer, style = load_trained(run)
    merged = merge_lora(peft_model)
    info = export_info(run, merged)
    config = dataclasses.replace(config, reranker=dataclasses.replace(config.reranker, model=str(out), load_in_4bit=False))
    with atomic_dir(out) as tmp:
        save_merged(merged, tmp)
        tokenizer.save_pretrained(tmp)
        style.save(tmp)
        write_yaml(tmp / CONFIG_YAML, to_dict(config))
        write_json(tmp / EXPORT_FILE, info)
    return out


def check_trained_base(own: RerankerConfig, load: RerankerConfig) -> None:
    """Before any loading: the merge's base is the one the run trained on (`own`), which `load` (with
    the --set overrides) can move to another device or dtype but not to other weights."""
    if load.load_in_4bit != own.load_in_4bit:
        raise PipelineError(
            f"the run trained on a {'4-bit' if own.load_in_4bit else 'full-weight'} base and its adapter merges into that one: "
            "drop --set reranker.load_in_4bit (the merged folder holds full weights either way)"
        )
    if own.load_in_4bit and resolve_device(load.device) == "cpu":
        raise PipelineError(
            "exporting a 4-bit run needs a CUDA GPU: its adapter merges into the NF4 weights it was trained against, "
            "which bitsandbytes builds on CUDA; run the export on a GPU machine"
        )


def load_trained(run: RerankerRun) -> tuple[PeftModel, Any, PromptStyle]:
    """(base + the adapter, tokenizer, prompt style) as RerankerRun.load_model, with a 4-bit run's NF4 base
    dequantised before the adapter goes on: peft then merges into plain layers (a bitsandbytes LoRA layer's
    merge re-quantises its sum)."""
    return run.load_model(dequantized) if run.cfg.reranker.load_in_4bit else run.load_model()


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """`model`, loaded in NF4, with each 4-bit linear layer replaced by a plain one holding its dequantised
    weight in the load dtype (transformers' PreTrainedModel.dequantize, its QLoRA-merge path): the weights
    every training forward pass computed with. The original checkpoint's differ from them by NF4's
    rounding, which the adapter was trained around."""
    if getattr(model, "hf_quantizer", None) is None:
        raise PipelineError(f"{type(model).__name__} was not loaded quantised (no hf_quantizer): load the run's base with reranker.load_in_4bit=true")
    model = model.dequantize()
    model.is_loaded_in_4bit = False  # transformers leaves the flag, which sends peft and num_parameters looking for bitsandbytes layers
    return model


def save_merged(merged: PreTrainedModel, directory: Path) -> None:
    """save_pretrained of the merged model; a readout unit (reranker.head readout) goes to its own
    file (readout.safetensors), which from_pretrained does not know and `load_model_and_tokenizer` attaches."""
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
        "base_weights": "nf4_dequantized" if run.cfg.reranker.load_in_4bit else "original",
        "git_commit": git_commit(),  # the code that merged
        "source_git_commit": _read_json(run.path / RUN_JSON).get("git_commit"),  # the code that trained
        "tie_word_embeddings": bool(getattr(merged.config, "tie_word_embeddings", False)),
        "calibration": run_calibration(run.path),
    }


def run_calibration(run_dir: Path) -> Optional[dict[str, Any]]:
    """RUN/metrics.json's val calibration {method, prior} (the prior estimated on validation and
    subtracted from every ranking), or None when the run is not calibrated."""
    section = _read_json(run_dir / METRICS_JSON).get("val", {}).get("calibration")
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
