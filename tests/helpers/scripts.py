"""Running the project's scripts from a test: the repository root, one torch thread, `run_script`."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# One torch thread in every subprocess run that a test compares byte for byte with another: float
# reductions (and so the last digits of the scores written) depend on the thread count.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/...` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
