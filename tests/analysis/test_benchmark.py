"""scripts/benchmark.py and analysis/benchmark/: exact padding counts, the floor batches the ranker
does, the peak-memory arithmetic, and the script's outputs on tiny sizes. No timing assertions:
speed claims come only from the benchmark's own ratios."""
from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import torch

from analysis import peak_memory
from analysis.benchmark.ranking import arrival_batches, padding_tokens
from analysis.benchmark.settings import FIGURE_ORDER
from rerank.inference import ranker
from rerank.inference.ranker import length_ordered_batches, pad_left
from rerank.prompting.labels import LETTERS
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import make_style
from tests.helpers.scripts import REPO, run_script
from tests.helpers.tokenizers import qwen_tokenizer

CONFIG = "configs/experiments/benchmark_tiny.yaml"
# Tiny sizes: a 40-user slice, short histories, batches of 2, one timed run of each variant.
TINY = [
    "--set", "data.max_users=40", "--set", "reranker.max_history=3", "--set", "reranker.rank_batch_size=2",
    "--set", "reranker.train_batch_size=2", "--set", "analysis.generation_batch_size=2",
    "--users", "5", "--repeats", "1", "--warmup", "0", "--generation-repeats", "1",
]


def test_padding_counts_on_a_hand_built_batch():
    lengths = [5, 3, 8, 2, 7]
    # arrival: [5, 3] [8, 2] [7] -> 2 + 6 + 0 pad tokens
    assert arrival_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert padding_tokens(lengths, arrival_batches(5, 2)) == 8
    # longest first: [8, 7] [5, 3] [2] -> 1 + 2 + 0
    assert length_ordered_batches(lengths, 2) == [[2, 4], [0, 1], [3]]
    assert padding_tokens(lengths, length_ordered_batches(lengths, 2)) == 3
    # one batch: every prompt padded to the longest, 5 * 8 - 25
    assert padding_tokens(lengths, [[0, 1, 2, 3, 4]]) == 15
    # the padded tensors hold exactly that many pad positions, on the left
    for batch in length_ordered_batches(lengths, 2) + arrival_batches(5, 2):
        ids, mask = pad_left([[1] * lengths[i] for i in batch], pad_id=0, device="cpu")
        assert int((mask == 0).sum()) == padding_tokens(lengths, [batch])
        assert bool((mask[:, -1] == 1).all())  # every prompt ends at the last column
        assert torch.equal(ids, mask)  # tokens (1) where the mask is 1, pad id (0) elsewhere


def test_floor_batches_are_the_rankers(monkeypatch):
    """The floor must pad exactly the batches score_prompts runs: same members, same order."""
    seen: list[list[int]] = []

    def record(model, batch, scored, plan, pad_id, device, lines=None):
        seen.append([len(p) for p in batch])
        return torch.zeros(len(batch), len(scored))

    class Model(torch.nn.Module):  # score_prompts only needs eval/train and the embeddings' device
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(2, 2)

        def get_input_embeddings(self):
            return self.emb

    monkeypatch.setattr(ranker, "_score_batch", record)
    tok = qwen_tokenizer()
    lengths = [7, 3, 9, 9, 1, 4, 7, 2]
    prompts = [[5] * n for n in lengths]
    ranker.score_prompts(Model(), prompts, label_tokens(tok, make_style(tok, LETTERS)).for_k(20), batch_size=3, pad_id=0, progress=False)
    assert seen == [[lengths[i] for i in b] for b in length_ordered_batches(lengths, 3)]


def test_running_sum_peak():
    # +4 +4 -4 +8 -12: live bytes 4, 8, 4, 12, 0 -> peak 12; events arrive unordered
    events = [(3, 8), (0, 4), (2, -4), (1, 4), (4, -12)]
    assert peak_memory._peak_of_running_sum(events) == 12
    assert peak_memory._peak_of_running_sum([(0, -5), (1, 3)]) == 0  # frees of older tensors never go below the start


def test_tensor_peak_bytes_sees_a_known_allocation():
    def step():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a + 1  # 4 MB more while a lives
        del a, b

    peak = peak_memory.tensor_peak_bytes(step, "cpu")
    assert 8_000_000 <= peak < 8_100_000


def test_script_writes_benchmark_json_and_table(tmp_path):
    out = tmp_path / "bench"
    proc = run_script("scripts/benchmark.py", "--config", CONFIG, "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert list(result["figures"]) == list(FIGURE_ORDER)
    for name, fig in result["figures"].items():
        assert {"what", "ratio_is", "ratio", "ratio_of_fastest", "target", "pass", "raw"} <= set(fig), name
        assert fig["pass"] in (True, False, None)
        assert (fig["target"] is None) == (fig["pass"] is None), name
        num, den = fig["ratio_is"].split(" / ")
        if fig["raw"][den]:
            assert fig["ratio"] == pytest.approx(fig["raw"][num] / fig["raw"][den]), name
    figs = result["figures"]
    layout = figs["lora_layout_time"]["raw"]
    assert layout["n_layers"] == 2 and layout["top_layers"] == 1  # tiny-qwen2: a quarter of 2 layers, at least 1
    trainable = layout["trainable_parameters"]
    assert trainable["all_linear_top"] < trainable["all_linear"] and trainable["paper"] < trainable["all_linear"]
    for name in ("ranking_overhead", "generation_speedup", "merged_vs_adapter", "training_time", "lora_layout_time", "batching_time"):  # timed
        raw = figs[name]["raw"]
        num, den = (key[:-2] + "_runs_s" for key in figs[name]["ratio_is"].split(" / "))
        assert figs[name]["ratio_of_fastest"] == pytest.approx(min(raw[num]) / min(raw[den])), name
    assert figs["batching_padding"]["ratio_of_fastest"] is None and figs["training_memory"]["ratio_of_fastest"] is None
    assert figs["ranking_overhead"]["target"] == "<= 1.15" and len(figs["ranking_overhead"]["raw"]["ours_runs_s"]) == 1
    assert figs["generation_speedup"]["target"] == ">= 20.0"  # tiny-qwen2: the target applies
    assert figs["generation_speedup"]["raw"]["generated_tokens_mean"] > 0
    merged = figs["merged_vs_adapter"]  # reported: merged weights vs the PeftModel, from its own raw runs
    assert merged["ratio_is"] == "merged_s / adapter_s" and merged["target"] is None and merged["pass"] is None
    assert len(merged["raw"]["merged_runs_s"]) == len(merged["raw"]["adapter_runs_s"]) == 1
    assert merged["raw"]["merged_s"] == pytest.approx(statistics.median(merged["raw"]["merged_runs_s"]))
    assert merged["raw"]["adapter_s"] == pytest.approx(statistics.median(merged["raw"]["adapter_runs_s"]))
    assert merged["ratio"] > 0 and merged["ratio"] == pytest.approx(merged["raw"]["merged_s"] / merged["raw"]["adapter_s"])

    pad = figs["batching_padding"]["raw"]
    assert 0 <= pad["padding_ours"] <= pad["padding_arrival"] and figs["batching_padding"]["pass"] is True
    assert result["prompts"]["n_prompts"] == result["settings"]["n_rows"] == 5
    assert pad["real_tokens"] >= 5 * result["prompts"]["tokens_min"]

    mem = figs["training_memory"]["raw"]
    assert mem["loss_ours"] == pytest.approx(mem["loss_stock"], rel=1e-4)  # the same loss, computed two ways
    assert mem["ours_peak_bytes"] > 0 and mem["stock_peak_bytes"] >= mem["logits_bytes_stock_computed"]
    assert mem["logits_bytes_stock_computed"] == mem["batch_size"] * mem["sequence_length"] * mem["vocab_size"] * 4
    assert mem["rss_ours_peak_bytes"] is None or mem["rss_ours_peak_bytes"] >= 0

    assert result["model"]["name"] == "tiny-qwen2" and result["model"]["lora_trainable_parameters"] > 0
    assert result["machine"]["torch"] == torch.__version__
    table = (out / "benchmark.md").read_text()
    assert table in proc.stdout
    assert table.count("\n| ") == 1 + len(FIGURE_ORDER)  # header + one row per figure
    run = json.loads((out / "run.json").read_text())
    assert run["end"] and set(run["benchmark"]) == set(FIGURE_ORDER)


def _script_main():
    """scripts/benchmark.py as a module (scripts/ is no package), run in this process: fast."""
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--users", "0"], "--users must be >= 1"),
        (["--architecture", "qwen9"], "unknown --architecture 'qwen9'"),
        (["--set", "retriever_run=/nonexistent/run"], "candidates file not found"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    script = _script_main()
    with pytest.raises(SystemExit) as exit_info:
        script.run_main(script.main, ["--config", str(REPO / CONFIG), "--out", str(tmp_path / "b"), "--set", "data.max_users=40", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
