"""The command-line contract every script shares: --config, --out, --set; errors as one line.

    python scripts/X.py --config configs/....yaml --out runs/NAME [--set a.b=value ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.errors import PipelineError
from pipeline.rundir import fail_started, started_count


def parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=config_required, help="YAML config under configs/")
    p.add_argument("--out", required=True, help="run directory to write (created if missing)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set retriever.max_epochs=3 (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted run in --out: finished stages are kept, training resumes from its last checkpoint",
    )
    return p


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a script's main; bad input becomes `error: <one line>` on stderr and exit code 2, and
    leaves no partial output: run directories the script started are failed (pipeline.rundir:
    a fresh run's output is removed; a resumed run, or one with a finished stage, records the error
    in run.json and keeps its stages, which the one line then names). Other
    exceptions (bugs) and interrupts keep the directory as it is, to debug or --resume."""
    since = started_count()
    try:
        main(argv)
    except PipelineError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, always
        notes: list[str] = []
        try:
            notes = fail_started(message, since)
        except OSError:
            pass  # cleanup is best effort; the message still names the problem
        print(f"error: {' ; '.join([message, *notes])}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
