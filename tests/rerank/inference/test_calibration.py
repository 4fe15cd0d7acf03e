"""Position-prior calibration (`rerank.inference.calibration`) and its place in a run (`rerank.run`
rank_splits: prior from val only, rankings/metrics fields, resume to the same bytes)."""
from __future__ import annotations

import random

import pytest

from pipeline.candidates import read_rows
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank import run as run_module
from rerank.inference import calibration
from rerank.inference.calibration import calibrate, centred, estimate_prior, prior_from_slot_scores, slot_offsets
from rerank.inference.ranker import average_orders, candidate_orders

K = 5
BIAS = [6.0, 3.0, 1.5, 0.5, 0.0]  # planted slot prior: slot 0 ("A") strongly preferred
ITEMS = [f"i{j}" for j in range(K)]


def make_rows(prefix: str, n: int, seed: int) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """n covered users, K candidates each; content = a random permutation of 0..K-1 (distinct, gaps
    of 1), target = the best-content candidate; retriever scores descending in candidates order."""
    rng = random.Random(seed)
    rows, content = [], {}
    for u in range(n):
        user = f"{prefix}{u}"
        cands = ITEMS[:]
        rng.shuffle(cands)
        values = list(range(K))
        rng.shuffle(values)
        content[user] = {c: float(v) for c, v in zip(cands, values)}
        target = max(cands, key=lambda c: content[user][c])
        rows.append({"user": user, "history": ["i0"], "candidates": cands, "scores": [float(K - j) for j in range(K)], "target": target})
    return rows, content


class StubScorer:
    """ranker.score_orders' contract with slot scores = content[user][candidate] + BIAS[slot]
    (content 0 for unknown users/items, e.g. the content-free prompt). Records the users scored."""

    def __init__(self, content: dict[str, dict[str, float]], bias=BIAS):
        self.content, self.bias, self.users = content, bias, []

    def __call__(self, model, tokenizer, style, rows, titles, batch_size=16, permutations=1, seed=0, progress=True):
        out = []
        for row in rows:
            self.users.append(row["user"])
            c = self.content.get(row["user"], {})
            cands = row["candidates"]
            out.append([
                (order, [c.get(cands[j], 0.0) + self.bias[slot] for slot, j in enumerate(order)])
                for order in candidate_orders(len(cands), permutations, seed, str(row["user"]))
            ])
        return out


def content_order(content: dict[str, float], cands: list[str]) -> list[str]:
    return sorted(cands, key=lambda c: -content[c])


def score_order(scores: list[float], cands: list[str]) -> list[str]:
    return [cands[j] for j in sorted(range(len(cands)), key=lambda j: (-scores[j], j))]


def raw_rankings(rows, scorer, permutations, seed):
    """The ranker's averaged raw scores (rank_rows = score_orders + average_orders) under the stub."""
    per_order = scorer(None, None, None, rows, {}, permutations=permutations, seed=seed)
    scores = average_orders(rows, per_order, permutations)
    return [{**row, "scores": s, "label_scheme": "letters"} for row, s in zip(rows, scores)]


def test_centred_and_prior_per_candidate_count():
    assert centred([1.0, 2.0, 6.0]) == [-2.0, -1.0, 3.0]
    prior = prior_from_slot_scores([[1.0, 2.0, 6.0], [3.0, 2.0, 1.0], [0.0, 1.0]])
    assert prior == {2: [-0.5, 0.5], 3: [-0.5, -0.5, 1.0]}  # ([-2,-1,3] + [1,0,-1]) / 2


@pytest.mark.parametrize("permutations", [1, 3])
def test_permuted_prior_removes_a_planted_prior(monkeypatch, permutations):
    val, val_content = make_rows("v", 300, seed=1)
    test, test_content = make_rows("t", 60, seed=2)
    scorer = StubScorer({**val_content, **test_content})
    monkeypatch.setattr(calibration, "score_orders", scorer)
    cfg = load_config(None, ["reranker.calibration=permuted", "reranker.calibration_users=null", "reranker.calibration_orders=4"]).reranker
    prior = estimate_prior("permuted", None, None, None, val, {}, cfg, seed=3)
    assert set(scorer.users) <= {r["user"] for r in val} and len(scorer.users) == 300 * 4  # val only, identity dropped
    # The planted bias up to a constant (the content averages out over the shuffles).
    assert list(prior) == [K] and sum(prior[K]) == pytest.approx(0.0, abs=1e-9)
    assert prior[K] == pytest.approx(centred(BIAS), abs=0.25)

    raw = raw_rankings(test, scorer, permutations, seed=3)
    # Uncalibrated, the prior wins: the rankings are not the content's.
    wrong = sum(score_order(rk["scores"], rk["candidates"]) != content_order(test_content[rk["user"]], rk["candidates"]) for rk in raw)
    assert wrong > len(test) // 2
    for rk, cal in zip(raw, calibrate(raw, prior, permutations, seed=3)):
        assert score_order(cal, rk["candidates"]) == content_order(test_content[rk["user"]], rk["candidates"])


def test_content_free_prior_is_the_planted_prior_exactly(monkeypatch):
    test, content = make_rows("t", 20, seed=4)
    scorer = StubScorer(content)
    monkeypatch.setattr(calibration, "score_orders", scorer)
    cfg = load_config(None, ["reranker.calibration=content_free"]).reranker
    prior = estimate_prior("content_free", None, None, None, [], {}, cfg, seed=0, ks=[K, K, 3])
    assert scorer.users == ["content-free-3", "content-free-5"]  # one prompt per candidate count
    assert prior == {3: pytest.approx(centred(BIAS[:3])), K: pytest.approx(centred(BIAS))}
    raw = raw_rankings(test, scorer, 1, seed=0)
    for rk, cal in zip(raw, calibrate(raw, prior, 1, seed=0)):
        assert cal == pytest.approx([content[rk["user"]][c] + sum(BIAS) / K for c in rk["candidates"]])
    assert estimate_prior("none", None, None, None, [], {}, cfg, seed=0) == {}


def test_offsets_equal_calibrating_every_order():
    """average_orders is linear: raw - slot_offsets == the average of the calibrated orders."""
    rows, content = make_rows("u", 5, seed=5)
    prior = {K: centred([0.3, -1.0, 2.0, 0.1, 4.0])}
    per_order = StubScorer(content)(None, None, None, rows, {}, permutations=4, seed=9)
    calibrated_orders = [[(o, [s - prior[K][slot] for slot, s in enumerate(ss)]) for o, ss in pairs] for pairs in per_order]
    expected = average_orders(rows, calibrated_orders, 4)
    raw = [{**r, "scores": s} for r, s in zip(rows, average_orders(rows, per_order, 4))]
    assert calibrate(raw, prior, 4, seed=9) == [pytest.approx(e) for e in expected]
    assert slot_offsets(3, [1.0, 0.0, -1.0], 1, 0, "u") == [1.0, 0.0, -1.0]  # one order: the prior itself
    with pytest.raises(PipelineError, match="no validation prompt with 5 candidates"):
        calibrate(raw, {3: [0.0, 0.0, 0.0]}, 4, seed=9)


def test_calibration_config_is_validated():
    for key, value in (("calibration", "bogus"), ("calibration_users", "0"), ("calibration_orders", "0"), ("fusion_weights", "[]")):
        with pytest.raises(PipelineError, match=key):
            load_config(None, [f"reranker.{key}={value}"])


def test_real_model_prior_shapes():
    from rerank.model.sources import load_model_and_tokenizer
    from rerank.model.standins import TINY_QWEN2
    from rerank.prompting.labels import LETTERS
    from rerank.prompting.style import make_style
    from tests.helpers.rows import ITEMS as TITLES
    from tests.helpers.rows import ROWS
    from tests.helpers.tokenizers import CACHE_DIR

    model, tok = load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)
    style = make_style(tok, LETTERS)
    cfg = load_config(None, ["reranker.calibration_users=2", "reranker.calibration_orders=2"]).reranker
    for method in ("permuted", "content_free"):
        prior = estimate_prior(method, model, tok, style, ROWS, TITLES, cfg, seed=0, ks=[5])
        assert list(prior) == [5] and sum(prior[5]) == pytest.approx(0.0, abs=1e-5)
        assert any(abs(p) > 1e-6 for p in prior[5])  # a random model has some slot preference


# ----------------------------------------------------------------------------------------
# In a run: rank_splits with a stub ranker


class FakeModel:
    def eval(self):
        return self


class FakeStyle:
    class scheme:
        name = "letters"


def stub_rank_split(scorer, calls):
    def rank_split(model, tokenizer, style, rows, titles, cfg, seed=0, progress=True, partial=None, split=""):
        covered = [r for r in rows if r["target"] in r["candidates"]]
        calls.append([r["user"] for r in covered])
        return raw_rankings(covered, scorer, cfg.rank_permutations, seed)

    return rank_split


def test_rank_splits_calibrates_with_val_fuses_and_resumes_to_the_same_bytes(monkeypatch, tmp_path):
    val, val_content = make_rows("v", 80, seed=6)
    test, test_content = make_rows("t", 40, seed=7)
    val.append({**val[0], "user": "v-uncovered", "target": "i-missing"})  # never ranked
    scorer = StubScorer({**val_content, **test_content})
    calls: list = []
    monkeypatch.setattr(calibration, "score_orders", scorer)
    monkeypatch.setattr(run_module, "rank_split", stub_rank_split(scorer, calls))
    cfg = load_config(None, [
        "reranker.calibration=permuted", "reranker.calibration_users=30", "reranker.rank_permutations=2",
        "reranker.fusion=true",
    ])
    rows = {"val": val, "test": test}
    out = RunDir(tmp_path / "run").start(cfg)
    metrics = run_module.rank_splits(cfg, out, FakeModel(), None, FakeStyle, rows, {}, tmp_path / "no-retriever-run", resume=False)

    val_users = {r["user"] for r in val}
    prior_users = scorer.users[len(val) - 1 + len(test):]  # after the two splits' ranking
    assert len(prior_users) == 30 * 2 and set(prior_users) <= val_users  # never a test user
    for split in ("val", "test"):
        sec = metrics[split]
        for key in ("retriever", "retriever_subset", "subset", "overall", "coverage", "n_users", "n_covered",
                    "llm_subset", "llm_overall", "llm_raw_subset", "fusion", "calibration", "llm_top1_slots",
                    "llm_raw_top1_slots", "llm_top1_hit_non_top1", "bootstrap"):
            assert key in sec, (split, key)
        assert sec["calibration"]["method"] == "permuted" and list(sec["calibration"]["prior"]) == ["5"]
        assert sec["fusion"] == metrics["val"]["fusion"]  # one w, fitted on val
        assert sum(sec["llm_top1_slots"]["counts"]) == sec["n_covered"] == sec["llm_top1_slots"]["n"]
        # The planted prior puts the raw top-1 in slot 0 most of the time; calibration spreads it out.
        assert sec["llm_raw_top1_slots"]["max_share"] > sec["llm_top1_slots"]["max_share"]
        # Calibrated content ranks the (best-content) target first for every user.
        assert sec["llm_subset"]["Recall@1"] == 1.0 and sec["llm_raw_subset"]["Recall@1"] < 1.0
        assert sec["llm_top1_hit_non_top1"]["share"] == 1.0
        ranks = read_rows(tmp_path / "run" / f"rankings_{split}.jsonl")
        assert [set(r) for r in ranks[:1]] == [{"user", "history", "candidates", "scores", "target", "llm_scores", "llm_raw_scores", "label_scheme"}]
    # The retriever order carries no signal here, so fusion keeps w = 0 on val.
    assert metrics["val"]["fusion"]["w"] == 0.0 and set(metrics["val"]["fusion"]["grid"]) == {str(float(w)) for w in cfg.reranker.fusion_weights}
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "| LLM raw (subset) |" in md and "| LLM calibrated (subset) |" in md and "Paired bootstrap" in md
    assert (tmp_path / "run" / "top1_slots_val.png").is_file() and (tmp_path / "run" / "top1_slots_test.png").is_file()

    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("rankings_val.jsonl", "rankings_test.jsonl", "metrics.json", "metrics.md")}
    # --resume with both files kept: no ranking, the raw scores come back from llm_raw_scores, the
    # post-processing gives the same bytes. Then with one split missing: only it is ranked.
    calls.clear()
    (tmp_path / "run" / "metrics.json").unlink()
    run_module.rank_splits(cfg, out, FakeModel(), None, FakeStyle, rows, {}, tmp_path / "x", resume=True)
    assert calls == []
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files
    (tmp_path / "run" / "rankings_test.jsonl").unlink()
    run_module.rank_splits(cfg, out, FakeModel(), None, FakeStyle, rows, {}, tmp_path / "x", resume=True)
    assert calls == [[r["user"] for r in test]]
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files


def test_kept_rankings_give_back_the_raw_scores(tmp_path):
    base = {"user": "u", "history": [], "candidates": ["a", "b"], "target": "a", "label_scheme": "letters"}
    for row, raw in (
        ({**base, "scores": [9.0, 8.0], "llm_scores": [1.0, 2.0], "llm_raw_scores": [3.0, 4.0]}, [3.0, 4.0]),
        ({**base, "scores": [9.0, 8.0], "llm_scores": [1.0, 2.0]}, [1.0, 2.0]),
        ({**base, "scores": [9.0, 8.0]}, [9.0, 8.0]),
    ):
        assert run_module.raw_rankings([row], tmp_path / "r.jsonl") == [{**base, "scores": raw}]
    with pytest.raises(PipelineError, match="no raw scores"):
        run_module.raw_rankings([{**base, "scores": [1.0, 2.0], "llm_raw_scores": [1.0]}], tmp_path / "r.jsonl")
