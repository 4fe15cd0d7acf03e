"""Every YAML under configs/ loads into the typed config, and its header gives the command."""

import pytest

from pipeline.config import Config, load_config, variant_config
from tests.helpers.scripts import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "default.yaml", "lrurec_ml-100k.yaml", "sasrec_ml-100k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads_and_header_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for name in cfg.analysis.variants or {}:  # a comparison's variants validate at load too, not mid-run
        assert isinstance(variant_config(cfg, name), Config)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    rel = path.relative_to(path.parents[2]).as_posix()
    assert any("python scripts/" in line and f"--config {rel}" in line for line in header), f"{rel}: header lacks its command"


def test_exponent_without_a_dot_is_a_number_and_words_are_not():
    # PyYAML reads "1e-3" as a string (YAML 1.1 wants "1.0e-3"); a researcher typing it means the number.
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    assert load_config(None, ["reranker.learning_rate=1e-3"]).reranker.learning_rate == 0.001
    assert load_config(None, ["reranker.lora_target_modules=all-linear"]).reranker.lora_target_modules == "all-linear"
    with pytest.raises(PipelineError, match="reranker.learning_rate must be a number"):
        load_config(None, ["reranker.learning_rate=fast"])
    with pytest.raises(PipelineError, match="lora_target_modules"):
        load_config(None, ["reranker.lora_target_modules=every-linear"])


def test_cpu_long_is_the_default_recipe_with_a_larger_budget():
    """cpu_long.yaml is "the default recipe with more of the CPU": a drift in the head, the lines'
    attention or the training prompts would make it measure another recipe than the main job's."""
    from pipeline.config import to_dict

    experiments = REPO / "configs" / "experiments"
    default, long = (to_dict(load_config(experiments / f"{n}.yaml")) for n in ("default", "cpu_long"))
    for section in ("data", "retriever"):
        assert long[section] == default[section], section
    changed = {k: v for k, v in long["reranker"].items() if default["reranker"][k] != v}
    assert changed == {
        "max_train_samples": 800, "train_batch_size": 8, "learning_rate": 1.0e-3, "logging_steps": 10,
        "eval_steps": 34, "patience": 5, "val_max_users": 64, "calibration_users": 64,
    }
