"""``SurfaceDiceHandler``: per-volume surface Dice in millimetres as an Ignite metric handler."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler

from aiva_monai.metrics import VolumeSurfaceDiceMetric


class SurfaceDiceHandler(IgniteMetricHandler):
    """Per-volume surface Dice at a tolerance in mm (MONAI metric handler wiring).

    Args:
        tolerance_mm: boundary tolerance in millimetres (paper: 1 mm).
        include_background, use_subvoxels, reduction: see ``VolumeSurfaceDiceMetric``.
        output_transform: extracts ``(y_pred, y)`` (one-hot, channel-first, MetaTensors with affines)
            from ``engine.state.output``.
        save_details: keep every volume's score in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        tolerance_mm: float = 1.0,
        include_background: bool = False,
        use_subvoxels: bool = True,
        reduction="mean",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = VolumeSurfaceDiceMetric(
            tolerance_mm=tolerance_mm,
            include_background=include_background,
            use_subvoxels=use_subvoxels,
            reduction=reduction,
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
