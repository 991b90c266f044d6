"""Progress of long work that a person can follow: log lines and an optional progress bar.

Each stage (a clustering round's embedding pass, PCA, t-SNE, k-means, source means; an AdaBN pass; the
selection scores; an engine's epoch) logs when it starts, then at most every ``every_s`` seconds how far it is
(done / total, elapsed, an estimate of the time left by linear extrapolation), so a log is never silent for long.
"""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

__all__ = ["RoundProgress"]

_STAGE_WORDS = {
    "embed": "embedding pass",
    "pca": "PCA",
    "tsne": "t-SNE",
    "kmeans": "k-means",
    "means": "source means",
    "adabn": "AdaBN pass",
    "scores": "label-free scores",
}
_UNITS = {"embed": "slices", "tsne": "iterations", "means": "slices", "adabn": "batches", "scores": "slices"}


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class RoundProgress:
    """Callable as ``progress(stage, done, total, detail="")``; logs through ``logger``.

    Args:
        logger: where the lines go (INFO).
        label: prefix of every line (e.g. "AIVA epoch 3: ").
        every_s: at most this many seconds between two lines of one stage (the first and the last
            update of a stage are always logged).
        bar: also show a tqdm progress bar per stage (e.g. when stderr is a terminal).
        clock: how a stage's first line names the time since this object was made (None: left out).
        units: unit of a stage's done / total, for stages not named above (e.g. {"training": "iterations"}).
    """

    def __init__(
        self,
        logger: logging.Logger,
        label: str = "",
        every_s: float = 10.0,
        bar: bool = False,
        clock: str | None = "round time so far",
        units: dict[str, str] | None = None,
    ) -> None:
        self.logger, self.label, self.every_s, self.bar = logger, label, float(every_s), bool(bar)
        self.clock, self.units = clock, {**_UNITS, **(units or {})}
        self.stage: str | None = None
        self.started = self.last_line = time.perf_counter()
        self.round_started = self.started
        self._bar = None
        self.lines = 0

    def _log(self, message: str) -> None:
        self.logger.info(f"{self.label}{message}")
        self.last_line = time.perf_counter()
        self.lines += 1

    def start(self, stage: str, total: int, detail: str = "") -> None:
        """Begin ``stage`` (``total`` units of work); logs one line."""
        self.close()
        self.stage, self.total, self.started, self.finished = stage, int(total), time.perf_counter(), False
        name = _STAGE_WORDS.get(stage, stage)
        unit = self.units.get(stage)
        self._log(
            f"{name} started"
            + (f": {self.total} {unit}" if unit else "")
            + (f" ({detail})" if detail else "")
            + (f"; {self.clock} {_duration(self.started - self.round_started)}" if self.clock else "")
        )
        if self.bar and unit:
            self._bar = tqdm(
                total=self.total,
                desc=f"AIVA {name}",
                unit=unit.rstrip("s") if unit != "slices" else "slice",
                leave=False,
            )

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if stage != self.stage:
            self.start(stage, total, detail)
        if self._bar is not None:
            self._bar.update(max(0, int(done) - self._bar.n))
        now = time.perf_counter()
        if done <= 0 or self.finished or (done < total and now - self.last_line < self.every_s):
            return
        self.finished = done >= total
        elapsed = now - self.started
        left = elapsed * (total - done) / done if 0 < done < total else 0.0
        unit = self.units.get(stage, "")
        line = f"{_STAGE_WORDS.get(stage, stage)}: {done}/{total} {unit}".rstrip()
        if detail:
            line += f" ({detail})"
        line += f", {_duration(elapsed)} elapsed"
        line += f", about {_duration(left)} left" if done < total else ", done"
        self._log(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
