"""Running the matrix: every cell not yet recorded, with progress lines, one record per finished cell."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aiva_monai.experiments.grid import Cell
from aiva_monai.experiments.runner import git_commit
from aiva_monai.experiments.store import RESULTS_NAME, FolderLock, ResultsFile
from aiva_monai.methods import reads_target_labels


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}"


def run_matrix(
    cells: Sequence[Cell],
    output: str | Path,
    runner: Callable,
    *,
    keep_going: bool = True,
    commit: str | None = None,
    stream=None,
) -> dict:
    """Run every cell not yet in ``<output>/results.jsonl`` with ``runner(cell, run_dir, progress)`` and
    append its record (the runner's fields plus the cell, ``reads_target_labels``, commit, run dir, seconds).

    A failing cell is logged and skipped (``keep_going``) or raised; it is not recorded, so the next run
    retries it. Returns {"ran": [...], "skipped": [...], "failed": [(id, message)]}.
    """
    stream = stream or sys.stdout
    output = Path(output)
    results = ResultsFile(output / RESULTS_NAME)
    commit = commit or git_commit()
    summary = {"ran": [], "skipped": [], "failed": []}
    with FolderLock(output):
        done = results.finished()
        start = time.monotonic()
        total = len(cells)
        for index, cell in enumerate(cells, 1):
            prefix = (
                f"[{index}/{total}] {cell.method:<11} {'+'.join(cell.sources)} -> {cell.target}, seed {cell.seed}"
                + (f", k {cell.k}" if cell.k is not None else "")
            )
            if cell.id in done:
                summary["skipped"].append(cell.id)
                print(f"{prefix}: already recorded, skipped", file=stream, flush=True)
                continue
            run_dir = output / "runs" / cell.slug
            cell_start = time.monotonic()

            def progress(stage: str) -> None:
                print(
                    f"{prefix}: {stage} (cell {_clock(time.monotonic() - cell_start)}, "
                    f"total {_clock(time.monotonic() - start)})",
                    file=stream,
                    flush=True,
                )

            try:
                fields = runner(cell, run_dir, progress)
            except Exception as error:  # noqa: BLE001 - one failed cell must not stop the matrix
                summary["failed"].append((cell.id, str(error)))
                print(f"{prefix}: FAILED: {error}", file=stream, flush=True)
                if not keep_going:
                    raise
                continue
            record = {
                "cell": cell.id,
                "status": "ok",
                "method": cell.method,
                "dataset": cell.dataset,
                "sources": list(cell.sources),
                "target": cell.target,
                "seed": cell.seed,
                "k": cell.k,
                "steps": cell.steps,
                "reads_target_labels": reads_target_labels(cell.method),
                **fields,
                "git_commit": commit,
                "run_dir": str(run_dir),
                "seconds": round(time.monotonic() - cell_start, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            results.append(record)
            done.add(cell.id)
            summary["ran"].append(cell.id)
            progress("recorded")
    return summary
