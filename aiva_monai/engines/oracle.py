"""OracleTrainer: the target-supervised upper bound (READS TARGET LABELS)."""

from __future__ import annotations

from collections.abc import Callable

from monai.engines import SupervisedTrainer

from aiva_monai.engines.base import default_seg_loss

__all__ = ["OracleTrainer"]


class OracleTrainer(SupervisedTrainer):
    """The target-supervised upper bound: a plain ``SupervisedTrainer`` whose ``train_data_loader`` yields
    the TARGET site's labelled training slices (same network, loss, optimiser and budget as pretraining;
    in a bundle: the pretraining config with the target site as its source).

    It is the only method of the comparison that reads target labels: ``OracleTrainer.reads_target_labels``
    and ``engine.state.reads_target_labels`` are True, as is ``reads_target_labels("oracle")``; write that
    flag next to every number it produces.
    """

    reads_target_labels = True

    def __init__(self, *args, loss_function: Callable | None = None, **kwargs) -> None:
        super().__init__(*args, loss_function=default_seg_loss() if loss_function is None else loss_function, **kwargs)
        self.state.reads_target_labels = self.reads_target_labels
