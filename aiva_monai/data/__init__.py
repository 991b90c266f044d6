from aiva_monai.data.cc359 import CC359_SITES, cc359_datalist, find_cc359, write_cc359_datalist
from aiva_monai.data.datalist import load_datalist, sites_of
from aiva_monai.data.demo import DEMO_SITES, make_demo_dataset
from aiva_monai.data.ixi import ixi_datalist, ixi_sim_datalist
from aiva_monai.data.prostate import (
    PROSTATE_SITES,
    find_prostate,
    make_prostate_demo,
    prostate_datalist,
    write_prostate_datalist,
)
from aiva_monai.data.samplers import SeededEndlessSampler
from aiva_monai.data.simulate import PRESETS, ScannerChange, SimulateScannerd, simulate_scanner
from aiva_monai.data.slices import SliceDataset
from aiva_monai.data.transforms import NeighbourSlicesd, volume_transforms

__all__ = [
    "CC359_SITES",
    "DEMO_SITES",
    "NeighbourSlicesd",
    "PROSTATE_SITES",
    "PRESETS",
    "ScannerChange",
    "SeededEndlessSampler",
    "SimulateScannerd",
    "SliceDataset",
    "cc359_datalist",
    "find_cc359",
    "find_prostate",
    "ixi_datalist",
    "ixi_sim_datalist",
    "load_datalist",
    "make_demo_dataset",
    "make_prostate_demo",
    "prostate_datalist",
    "simulate_scanner",
    "sites_of",
    "volume_transforms",
    "write_cc359_datalist",
    "write_prostate_datalist",
]
