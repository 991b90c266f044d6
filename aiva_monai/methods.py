"""The registry of adaptation methods: each method's name, whether it reads target labels, its source.

Every output (results file, table, method card) checks ``reads_target_labels(method)`` here, so that the one
method that trains on target labels (``oracle``) is marked wherever its numbers appear. A new method is
one ``MethodInfo`` line here, one trainer module under ``aiva_monai.engines`` and one overlay under a
bundle's ``configs/methods/``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "MethodInfo", "reads_target_labels"]


@dataclass(frozen=True)
class MethodInfo:
    """One method of the comparison: its name, whether it reads target labels, where it comes from."""

    name: str
    reads_target_labels: bool
    summary: str
    reference: str


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("source", False, "source model, no adaptation (lower bound)", "-"),
        MethodInfo(
            "adabn",
            False,
            "BatchNorm statistics re-estimated on unlabelled target images",
            "Li et al. 2016, arXiv:1603.04779",
        ),
        MethodInfo(
            "adaptsegnet",
            False,
            "adversarial alignment of the softmax output space",
            "Tsai et al. 2018, CVPR, arXiv:1802.10349",
        ),
        MethodInfo(
            "segjdot",
            False,
            "optimal transport of joint bottleneck-feature / label distributions",
            "Damodaran et al. 2018, ECCV, arXiv:1803.10081; Ackaoui et al. 2020 (Seg-JDOT)",
        ),
        MethodInfo("aiva", False, "intra-site variability alignment (this project)", "AIVA paper, Algorithm 1"),
        MethodInfo(
            "aiva+adabn",
            False,
            "AIVA, then AdaBN re-estimation of every kept checkpoint's BatchNorm statistics "
            "on the unlabelled target training slices",
            "AIVA paper + Li et al. 2016",
        ),
        MethodInfo(
            "aiva_v1",
            False,
            "AIVA with this project's first defaults (shared BatchNorm statistics, lambda = "
            "1 / mean L_align, per-batch cluster means, all layers trained)",
            "AIVA paper, Algorithm 1; commit 00061b4",
        ),
        MethodInfo(
            "oracle",
            True,
            "supervised training on the target site's labelled data (upper bound; READS TARGET LABELS)",
            "-",
        ),
    )
}


def reads_target_labels(method: str) -> bool:
    """True only for ``oracle``: the method that trains on target labels (mark it in every output)."""
    try:
        return METHODS[method].reads_target_labels
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}.") from None
