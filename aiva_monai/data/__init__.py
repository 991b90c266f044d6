from aiva_monai.data.ixi import ixi_datalist
from aiva_monai.data.slices import SliceDataset
from aiva_monai.data.transforms import volume_transforms

__all__ = ["SliceDataset", "ixi_datalist", "volume_transforms"]
