"""Runs a module or script (``python tests/without_aiva_monai.py monai.bundle run ...``, ``... tests/zoo_verify.py
BUNDLE``) in a Python where ``aiva_monai``
cannot be imported, as in a fresh environment that has only a zoo bundle's declared packages: an import of
``aiva_monai`` (installed, editable or on the path) raises ModuleNotFoundError. The current folder is put
first on ``sys.path`` (as ``python -m`` does), so a bundle's ``scripts`` package is found from its folder."""

import importlib.abc
import os
import runpy
import sys


class BlockAivaMonai(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "aiva_monai" or fullname.startswith("aiva_monai."):
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (blocked: the bundle must not need aiva_monai)", name=fullname
            )
        return None


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (here, os.path.dirname(here))]
    sys.path.insert(0, os.getcwd())
    sys.meta_path.insert(0, BlockAivaMonai())
    target, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
