"""aiva-monai: unsupervised site adaptation of MRI segmentation models (AIVA) on MONAI."""

import importlib

__version__ = "0.2.8"

_SUBMODULES = (
    "alignment",
    "batchnorm",
    "bundle",
    "checkpoint_selection",
    "clustering",
    "data",
    "embedding",
    "engines",
    "evaluation",
    "handlers",
    "inference",
    "io",
    "jdot",
    "losses",
    "methods",
    "metrics",
    "network_pass",
    "networks",
    "optim",
    "selection",
    "visualize",
)


def __getattr__(name):
    # submodules load on first use, so bundle configs can write `aiva_monai.data.SliceDataset` after `import aiva_monai`
    if name in _SUBMODULES:
        return importlib.import_module(f"aiva_monai.{name}")
    raise AttributeError(f"module 'aiva_monai' has no attribute {name!r}")
