import os
from pathlib import Path

import pytest

IXI_ROOT = Path(
    os.environ.get("AIVA_IXI_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi_hh")
)


@pytest.fixture(scope="session")
def ixi_root() -> Path:
    if not (IXI_ROOT / "images").is_dir():
        pytest.skip(f"real IXI-HH data not found at {IXI_ROOT} (set AIVA_IXI_ROOT to its folder to run this test)")
    return IXI_ROOT
