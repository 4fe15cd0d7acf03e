"""Session-wide fixtures: the smoke experiment, run once per pytest process and shared read-only by
every test that needs a finished run directory (tables, analyses, notebook, resume). Tests must not
write into it: copy it (shutil.copytree) first."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One torch thread in every subprocess run that a test compares byte for byte with another: float
# reductions (and so the last digits of the scores written) depend on the thread count.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/...` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(run directory, stdout) of `scripts/run_experiment.py --config configs/experiments/smoke.yaml`."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_script("scripts/run_experiment.py", "--config", "configs/experiments/smoke.yaml", "--out", str(out), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
