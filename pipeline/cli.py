"""The command-line contract every script shares: --config, --out, --set; errors as one line.

    python scripts/X.py --config configs/....yaml --out runs/NAME [--set a.b=value ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.errors import PipelineError


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
    """Run a script's main; bad input becomes `error: <one line>` on stderr and exit code 2."""
    try:
        main(argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
