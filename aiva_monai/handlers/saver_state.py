"""``SaverState``: checkpoint savers' bookkeeping saved and restored with the checkpoint."""

from __future__ import annotations

import re
from pathlib import Path


class SaverState:
    """What MONAI ``CheckpointSaver`` objects remember between saves (the best key-metric score so far,
    the files they keep), and the evaluator's best metric, as one checkpointable object.

    Put it in the periodic checkpoint's ``save_dict``: a resumed run then keeps the uninterrupted run's
    best model (instead of overwriting ``model.pt`` with its first validation) and replaces the
    checkpoint it resumed from (``n_saved``) instead of leaving it behind. The periodic saver itself
    holds this object in its ``save_dict``, so it is added after construction with ``track``.
    """

    def __init__(self, savers=(), evaluator=None) -> None:
        self.savers = {}
        self.resumed_from = {}
        self.evaluator = evaluator
        for name, saver in dict(savers).items():
            self.track(saver, name)

    def track(self, saver, name: str = "checkpoint", resumed_from=None):
        """Also save and restore ``saver``'s state under ``name``; returns self.

        ``resumed_from``: the checkpoint file a resumed run starts from, written by ``saver`` itself. Its
        saved state predates that file (a saver records a file after writing it), so the file is added
        back to the saver's list on loading, and is replaced like any other when newer ones are written.
        """
        self.savers[name] = saver
        if resumed_from:
            self.resumed_from[name] = Path(resumed_from).name
        return self

    def _checkpoints(self) -> dict:
        found = {}
        for name, saver in self.savers.items():
            for kind in ("key_metric", "interval"):
                checkpoint = getattr(saver, f"_{kind}_checkpoint", None)
                if checkpoint is not None:
                    found[f"{name}/{kind}"] = (checkpoint, name)
        return found

    def state_dict(self) -> dict:
        state = {
            key: [(float(p), str(f)) for p, f in checkpoint.state_dict()["_saved"]]
            for key, (checkpoint, _) in self._checkpoints().items()
        }
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, (checkpoint, name) in self._checkpoints().items():
            folder = Path(getattr(checkpoint.save_handler, "dirname", "."))
            # files deleted since the state was taken are forgotten; the file resumed from is remembered
            saved = [(p, f) for p, f in state.get(key, []) if (folder / f).exists()]
            resumed = self.resumed_from.get(name)
            if (
                resumed
                and key.endswith("interval")
                and resumed not in [f for _, f in saved]
                and (folder / resumed).exists()
            ):
                numbers = re.findall(r"(\d+)", Path(resumed).stem)  # its global step, as the saver named it
                saved.append((float(numbers[-1]) if numbers else 0.0, resumed))
            checkpoint.load_state_dict({"_saved": saved})
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
