"""A bundle is found from the ``--config_file`` of its command, wherever the command runs and wherever the
package is installed (issue 12: no dependence on the repository checkout)."""

import json
import shutil
from pathlib import Path

import pytest

from aiva_monai.bundle import config_file_folders, locate_bundle_root

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "aiva_brain"


def test_config_file_folders_reads_every_form_of_the_option(tmp_path):
    a, b = tmp_path / "x" / "configs" / "train.json", tmp_path / "x" / "configs" / "methods" / "adabn.json"
    assert config_file_folders(["run", "--config_file", str(a)]) == [a.parent]
    assert config_file_folders(["run", f"--config_file={a},{b}"]) == [a.parent, b.parent]
    assert config_file_folders(["run", "--config_file", json.dumps([str(a), str(b)])]) == [a.parent, b.parent]
    assert config_file_folders(["run", "--other", str(a)]) == []


@pytest.mark.parametrize("config", ["train.json", "methods/adabn.json"])
def test_a_copied_bundle_is_found_from_its_config_path(tmp_path, monkeypatch, config):
    copy = tmp_path / "somewhere" / "my_bundle"
    shutil.copytree(BUNDLE / "configs", copy / "configs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr("sys.argv", ["monai.bundle", "run", "--config_file", str(copy / "configs" / config)])
    assert locate_bundle_root("aiva_brain") == str(copy.resolve())
    monkeypatch.setattr("sys.argv", ["monai.bundle", "run"])  # no config path: the checkout's bundle
    assert locate_bundle_root("aiva_brain") == str(BUNDLE.resolve())
