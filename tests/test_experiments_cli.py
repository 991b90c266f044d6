"""`python -m aiva_monai.experiments run --set`: every override reaches the runner, however the flags are spelled,
and a malformed or repeated key stops the run before anything is written."""

import json

import pytest

import aiva_monai.experiments.cli as cli
from aiva_monai.experiments import main


@pytest.fixture
def captured(tmp_path, monkeypatch):
    seen = {}

    def fake_run_matrix(cells, output, runner, keep_going):
        seen["overrides"] = runner.overrides
        return {"ran": [], "skipped": [], "failed": []}

    monkeypatch.setattr(cli, "run_matrix", fake_run_matrix)
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": []}))
    argv = ["run", "--preset", "ixi-sim", "--datalist", str(datalist), "--dataset_dir", str(tmp_path)]
    return seen, [*argv, "--output", str(tmp_path / "o"), "--methods", "source"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--set", "lambda_multiplier=0", "--set", "cluster_options#match_space=pca"],
        ["--set", "lambda_multiplier=0", "cluster_options#match_space=pca"],
    ],
)
def test_every_set_override_reaches_the_runner(captured, flags):
    seen, argv = captured
    assert main([*argv, *flags]) == 0
    assert seen["overrides"] == {"lambda_multiplier": 0, "cluster_options#match_space": "pca"}


def test_values_are_json_when_they_parse_and_may_hold_an_equals_sign(captured):
    seen, argv = captured
    flags = ["--set", 'frozen_modules=["decoder"]', 'cluster_options={"k": 2}', "notes=a=b", "amp=false"]
    assert main([*argv, *flags]) == 0
    expected = {"frozen_modules": ["decoder"], "cluster_options": {"k": 2}, "notes": "a=b", "amp": False}
    assert seen["overrides"] == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "lambda_multiplier"], "expected KEY=VALUE"),
        (["--set", "=3"], "expected KEY=VALUE"),
        (["--set", "lambda_multiplier="], "expected KEY=VALUE"),
        (["--set", "cluster_options#k=2", "--set", "cluster_options::k=3"], "given twice"),
        (["--set", "lambda_multiplier=0", "--set", "lambda_multiplier=1"], "given twice"),
    ],
)
def test_a_malformed_or_repeated_override_stops_before_running(captured, flags, message, tmp_path):
    seen, argv = captured
    with pytest.raises(SystemExit, match=message):
        main([*argv, *flags])
    assert "overrides" not in seen and not (tmp_path / "o").exists()


def test_a_bad_override_stops_before_the_scanner_datalist_is_written(tmp_path):
    out = tmp_path / "o"
    argv = ["run", "--preset", "ixi-sim", "--scanner", "bright", "--dataset_dir", str(tmp_path), "--output", str(out)]
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        main([*argv, "--set", "lambda_multiplier"])
    assert not out.exists()
