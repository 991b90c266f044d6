"""ixi-sim on another simulated scanner (`run --scanner`): the same subjects as the shipped datalist, another
scanner change, and the cells' site pair follows the datalist."""

import json
from pathlib import Path

import pytest

import aiva_monai.experiments.cli as cli
from aiva_monai.experiments import main

SHIPPED = Path(__file__).resolve().parents[1] / "bundles" / "aiva_brain" / "configs" / "datalist_ixi_hh.json"


@pytest.fixture
def ixi_layout(tmp_path):
    """The shipped datalist's 185 subject files, empty: the datalist is built from the names only."""
    root = tmp_path / "ixi_hh"
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    shipped = json.loads(SHIPPED.read_text())
    for split in ("training", "validation", "test"):
        for entry in shipped[split]:
            (root / entry["image"]).touch()
            (root / entry["label"]).touch()
    return root


def test_scanner_writes_the_same_subjects_with_another_scanner_and_the_cells_follow(ixi_layout, tmp_path, monkeypatch):
    seen = {}

    def fake_run_matrix(cells, output, runner, keep_going):
        seen.update(cells=cells, datalist=runner.datalist)
        return {"ran": [], "skipped": [], "failed": []}

    monkeypatch.setattr(cli, "run_matrix", fake_run_matrix)
    out = tmp_path / "out"
    argv = ["run", "--preset", "ixi-sim", "--scanner", "bright", "--dataset_dir", str(ixi_layout), "--output", str(out)]
    assert main([*argv, "--methods", "source", "aiva", "--seeds", "0", "1"]) == 0
    assert {(c.sources, c.target) for c in seen["cells"]} == {(("ixi_hh",), "ixi_hh_simulated_bright")}
    assert len(seen["cells"]) == 4
    written = json.loads((out / "datalist_ixi_sim_bright.json").read_text())
    shipped = json.loads(SHIPPED.read_text())
    for split in ("training", "validation", "test"):
        for made, ship in zip(written[split], shipped[split], strict=True):
            assert made["subject"] == ship["subject"] and made["image"] == ship["image"]
            if ship["site"] == "ixi_hh":
                assert made == ship  # the source site is unchanged: the shipped source model still applies
            else:
                assert made["site"] == "ixi_hh_simulated_bright" and made["simulate"] == {"preset": "bright", "seed": 0}
    assert seen["datalist"] == str((out / "datalist_ixi_sim_bright.json").resolve())

    assert main([*argv[:3], "--scanner", "bright", "--subset", "2,1,1,2,1,1", "--dataset_dir", str(ixi_layout),
                 "--output", str(out / "subset"), "--methods", "source"]) == 0  # fmt: skip
    subset = json.loads(Path(seen["datalist"]).read_text())
    assert [e["site"] for e in subset["training"]] == ["ixi_hh"] * 2 + ["ixi_hh_simulated_bright"] * 2


def test_scanner_is_checked(ixi_layout, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--preset", "ixi-sim", "--scanner", "blue", "--dataset_dir", str(ixi_layout), "--output",
              str(tmp_path / "o")])  # fmt: skip
    assert stopped.value.code == 2 and "invalid choice: 'blue'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="--preset ixi-sim"):
        main(["run", "--preset", "prostate", "--scanner", "bright", "--dataset_dir", str(ixi_layout), "--output",
              str(tmp_path / "o")])  # fmt: skip


def test_a_datalist_without_default_sites_keeps_the_presets_pair(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        cli, "run_matrix", lambda cells, *a, **k: seen.update(cells=cells) or {"ran": [], "skipped": [], "failed": []}
    )
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": []}))
    argv = ["run", "--preset", "ixi-sim", "--datalist", str(datalist), "--dataset_dir", str(tmp_path)]
    assert main([*argv, "--output", str(tmp_path / "o"), "--methods", "source"]) == 0
    assert {c.target for c in seen["cells"]} == {"ixi_hh_simulated_strong"}
