"""Session-wide fixtures: the smoke experiment, run once per pytest process and shared read-only by
every test that needs a finished run directory (tables, analyses, notebook, resume). Tests must not
write into it: copy it (shutil.copytree) first."""

import pytest

from tests.helpers.scripts import ONE_THREAD, run_script


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(run directory, stdout) of `scripts/run_experiment.py --config configs/experiments/smoke.yaml`."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_script("scripts/run_experiment.py", "--config", "configs/experiments/smoke.yaml", "--out", str(out), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
