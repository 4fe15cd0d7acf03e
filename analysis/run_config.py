"""The config of an analysis over one trained reranker run (generation baseline, position bias).

The model, prompts, data and seed always come from the run's own config.yaml (plus --set overrides,
e.g. reranker.device=cpu); a --config only supplies the `analysis:` section, and it must describe
the same run, or the analysis would silently measure settings the adapter was not trained with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from pipeline.config import Config, load_config, to_dict
from pipeline.errors import PipelineError
from rerank.load_run import RerankerRun

# What decides the numbers measured; a --config that disagrees on any of these describes another run.
SAME_AS_RUN = ("seed", "data", "reranker.model", "reranker.label_scheme", "reranker.custom_labels")


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattened config: dotted key -> value."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def analysis_config(run: RerankerRun, config_path: Optional[str], overrides: Sequence[str]) -> Config:
    """`run.cfg` with the analysis section of `config_path` (none: the run's own); refuses a
    --config whose SAME_AS_RUN keys differ from the run's."""
    if not config_path:
        return run.cfg
    given = load_config(config_path, list(overrides))
    mine, theirs = _leaves(to_dict(given)), _leaves(to_dict(run.cfg))
    for key in sorted(set(mine) | set(theirs)):
        if any(key == k or key.startswith(k + ".") for k in SAME_AS_RUN) and mine.get(key) != theirs.get(key):
            raise PipelineError(
                f"--config {config_path} sets {key} = {mine.get(key)!r} but run {run.path} was made with "
                f"{theirs.get(key)!r}: pass the run's own config (or none) or a matching one"
            )
    return dataclasses.replace(run.cfg, analysis=given.analysis)
