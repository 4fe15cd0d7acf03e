"""Merged model export (`rerank.export`, scripts/export_model.py): the merged folder ranks like the
adapter it came from, loads as a plain HF model, carries the adapter's prompt style, the run's config
and calibration; tied embeddings and the all-linear top-layer LoRA layout merge and round-trip
exactly; bad input stops with one line and leaves no folder."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import load_config, to_dict
from pipeline.errors import PipelineError
from rerank import export, load_run
from rerank.export import EXPORT_FILE, export_merged
from rerank.inference.ranker import rank_rows
from rerank.load_run import open_run
from rerank.model.adapter import add_lora, load_adapter, merge_lora, resolve_adapter_dir, save_adapter
from rerank.model.sources import load_from_config, load_model_and_tokenizer
from rerank.prompting.style import PromptStyle
from tests.helpers.scripts import REPO

N_ROWS = 4  # val users ranked per comparison: enough candidates (80 scores) to see any difference
ATOL = 1e-4  # merged vs adapter: the same sums in another order (fp32)
MIN_ADAPTER_EFFECT = 1e-3  # the adapter must move the scores by more than this, or the comparison proves nothing


def _copy_run(src: Path, dst: Path) -> Path:
    """The files an export reads (config, metrics, run.json, candidates, adapter): the session's smoke run is read-only."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "tb", "*.png"))
    return dst


def _scores(model, tokenizer, style, run) -> list[list[float]]:
    rows = run.covered_rows("val")[:N_ROWS]
    assert len(rows) == N_ROWS
    return rank_rows(model, tokenizer, style, rows, run.titles, batch_size=2, progress=False)


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return float(torch.tensor(a).sub(torch.tensor(b)).abs().max())


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """(run, DIR, the adapter's scores, the base model's scores) for the smoke run's trained adapter."""
    run = open_run(smoke_run[0])
    out = export_merged(run.path, tmp_path_factory.mktemp("export") / "merged")
    model, tokenizer, style = run.load_model()
    adapter = _scores(model, tokenizer, style, run)
    with model.disable_adapter():
        base = _scores(model, tokenizer, style, run)
    return run, out, adapter, base


def test_merged_folder_ranks_like_the_adapter(exported):
    run, out, adapter, base = exported
    assert _max_diff(adapter, base) > MIN_ADAPTER_EFFECT  # the trained adapter changes the scores
    model, tokenizer = load_model_and_tokenizer(str(out))
    assert not hasattr(model, "peft_config")  # a plain model: no LoRA layers left
    merged = _scores(model, tokenizer, PromptStyle.load(out), run)
    assert _max_diff(merged, adapter) < ATOL


def test_automodel_loads_the_folder_with_the_merged_weights_and_tied_embeddings(exported):
    run, out, _, _ = exported
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want = merge_lora(run.load_model()[0]).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # tiny-qwen2 ties lm_head to embed_tokens; the adapter (q_proj/v_proj) leaves them tied
    assert loaded.config.tie_word_embeddings is True
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_prompt_style_config_and_export_json(exported):
    run, out, _, _ = exported
    adapter_dir = resolve_adapter_dir(run.path)
    assert PromptStyle.load(out) == PromptStyle.load(adapter_dir)
    assert json.loads((out / "prompt_style.json").read_text()) == json.loads((adapter_dir / "prompt_style.json").read_text())

    cfg = load_config(out / "config.yaml")
    assert cfg.reranker.model == str(out) and Path(cfg.reranker.model).is_absolute()
    source = load_config(run.path / "config.yaml")
    assert to_dict(cfg) == to_dict(dataclasses.replace(source, reranker=dataclasses.replace(source.reranker, model=str(out))))

    info = json.loads((out / EXPORT_FILE).read_text())
    assert info["source_run"] == str(run.path.absolute()) and info["adapter"] == str(adapter_dir.absolute())
    assert info["base_model"] == "tiny-qwen2" and info["dtype"] == "float32" and info["tie_word_embeddings"] is True
    val = json.loads((run.path / "metrics.json").read_text())["val"]["calibration"]
    assert val["method"] == "permuted"  # the smoke config calibrates
    assert info["calibration"] == {"method": val["method"], "prior": val["prior"]}
    assert len(info["calibration"]["prior"]["20"]) == 20


def test_scripts_rank_with_the_merged_folder_as_reranker_model(exported):
    """What a script taking reranker.model does: --set reranker.model=DIR on the run's config, or the
    exported config.yaml as it is; both load through load_from_config and rank like the adapter."""
    run, out, adapter, _ = exported
    for cfg in (load_config(run.path / "config.yaml", [f"reranker.model={out}"]), load_config(out / "config.yaml")):
        model, tokenizer = load_from_config(cfg.reranker)
        assert _max_diff(_scores(model, tokenizer, PromptStyle.load(cfg.reranker.model), run), adapter) < ATOL


def test_calibration_is_none_for_an_uncalibrated_run(tmp_path, smoke_run):
    run = _copy_run(smoke_run[0], tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["val"].pop("calibration")
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert export.run_calibration(run) is None
    metrics["val"]["calibration"] = {"method": "none", "prior": {}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert export.run_calibration(run) is None


# ----------------------------------------------------------------------------------------
# LoRA layouts: all-linear in the top layers, and a LoRA on the tied output layer


LAYOUTS = {
    "all_linear_top_layer": {"lora_target_modules": "all-linear", "lora_layers": 1},
    "tied_lm_head": {"lora_target_modules": ["q_proj", "v_proj", "lm_head"], "lora_layers": None},
}


def _run_with_adapter(smoke: Path, dst: Path, layout: dict) -> Path:
    """A copy of the smoke run whose adapter is replaced by a LoRA of `layout` with seeded random
    B matrices (a fresh LoRA has B = 0, which a merge could not get wrong)."""
    run_dir = _copy_run(smoke, dst)
    run = open_run(run_dir)
    base, _ = load_from_config(run.cfg.reranker)
    peft_model = add_lora(base, dataclasses.replace(run.cfg.reranker, **layout), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(peft_model, PromptStyle.load(resolve_adapter_dir(run_dir)), run_dir / "adapter")
    return run_dir


@pytest.mark.filterwarnings("ignore:.*tied layer is part of the adapter:UserWarning")  # peft, on building the lm_head LoRA
@pytest.mark.filterwarnings("ignore:.*save_embedding_layers:UserWarning")  # peft, on saving it
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layouts_merge_save_and_load_exactly(layout, smoke_run, tmp_path):
    run_dir = _run_with_adapter(smoke_run[0], tmp_path / "run", LAYOUTS[layout])
    run = open_run(run_dir)
    out = export_merged(run_dir, tmp_path / "merged")

    model, tokenizer, style = run.load_model()
    adapter = _scores(model, tokenizer, style, run)
    with model.disable_adapter():
        base_scores = _scores(model, tokenizer, style, run)
    assert _max_diff(adapter, base_scores) > MIN_ADAPTER_EFFECT
    merged = merge_lora(model)
    base, _ = load_from_config(run.cfg.reranker)  # the untouched base weights

    loaded = AutoModelForCausalLM.from_pretrained(out)
    got, want = loaded.state_dict(), merged.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    loaded_model, loaded_tok = load_model_and_tokenizer(str(out))
    assert _max_diff(_scores(loaded_model, loaded_tok, PromptStyle.load(out), run), adapter) < ATOL

    base_sd = base.state_dict()
    changed = {k for k in want if not torch.equal(want[k], base_sd[k])}
    if layout == "all_linear_top_layer":
        # every linear layer of layer 1 (the top one of tiny-qwen2's 2) and nothing else
        attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        assert changed == {f"model.layers.1.self_attn.{n}.weight" for n in attn} | {f"model.layers.1.mlp.{n}.weight" for n in mlp}
        assert loaded.config.tie_word_embeddings is True
    else:
        # the LoRA changed lm_head only: the merge untied it, and the embeddings kept the base's values
        assert "lm_head.weight" in changed and "model.embed_tokens.weight" not in changed
        assert loaded.config.tie_word_embeddings is False
        assert json.loads((out / EXPORT_FILE).read_text())["tie_word_embeddings"] is False
        assert loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()


# ----------------------------------------------------------------------------------------
# A 4-bit run: merged into the dequantised NF4 weights it trained against, exported as full weights

NF4_STEP = 2.0 ** -5  # the stand-in's rounding grid: a merge into the unrounded weights differs by up to half of it


class FakeNF4Quantizer:
    """Stands in for transformers' bitsandbytes quantizer (NF4 needs CUDA): `dequantize` leaves each decoder
    linear weight rounded to a coarse grid (what NF4's round trip does) and the model unquantised, as
    transformers' `remove_quantization_config` does."""

    def dequantize(self, model, dtype=None):
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(rounded(module.weight))
        del model.hf_quantizer
        return model


def rounded(weight: torch.Tensor) -> torch.Tensor:
    return (weight / NF4_STEP).round() * NF4_STEP


def _4bit_run(smoke: Path, dst: Path) -> Path:
    """A copy of the smoke run whose config.yaml says it trained on a 4-bit base."""
    run_dir = _copy_run(smoke, dst)
    own = load_config(run_dir / "config.yaml")
    write = dataclasses.replace(own, reranker=dataclasses.replace(own.reranker, load_in_4bit=True))
    from pipeline.atomic import write_yaml

    write_yaml(run_dir / "config.yaml", to_dict(write))
    return run_dir


def test_a_4bit_run_merges_into_its_dequantised_base_and_exports_full_weights(tmp_path, smoke_run, monkeypatch):
    run_dir = _4bit_run(smoke_run[0], tmp_path / "run")
    loads = []

    def nf4_load(rcfg):
        """The NF4 load (on CUDA): the base flagged quantised, dequantised by FakeNF4Quantizer."""
        loads.append(rcfg.load_in_4bit)
        model, tokenizer = load_from_config(dataclasses.replace(rcfg, load_in_4bit=False))
        model.hf_quantizer, model.is_loaded_in_4bit = FakeNF4Quantizer(), True
        return model, tokenizer

    monkeypatch.setattr(load_run, "load_from_config", nf4_load)  # RerankerRun.load_model loads the base
    monkeypatch.setattr(export, "resolve_device", lambda device: "cuda")
    out = export_merged(run_dir, tmp_path / "merged")
    assert loads == [True]  # the base was loaded as it trained: NF4

    cfg = load_config(out / "config.yaml")
    assert cfg.reranker.load_in_4bit is False and cfg.reranker.model == str(out)  # full weights: never re-quantised
    assert json.loads((out / EXPORT_FILE).read_text())["base_weights"] == "nf4_dequantized"

    run = open_run(run_dir, ["reranker.load_in_4bit=false"])
    base, _ = load_from_config(run.cfg.reranker)
    original = merge_lora(load_adapter(copy.deepcopy(base), run_dir)).state_dict()
    FakeNF4Quantizer().dequantize(_flagged(base))
    want = merge_lora(load_adapter(base, run_dir)).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    q = "model.layers.0.self_attn.q_proj.weight"  # adapted (q_proj/v_proj): the delta sits on the rounded weight
    assert not torch.equal(got[q], original[q])


def _flagged(model):
    model.hf_quantizer = FakeNF4Quantizer()
    return model


def test_dequantized_needs_a_quantised_model():
    model, _ = load_model_and_tokenizer("tiny-qwen2")
    with pytest.raises(PipelineError, match="not loaded quantised"):
        export.dequantized(model)
    model.hf_quantizer, model.is_loaded_in_4bit = FakeNF4Quantizer(), True
    assert export.dequantized(model).is_loaded_in_4bit is False


# ----------------------------------------------------------------------------------------
# Bad input


def _script():
    """scripts/export_model.py as a module (scripts/ is no package), run in this process."""
    spec = importlib.util.spec_from_file_location("export_model_script", REPO / "scripts" / "export_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(capsys, args: list[str]) -> str:
    script = _script()
    with pytest.raises(SystemExit) as exit_info:
        script.run_main(script.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    return err[-1]


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder either


def test_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert "is not a run directory (no config.yaml)" in _fails(capsys, ["--run", str(tmp_path / "empty"), "--out", str(out)])
    _no_leftovers(out)


def test_run_without_adapter(tmp_path, capsys, smoke_run):
    run = tmp_path / "retriever_only"
    run.mkdir()
    shutil.copy(smoke_run[0] / "config.yaml", run / "config.yaml")
    out = tmp_path / "out"
    assert "no adapter_config.json" in _fails(capsys, ["--run", str(run), "--out", str(out)])
    _no_leftovers(out)


def test_out_not_empty_is_left_alone(tmp_path, capsys, smoke_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists and is not an empty folder" in _fails(capsys, ["--run", str(smoke_run[0]), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_config_flag_is_refused(tmp_path, capsys, smoke_run):
    out = tmp_path / "out"
    msg = _fails(capsys, ["--run", str(smoke_run[0]), "--out", str(out), "--config", "configs/experiments/smoke.yaml"])
    assert "drop --config" in msg
    _no_leftovers(out)


def test_another_base_than_the_trained_one_is_refused_before_loading(tmp_path, capsys, smoke_run):
    out = tmp_path / "out"
    msg = _fails(capsys, ["--run", str(smoke_run[0]), "--out", str(out), "--set", "reranker.load_in_4bit=true"])
    assert "drop --set reranker.load_in_4bit" in msg
    _no_leftovers(out)
    run_4bit = _4bit_run(smoke_run[0], tmp_path / "run")
    msg = _fails(capsys, ["--run", str(run_4bit), "--out", str(out), "--set", "reranker.load_in_4bit=false"])
    assert "drop --set reranker.load_in_4bit" in msg
    _no_leftovers(out)


def test_a_4bit_run_on_cpu_is_refused_before_loading(tmp_path, capsys, smoke_run):
    out = tmp_path / "out"
    msg = _fails(capsys, ["--run", str(_4bit_run(smoke_run[0], tmp_path / "run")), "--out", str(out), "--set", "reranker.device=cpu"])
    assert "needs a CUDA GPU" in msg and "NF4" in msg
    _no_leftovers(out)


def test_a_failure_while_writing_leaves_no_folder(tmp_path, smoke_run, monkeypatch):
    def broken(self, directory):
        raise PipelineError("disk full")

    monkeypatch.setattr(PromptStyle, "save", broken)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="disk full"):
        export_merged(smoke_run[0], out)
    _no_leftovers(out)
