"""Helpers the bundle configs call (``$aiva_monai.bundle.<name>(...)``): where the bundle lies (``root``), its data
(``datalists``), the built-in demo (``demo``), a run's files (``checkpoints``), config-expression helpers
(``configs``)."""

from aiva_monai.bundle.checkpoints import (
    adabn_checkpoint,
    copy_weights,
    evaluation_checkpoints,
    latest_checkpoint,
    require_file,
    save_weights,
    source_statistics_model,
    write_method_card,
)
from aiva_monai.bundle.configs import handler_of, present
from aiva_monai.bundle.datalists import (
    LAYOUTS,
    datalist_base_dir,
    default_site,
    entries,
    is_synthetic,
    other_sites,
    resolve_datalist,
    unlabelled_slices,
)
from aiva_monai.bundle.demo import (
    SHIPPED_DEMO_SOURCE,
    demo_headline,
    demo_report,
    demo_source_model,
    shipped_demo_source,
)
from aiva_monai.bundle.root import REPOSITORY, config_file_folders, locate_bundle_root, verify_metadata

__all__ = [
    "REPOSITORY",
    "LAYOUTS",
    "SHIPPED_DEMO_SOURCE",
    "config_file_folders",
    "locate_bundle_root",
    "verify_metadata",
    "resolve_datalist",
    "datalist_base_dir",
    "is_synthetic",
    "default_site",
    "other_sites",
    "entries",
    "unlabelled_slices",
    "latest_checkpoint",
    "require_file",
    "shipped_demo_source",
    "demo_source_model",
    "demo_report",
    "demo_headline",
    "present",
    "handler_of",
    "save_weights",
    "copy_weights",
    "write_method_card",
    "adabn_checkpoint",
    "evaluation_checkpoints",
    "source_statistics_model",
]
