"""The state probe (`analysis.state_probe`, scripts/probe_states.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from analysis.state_probe import fit_probe, line_end_states, probe_scores, split_by_coverage, summary
from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank.prompting.labels import LETTERS
from rerank.prompting.prompts import encode_prompt_ends
from rerank.prompting.style import make_style
from rerank.training.samples import TrainSample
from tests.helpers.scripts import ONE_THREAD, REPO, run_script
from tests.helpers.tokenizers import titles
from tests.helpers.training import fresh_model, tok

CONFIGS = REPO / "configs" / "experiments"


def test_states_are_the_last_hidden_state_at_each_line_end():
    """Batched, left-padded states equal, per candidate, a forward over the prompt cut right after its line."""
    model = fresh_model().eval()
    style = make_style(tok(), LETTERS, max_history=4)
    prompts = [(titles(n, "h "), titles(5, f"c{n} ")) for n in (1, 4, 2)]
    got = line_end_states(model, tok(), style, prompts, batch_size=2)
    assert got.shape == (3, 5, model.config.hidden_size)
    with torch.no_grad():
        for (h, c), states in zip(prompts, got):
            ids, ends = encode_prompt_ends(h, c, tok(), style)
            for e, state in zip(ends, states):
                want = model.get_decoder()(input_ids=torch.tensor([ids[: e + 1]])).last_hidden_state[0, -1]
                assert np.allclose(state, want.numpy(), atol=1e-4)


def _planted(n: int, k: int, d: int, signal: float, seed: int):
    """States of n prompts with k candidates: noise, plus `signal` along one axis at the target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k, d)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    x[np.arange(n), y, 0] += signal
    return x, y.tolist()


def test_the_probe_finds_a_planted_direction_and_nothing_in_noise():
    x, y = _planted(300, 6, 16, signal=4.0, seed=0)
    probe = fit_probe(x, y, weight_decay=1e-3, steps=300)
    tx, ty = _planted(200, 6, 16, signal=4.0, seed=1)
    found = summary(probe_scores(probe, tx), ty)
    assert found["n"] == 200 and found["Recall@1"]["mean"] > 0.9 and found["NDCG@10"]["ci_low"] > 0  # the interval of the difference from chance
    assert found["Recall@1"]["chance"] == pytest.approx(1 / 6)
    nx, ny = _planted(200, 6, 16, signal=0.0, seed=3)
    noise = summary(probe_scores(fit_probe(*_planted(300, 6, 16, 0.0, 2), 1e-3, 300), nx), ny)
    assert noise["Recall@1"]["mean"] < 0.35 and not noise["NDCG@10"]["excludes_zero"]
    # a hand-made case: the targets rank 1st, 2nd and 3rd (a tie goes to the earlier slot, the target here)
    s = np.array([[3.0, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 2]])
    assert summary(s, [0, 2, 0])["Recall@1"]["mean"] == pytest.approx(1 / 3)
    assert summary(s, [0, 2, 0])["NDCG@10"]["mean"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(4)) / 3)


def test_the_probe_config_is_the_default_recipe():
    probe = yaml.safe_load((CONFIGS / "probe.yaml").read_text())
    default = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert {k: v for k, v in probe.items() if k != "probe"} == default
    assert load_config(CONFIGS / "probe.yaml").probe.n_prompts == 1200
    for bad in ("probe.held_out=1.0", "probe.n_prompts=0", "probe.weight_decay=-1", "probe.val_max_users=0"):
        with pytest.raises(PipelineError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_script_on_the_smoke_run(smoke_run, tmp_path):
    run, _ = smoke_run
    out = tmp_path / "probe"
    proc = run_script(
        "scripts/probe_states.py", "--config", "configs/experiments/smoke.yaml", "--out", str(out),
        "--set", f"retriever_run={run}", "--set", "reranker.train_negatives=retriever",
        "--set", "probe.n_prompts=24", "--set", "probe.steps=20", env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    fit = result["fits"]["all"]
    assert result["n_prompts"] == 24 and fit["n_fitted"] + fit["held_out"]["n"] == 24
    # the smoke retriever wrote no per-prefix lists to judge coverage by
    assert list(result["fits"]) == ["all"] and "held_out_covered" not in fit
    covered = [r for r in map(json.loads, (run / "candidates_val.jsonl").read_text().splitlines()) if r["target"] in r["candidates"]]
    assert fit["val_shuffled"]["n"] == len(covered)
    assert "covered val users, shuffled order" in (out / "probe.md").read_text() and "State probe" in proc.stdout


def test_held_out_prompts_split_by_whether_the_retriever_listed_their_target():
    samples = [TrainSample(user=u, position=t, history=(1,), candidates=(5, 6, 7), target_index=j)
               for u, t, j in [(0, 1, 0), (0, 2, 1), (1, 1, 2), (1, 3, 0)]]
    listed = {(0, 1): {5, 9}, (0, 2): {5, 7}, (1, 1): {7}}  # (1, 3) has no list: uncovered
    assert split_by_coverage(samples, [0, 1, 2, 3], listed) == ([0, 2], [1, 3])
    assert split_by_coverage(samples, [1, 2], listed) == ([2], [1])
