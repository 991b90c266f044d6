"""aiva-monai: unsupervised site adaptation of MRI segmentation models (AIVA) on MONAI."""

__version__ = "0.1.0"
