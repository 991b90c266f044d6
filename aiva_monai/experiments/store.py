"""The results store: an append-only JSON-lines file (one record per finished cell) and the folder lock."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


RESULTS_NAME = "results.jsonl"


class ResultsFile:
    """Append-only JSON lines: one object per finished cell, each appended with one ``os.write``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict]:
        """Every complete, parseable line (a torn last line from a crash is skipped with a warning)."""
        if not self.path.is_file():
            return []
        found = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning(f"{self.path}:{number}: not a complete JSON line (an interrupted write?), ignored.")
        return found

    def finished(self) -> set[str]:
        return {r["cell"] for r in self.records() if r.get("status", "ok") == "ok" and "cell" in r}

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(descriptor).st_size
            if size:  # a torn last line (no newline) is closed first, so the new record starts on its own line
                with open(self.path, "rb") as handle:
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":
                        line = b"\n" + line
            written = os.write(descriptor, line)
            if written != len(line):
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes.")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class FolderLock:
    """An exclusive ``flock`` on ``<output>/.lock`` (released when the process ends, even by SIGKILL)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise RuntimeError(f"another experiment runner is using {self.path.parent} (lock {self.path}).") from None
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *args):
        self.handle.close()


METRIC_TITLES = {"dice": "Dice", "surface_dice_1mm": "surface Dice @ 1 mm", "surface_dice_2mm": "surface Dice @ 2 mm"}


def row_label(record: dict) -> str:
    sources = record["sources"]
    return record["target"] if len(sources) > 1 else f"{sources[0]} -> {record['target']}"


def target_mean(record: dict, metric: str) -> float | None:
    values = [
        v[metric] for v in record.get("volumes", []) if v.get("set") == "target test" and v.get(metric) is not None
    ]
    return float(np.mean(values)) if values else None


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts; the union of their keys as columns, in first-seen order) as a CSV file, written atomically."""
    from aiva_monai.io import write_text_atomic

    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
