"""ProgressLogHandler: an engine's progress in the log at most every few seconds, whatever the step speed.

MONAI's ``StatsHandler`` logs every N iterations, which on a CPU at the bundle's geometry can be minutes apart,
and an evaluator's iterations not at all. This handler logs by time: when an epoch starts, then at most every
``every_s`` seconds (iterations done / epoch length, elapsed, an estimate of the time left), and when it ends.
"""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from monai.engines import Evaluator

from aiva_monai.progress import RoundProgress

__all__ = ["ProgressLogHandler"]


class ProgressLogHandler:
    """Time-based progress lines for an Ignite engine (a trainer or an evaluator).

    Args:
        name: what the lines call a run of the engine (e.g. "training", "source validation").
        every_s: at most this many seconds between two lines of one epoch.
        unit: what an iteration is (e.g. "volumes" for an evaluator over one volume per iteration).
        logger: where the lines go (INFO); default ``aiva_monai.progress``.

    Lines look like ``training epoch 2/5: 120/200 iterations, 3 min 02 s elapsed, about 2 min 01 s left``.
    """

    def __init__(
        self,
        name: str = "training",
        every_s: float = 20.0,
        unit: str = "iterations",
        logger: logging.Logger | None = None,
    ) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}.")
        self.name, self.every_s, self.unit = str(name), float(every_s), str(unit)
        self.logger = logger or logging.getLogger("aiva_monai.progress")
        self._progress: RoundProgress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def _stage(self, engine: Engine) -> str:
        if isinstance(engine, Evaluator):  # run(global_epoch) sets epoch = max_epochs = the trainer's epoch
            return self.name
        epochs = engine.state.max_epochs
        return f"{self.name} epoch {engine.state.epoch}/{epochs}" if epochs and epochs > 1 else self.name

    def epoch_started(self, engine: Engine) -> None:
        stage = self._stage(engine)
        self._progress = RoundProgress(self.logger, every_s=self.every_s, clock=None, units={stage: self.unit})
        self._progress.start(stage, self._length(engine))

    def iteration_completed(self, engine: Engine) -> None:
        if self._progress is None:  # attached to an engine already inside an epoch
            self.epoch_started(engine)
        length = self._length(engine)
        done = (engine.state.iteration - 1) % length + 1 if length else engine.state.iteration
        self._progress(self._stage(engine), done, max(length, done))

    @staticmethod
    def _length(engine: Engine) -> int:
        length = engine.state.epoch_length
        if length is None:
            try:
                length = len(engine.state.dataloader)
            except TypeError:  # an iterable without a length: lines without a total
                length = 0
        return int(length or 0)
