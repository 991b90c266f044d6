"""The brain bundle's shipped demo source model: used only when it matches the demo data and pretraining
settings of today's code, copied (never written to), and recorded with a checksum."""

import hashlib
import json
from pathlib import Path

import pytest

from aiva_monai.bundle import SHIPPED_DEMO_SOURCE, demo_source_model, shipped_demo_source
from aiva_monai.data.demo import DEMO_VERSION

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "aiva_brain"
MODEL = BUNDLE / SHIPPED_DEMO_SOURCE
RECORD = MODEL.with_suffix(".json")


def datalist(folder: Path, version) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({"synthetic": True, "demo_version": version}))
    return path


def train_config_pretrain_steps() -> int:
    return json.loads((BUNDLE / "configs" / "train.json").read_text())["demo_pretrain_steps"]


def test_record_matches_the_shipped_model_and_todays_demo():
    record = json.loads(RECORD.read_text())
    assert record["demo_version"] == DEMO_VERSION, "demo data changed: pretrain and ship a new demo source model"
    assert record["max_steps"] == train_config_pretrain_steps()
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == record["sha256"]


def test_used_only_when_data_version_and_steps_match(tmp_path):
    steps = json.loads(RECORD.read_text())["max_steps"]
    assert shipped_demo_source(BUNDLE, datalist(tmp_path, DEMO_VERSION), steps) == MODEL
    assert shipped_demo_source(BUNDLE, datalist(tmp_path, DEMO_VERSION + 1), steps) is None
    assert shipped_demo_source(BUNDLE, datalist(tmp_path, DEMO_VERSION), steps + 1) is None
    assert shipped_demo_source(tmp_path, datalist(tmp_path, DEMO_VERSION), steps) is None  # a bundle without one


def test_demo_source_model_copies_the_shipped_model(tmp_path):
    before = MODEL.read_bytes()
    steps = json.loads(RECORD.read_text())["max_steps"]
    target = tmp_path / "run" / "demo_source" / "model.pt"
    assert demo_source_model(BUNDLE, target, datalist(tmp_path, DEMO_VERSION), max_steps=steps) == str(target)
    assert target.read_bytes() == before
    assert MODEL.read_bytes() == before
    assert not target.is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]  # no temporary left


@pytest.mark.parametrize("overrides", [{"target_site": "B"}])
def test_overrides_never_take_the_shipped_model(tmp_path, overrides, monkeypatch):
    calls = []
    monkeypatch.setattr("monai.bundle.run", lambda **kwargs: calls.append(kwargs))
    steps = json.loads(RECORD.read_text())["max_steps"]
    with pytest.raises(RuntimeError, match="without writing"):
        demo_source_model(BUNDLE, tmp_path / "m.pt", datalist(tmp_path, DEMO_VERSION), max_steps=steps, **overrides)
    assert len(calls) == 1 and calls[0]["target_site"] == "B"


def test_demo_headline_compares_the_adapted_model_with_source_and_adabn(tmp_path):
    from aiva_monai.bundle import demo_headline

    rows = [
        "model,set,subject,dice",
        "source,target test,a,0.80",
        "source,target test,b,0.90",
        "source,source test,c,0.10",
        "adabn,target test,a,0.90",
        "adabn,target test,b,0.90",
        "adapted (target_agreement),target test,a,0.95",
        "adapted (target_agreement),target test,b,0.95",
        "adapted (last),target test,a,0.10",
        "adapted (last),target test,b,0.10",
    ]
    (tmp_path / "evaluation.csv").write_text("\n".join(rows) + "\n")
    assert demo_headline(tmp_path / "evaluation.csv") == (
        "target test dice: source 85.00, AdaBN 90.00, adapted (target_agreement) 95.00 "
        "(+10.00 vs source, +5.00 vs AdaBN)"
    )
    assert demo_headline(tmp_path / "missing.csv") == ""
