"""Ranking progress on disk: <run>/rankings_<split>.jsonl.partial, so a killed ranking resumes.

The ranker scores a split as a fixed list of batches (`rerank.inference.rank_split.rank_split`: prompts
sorted by length, cut into `rank_batch_size` batches, the same batches as one uninterrupted pass,
so the scores are the same to the last bit). The partial file is append-only JSON lines:

    {"plan": "<sha256 of the batches>", "batches": N}      header, written atomically
    {"batch": b, "scores": [[...], ...]}                    one line per scored batch, in any order

Each batch line is written with one write, flushed and fsynced before the next batch starts, so a
kill loses at most the batch in flight: a torn last line (no newline, or not JSON) is dropped and
cut off on reading. A header for other batches (another candidates file, rank_batch_size,
rank_permutations or prompt) is an error, never mixed in. `finish` writes the final rankings file
atomically and only then deletes the partial file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.atomic import write_text
from pipeline.candidates import write_rows
from pipeline.errors import PipelineError

SUFFIX = ".partial"


def partial_path(final: str | Path) -> Path:
    """Where the progress of `final` (a rankings_<split>.jsonl) is kept while it is computed."""
    final = Path(final)
    return final.with_name(final.name + SUFFIX)


class PartialRankings:
    """The partial file of one rankings file. `load` -> the batches scored so far; `append` one
    more; `finish` -> the final file."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.path = partial_path(final)

    def load(self, plan: str, n_batches: int) -> dict[int, list[list[float]]]:
        """Batch index -> its prompts' scores, for every batch the file holds (none when there is
        no file). Creates the file (header only) when missing; cuts off a torn last line."""
        if not self.path.is_file():
            self._start(plan, n_batches)
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1]  # after the last newline: empty, or a line torn by a kill
        parsed = []
        for i, line in enumerate(complete):
            try:
                parsed.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if i != len(complete) - 1:
                    raise PipelineError(
                        f"{self.path} line {i + 1} is not JSON: the file is damaged; delete it to rank this split afresh"
                    ) from None
                complete = complete[:-1]  # a last line that never fully reached the disk
        if not parsed:  # killed while the header was being created
            self._start(plan, n_batches)
            return {}
        header, rows = parsed[0], parsed[1:]
        if not isinstance(header, dict) or header.get("plan") != plan or header.get("batches") != n_batches:
            raise PipelineError(
                f"{self.path} was written for other prompts or ranking settings (candidates, rank_batch_size, "
                "rank_permutations, prompt): delete it to rank this split afresh, or resume with the settings it was made with"
            )
        done: dict[int, list[list[float]]] = {}
        for lineno, row in enumerate(rows, 2):
            b = row.get("batch") if isinstance(row, dict) else None
            if not isinstance(b, int) or not 0 <= b < n_batches or not isinstance(row.get("scores"), list):
                raise PipelineError(f"{self.path} line {lineno} is not a scored batch: delete the file to rank this split afresh")
            done[b] = row["scores"]  # a batch scored twice (a kill between write and bookkeeping) has equal scores
        kept = b"".join(line + b"\n" for line in complete)
        if len(kept) != len(data):  # cut the torn tail, so the next append starts on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(len(kept))
                f.flush()
                os.fsync(f.fileno())
        return done

    def append(self, batches: Iterable[tuple[int, Sequence[Sequence[float]]]]) -> None:
        """Add scored batches, one line each; on disk (fsync) when this returns."""
        text = "".join(json.dumps({"batch": b, "scores": [list(s) for s in scores]}) + "\n" for b, scores in batches)
        if not text:
            return
        # One write per call, then flush + fsync: a kill leaves whole lines and at most one torn
        # last line. fsync costs milliseconds; a ranking batch takes far longer.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, rankings: Iterable[dict]) -> None:
        """Write the final rankings file (atomically), then drop the partial file."""
        write_rows(self.final, rankings)
        self.discard()

    def discard(self) -> None:
        """Delete the partial file (stale progress, e.g. of an adapter trained again)."""
        self.path.unlink(missing_ok=True)

    def _start(self, plan: str, n_batches: int) -> None:
        write_text(self.path, json.dumps({"plan": plan, "batches": n_batches}) + "\n")
