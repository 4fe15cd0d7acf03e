"""notebooks/analysis.ipynb runs top to bottom on the smoke run and shows its tables and plots.

The notebook is executed in memory from a copy in a temp folder (nothing is written into the repo
or the run), with the run and a position-bias folder given through its environment variables."""
import hashlib
import json
import os
import shutil

import nbformat
from nbclient import NotebookClient

from analysis.position_bias import position_bias, write_outputs
from tests.helpers.scripts import REPO

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def _outputs(nb):
    """(markdown texts, stream texts, number of PNG images) over all code cells."""
    markdown, streams, images = [], [], 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            assert out.output_type != "error", f"cell failed: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream":
                streams.append(out.text)
            data = out.get("data", {})
            markdown += [data["text/markdown"]] if "text/markdown" in data else []
            images += "image/png" in data
    return "\n".join(markdown), "".join(streams), images


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'os.environ.get("ANALYSIS_RUNS", "runs/default")' in params[0].source


def test_notebook_executes_on_the_smoke_run(smoke_run, tmp_path, monkeypatch):
    run_dir, _ = smoke_run
    before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
    run_files = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}  # the run's own PNGs among them
    # A position-bias folder as scripts/position_bias.py writes it (hand-built scores: no model here).
    rows = [{"user": "u1", "candidates": ["a", "b", "c"], "target": "b"}]
    result = {"run": "hand-built", "split": "test", **position_bias(rows, [[([0, 1, 2], [0.0, 2.0, 1.0]), ([2, 1, 0], [3.0, 1.0, 0.0])]])}
    write_outputs(result, tmp_path / "pb")
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / "analysis.ipynb")
    monkeypatch.setenv("ANALYSIS_RUNS", str(run_dir))
    monkeypatch.setenv("ANALYSIS_POSITION_BIAS", str(tmp_path / "pb"))
    monkeypatch.setenv("ANALYSIS_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(work / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    markdown, streams, images = _outputs(nb)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The per-run tables: retriever vs reranker, with the run's own numbers.
    for split in ("val", "test"):
        assert f"**{split}**" in markdown
        assert f"| Reranker (subset) | {metrics[split]['subset']['NDCG@5']:.4f} |" in markdown
    assert "reranker tiny-qwen2 (letters)" in markdown
    if (REPO / "analysis" / "tables.py").is_file():
        assert "Table 1" in markdown and "Table 3" in markdown
    # metrics_per_k + training_curves for the run, and the position-bias plot.
    assert images == 3
    assert sorted(p.name for p in (tmp_path / "figures" / run_dir.name).iterdir()) == ["metrics_per_k.png", "training_curves.png"]
    assert "# Position bias: hand-built" in markdown and "| B | 1 | 1.000 |" in markdown
    assert str(run_dir) in streams and "IProgress" not in streams
    # Nothing written into the repository's notebook or the run.
    assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == run_files
    assert os.listdir(work) == ["analysis.ipynb"]
