"""The learnability check (`rerank.overfit`, scripts/overfit_check.py)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from rerank.overfit import check_config, check_mode, item_only_top1, sample_rows, top1_accuracy, write_result
from rerank.prompting.labels import LETTERS
from rerank.prompting.style import make_style
from rerank.training.samples import TrainSample
from tests.helpers.scripts import REPO
from tests.helpers.training import cfg, fresh_model, tok

CONFIGS = REPO / "configs" / "experiments"


def test_the_check_config_is_the_default_recipe():
    """overfit.yaml must check the recipe the README's main job trains: the same data, retriever and
    reranker sections as default.yaml (a copy that drifts would check another model)."""
    check = yaml.safe_load((CONFIGS / "overfit.yaml").read_text())
    default = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert {k: v for k, v in check.items() if k != "overfit"} == default
    loaded = load_config(CONFIGS / "overfit.yaml")
    assert (loaded.overfit.n_prompts, loaded.overfit.epochs, loaded.overfit.modes) == (32, 12, ["redrawn", "fixed"])
    redrawn, fixed = check_config(loaded, "redrawn").reranker, check_config(loaded, "fixed").reranker
    assert redrawn.reshuffle_each_epoch and not fixed.reshuffle_each_epoch
    assert redrawn.max_train_samples == 32 and redrawn.num_epochs == 12 and redrawn.logging_steps == 1


def test_the_letters_check_is_the_check_with_the_binding_levers():
    """overfit_letters.yaml is overfit.yaml with only the letters head's levers changed: a drifting copy
    would measure another recipe than the header's figures say."""
    letters = yaml.safe_load((CONFIGS / "overfit_letters.yaml").read_text())
    check = yaml.safe_load((CONFIGS / "overfit.yaml").read_text())
    assert {k: v for k, v in letters.items() if k not in ("reranker", "overfit")} == {k: v for k, v in check.items() if k not in ("reranker", "overfit")}
    changed = {k: v for k, v in letters["reranker"].items() if check["reranker"].get(k) != v}
    assert changed == {
        "head": "label_tokens", "label_position": "after", "readout_aux_weight": 1.0, "readout_aux_layer": 18,
        "binding_mix_epochs": 6, "lora_layers": 16, "train_batch_size": 1, "train_negatives": "mix",
        "learning_rate": 1.0e-3,
    }
    assert set(check["reranker"]) <= set(letters["reranker"]) and letters["overfit"]["modes"] == ["redrawn"]
    redrawn = check_config(load_config(CONFIGS / "overfit_letters.yaml"), "redrawn").reranker
    assert redrawn.num_epochs == 12 > redrawn.binding_mix_epochs  # the mix leaves epochs of real prompts only


def planted(n_users: int = 8, k: int = 4) -> tuple[SplitDataset, list[TrainSample]]:
    """A learnable task: every prompt's target is one of two 'planted' titles, the negatives are
    other items; whichever slot the target sits in, its content gives it away."""
    n_items = 2 + 3 * n_users
    titles = ["", "Planted Answer", "Planted Answer Two"] + [f"Title {i}" for i in range(3, n_items + 1)]
    ds = SplitDataset(
        name="planted", item_ids=[""] + [f"i{i}" for i in range(1, n_items + 1)], titles=titles,
        user_ids=[f"u{u}" for u in range(n_users)],
        sequences=[[3 + 3 * u, 1 + u % 2, 4 + 3 * u, 5 + 3 * u] for u in range(n_users)],
    )
    samples = []
    for u in range(n_users):
        negs = [3 + (3 * u + 7 * j) % (3 * n_users) for j in range(1, k)]
        samples.append(TrainSample(user=u, position=1, history=(3 + 3 * u,), candidates=(1 + u % 2, *negs), target_index=0))
    return ds, samples


def test_fresh_check_orders_keep_the_prompt_and_move_the_target():
    ds, samples = planted()
    rows = {e: sample_rows(samples, ds, e, seed=0) for e in (1, 2)}
    for e, rs in rows.items():
        for s, r in zip(samples, rs):
            assert sorted(r["candidates"]) == sorted(ds.item_ids[i] for i in s.candidates)
            assert r["target"] == ds.item_ids[s.target] and r["history"] == [ds.item_ids[i] for i in s.history]
    slots = [[r["candidates"].index(r["target"]) for r in rs] for rs in rows.values()]
    assert slots[0] != slots[1] and len(set(slots[0])) > 1  # orders differ between epochs and prompts
    # top-1 by hand: the target first in row 0 only
    r0, r1 = rows[1][0], rows[1][1]
    s0 = [1.0 if c == r0["target"] else 0.0 for c in r0["candidates"]]
    s1 = [0.0] * len(r1["candidates"])  # all tied: the first candidate wins the tie
    assert top1_accuracy([s0, s1], [r0, r1]) == (1.0 + (r1["candidates"][0] == r1["target"])) / 2


def _prompt(user, candidates, answer):
    return TrainSample(user=user, position=1, history=(99,), candidates=tuple(candidates), target_index=candidates.index(answer))


def test_the_item_only_bound_is_the_most_answers_one_score_per_item_ranks_first():
    """Hand-counted: x beats y in prompt 0 and y beats x in prompt 1, so one of the two is lost
    whatever the scores; prompt 2 (x over z) and prompt 3 (w over x and z) can both be kept with
    them (w > x > z, x > y): 3 of 4. Without the clash every answer can be first."""
    x, y, z, w = 1, 2, 3, 4
    clash = [_prompt(0, [x, y], x), _prompt(1, [y, x], y), _prompt(2, [z, x], x), _prompt(3, [x, z, w], w)]
    assert item_only_top1(clash) == 0.75
    assert item_only_top1(clash[1:]) == 1.0
    # a cycle x > y > z > x over three prompts: at most 2 of 3
    cycle = [_prompt(0, [x, y], x), _prompt(1, [y, z], y), _prompt(2, [z, x], z)]
    assert item_only_top1(cycle) == pytest.approx(2 / 3, abs=1e-6)
    # the bound sees the candidate set only, not its order or the history
    assert item_only_top1([_prompt(0, [y, x], x), _prompt(1, [x, y], y)]) == 0.5


def test_an_item_only_bound_out_of_time_is_never_below_the_maximum(monkeypatch):
    """Past its time budget the check reports the solver's proven upper bound (or None), never less
    than the true maximum: a bound below it would say a head beat item preferences when it did not."""
    import random

    import rerank.overfit as overfit

    rng = random.Random(0)
    prompts = []
    for u in range(60):
        items = rng.sample(range(1, 40), 8)
        prompts.append(_prompt(u, items, items[rng.randrange(8)]))
    exact = item_only_top1(prompts)
    assert exact == 0.5  # 30 of 60: solved within the budget
    for seconds in (0.0, 0.01):
        monkeypatch.setattr(overfit, "ITEM_ONLY_SECONDS", seconds)
        limited = item_only_top1(prompts)
        assert limited is None or limited >= exact


def test_the_check_sees_a_learnable_task_learned_in_redrawn_orders(tmp_path):
    """The mechanism: on a planted task whose answer is given away by its content, the readout head
    reaches top-1 1.0 on the training prompts in fresh orders, and the loss falls below ln K."""
    ds, samples = planted()
    style = make_style(tok(), LETTERS, max_history=3)
    rcfg = cfg(head="readout", loss="labels", num_epochs=10, train_batch_size=4, learning_rate=2e-2,
               lora_target_modules="all-linear", logging_steps=1, eval_steps=10**9)
    curve = check_mode(fresh_model(), tok(), style, ds, samples, Config(reranker=rcfg), tmp_path / "redrawn")
    assert curve["epoch"] == list(range(1, 11))
    assert len(curve["train_loss"]) == len(curve["train_top1"]) == 10
    assert curve["train_top1"][-1] == 1.0 and curve["train_loss"][-1] < min(0.2 * math.log(4), curve["train_loss"][0] / 2), curve
    write_result(tmp_path, {"redrawn": curve, "n_prompts": len(samples), "chance": 0.25, "item_only_top1": item_only_top1(samples)})
    saved = json.loads((tmp_path / "overfit.json").read_text())
    assert saved["redrawn"]["train_top1"] == curve["train_top1"] and (tmp_path / "overfit.png").stat().st_size > 1000
    # the planted task: every prompt's answer is its own item, never another's rival
    assert saved["item_only_top1"] == 1.0


def test_the_label_comparison_trains_the_default_recipe():
    """compare_labels.yaml compares label schemes, placements and the readout on the recipe of the
    README's main job: only retriever_run and the analysis section differ from default.yaml."""
    compare = yaml.safe_load((CONFIGS / "compare_labels.yaml").read_text())
    default = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert {k: v for k, v in compare.items() if k not in ("analysis", "retriever_run")} == default
    variants = load_config(CONFIGS / "compare_labels.yaml").analysis.variants
    assert list(variants) == ["letters", "numbers", "letters_after", "letters_both", "readout", "readout_isolated", "letters_after_isolated"]
    # the paper's rows show the prompt as written; the default recipe's own row is readout_isolated
    assert all(v["candidate_attention"] == "causal" for name, v in variants.items() if not name.endswith("_isolated"))


def test_binding_warmup_prompts_answer_with_the_item_that_closes_the_history(tmp_path):
    from rerank.training.collate import TrainingTexts
    from rerank.training.samples import build_samples
    from rerank.training.stages import train_reranker
    from rerank.training.warmup import WARMUP_DIR, copy_samples, warmup_config
    from tests.helpers.data import make_ds

    ds = make_ds()
    samples = build_samples(ds, n_candidates=5, seed=0, history_len=3, max_samples=8)
    copies = copy_samples(samples)
    for s, c in zip(samples, copies):
        assert c.target == s.history[-1] and c.target_index == s.target_index  # the same slot, the last history item
        assert [x for i, x in enumerate(c.candidates) if i != c.target_index] == [x for i, x in enumerate(s.candidates) if i != s.target_index]
        assert c.target not in [x for i, x in enumerate(c.candidates) if i != c.target_index]
    rcfg = cfg(binding_warmup_steps=3, train_batch_size=4, loss="labels", num_epochs=1, eval_steps=10**9)
    assert warmup_config(rcfg, len(copies)).num_epochs * len(copies) / 4 == 3  # the asked steps
    style = make_style(tok(), LETTERS, max_history=3)
    summary = train_reranker(fresh_model(), tok(), style, ds, samples, [], rcfg, tmp_path, seed=0)
    warm = json.loads((tmp_path / WARMUP_DIR / "train_summary.json").read_text())
    assert warm["global_step"] == 3 and summary["global_step"] == 2  # 3 warm-up steps, then 8 prompts / 4
    assert summary["binding_warmup_adapter"] == str(tmp_path / WARMUP_DIR / "adapter")
    text = TrainingTexts(copies, ds.titles, tok(), style)[0]
    assert ds.titles[copies[0].target] in tok().decode(text["input_ids"]).split("Candidate pool:")[0]  # shown in the history


def test_the_binding_mix_shows_copy_prompts_at_a_falling_share():
    """reranker.binding_mix_epochs = N: in epoch e each prompt is its copy prompt (answer: the item that
    closes the history, in the target's slot) with probability 1 - e / N, so all of them in epoch 0,
    about half at N / 2, none from N on; the rest are the real prompts, unchanged."""
    from rerank.training.collate import TrainingTexts, shown_as_copy
    from rerank.training.samples import build_samples, copy_sample
    from tests.helpers.data import make_ds

    ds = make_ds()
    samples = build_samples(ds, n_candidates=5, seed=0, history_len=3, max_samples=40)
    assert all(s.history for s in samples)
    style = make_style(tok(), LETTERS, max_history=3)
    texts = TrainingTexts(samples, ds.titles, tok(), style, copy_mix=(0, 4.0))
    plain = TrainingTexts(samples, ds.titles, tok(), style)

    def copies_in(epoch):
        texts.epoch = plain.epoch = epoch
        n = 0
        for i, s in enumerate(samples):
            got = texts[i]["input_ids"]
            if got != plain[i]["input_ids"]:
                want = TrainingTexts([copy_sample(s)], ds.titles, tok(), style)[0]["input_ids"]
                assert got == want  # a copy prompt: the target's slot holds the last history item
                n += 1
        return n

    assert copies_in(0) == len(samples)
    assert 0.25 * len(samples) < copies_in(2) < 0.75 * len(samples)
    assert copies_in(4) == copies_in(7) == 0
    assert [shown_as_copy(s, 2, 0, 4.0) for s in samples] == [shown_as_copy(s, 2, 0, 4.0) for s in samples]  # seeded
    assert [shown_as_copy(s, 2, 0, 4.0) for s in samples] != [shown_as_copy(s, 2, 1, 4.0) for s in samples]


def test_a_binding_mix_without_an_epoch_of_real_prompts_is_refused(tmp_path):
    """The share falls per whole epoch: binding_mix_epochs 0.5 in a 1-epoch run would train on copy
    prompts only. Refused before any step, naming the fix."""
    from rerank.training.samples import build_samples
    from rerank.training.stages import train_reranker
    from tests.helpers.data import make_ds

    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=4)
    style = make_style(tok(), LETTERS, max_history=3)
    with pytest.raises(PipelineError, match="binding_mix_epochs 0.5 mixes copy prompts into every one of the 1 epochs"):
        train_reranker(fresh_model(), tok(), style, ds, samples, [], cfg(binding_mix_epochs=0.5, num_epochs=1), tmp_path, seed=0)
    assert not (tmp_path / "checkpoints").exists()


def test_the_check_script_writes_its_curves_and_the_item_only_bound(tmp_path):
    """scripts/overfit_check.py end to end on the tiny model (random negatives: no retriever to train)."""
    from tests.helpers.scripts import ONE_THREAD, run_script

    out = tmp_path / "check"
    sets = ["reranker.train_negatives=random", "reranker.train_covered_only=false", "reranker.train_batch_size=2",
            "overfit.n_prompts=4", "overfit.epochs=2", "overfit.modes=[redrawn]"]
    proc = run_script("scripts/overfit_check.py", "--config", "configs/experiments/smoke.yaml", "--out", str(out),
                      *[a for s in sets for a in ("--set", s)], timeout=300, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "overfit.json").read_text())
    assert set(result) == {"redrawn", "n_prompts", "chance", "item_only_top1"}
    assert result["redrawn"]["epoch"] == [1, 2] and result["n_prompts"] == 4 and result["chance"] == 1 / 20
    assert 0 < result["item_only_top1"] <= 1.0 and (out / "overfit.png").is_file()
    assert "no item-only score (no history) gets a top-1 above" in proc.stdout
