"""The two bundles share most of their configs. Everything they share must stay identical: a change to one
bundle's shared part fails here until the other bundle has it too. The differences each file may have are
listed (the bundle-specific keys: data geometry, network input, the source site, the demo's steps); a listed
path covers everything under it."""

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = ("aiva_brain", "aiva_prostate")

# file -> the "#"-paths (MONAI config ids) allowed to differ or to exist in one bundle only
ALLOWED = {
    "train.json": {
        "_desc_",
        "bundle_root",
        "cluster_options#precision",  # brain: cpu_bfloat16 (3-seed ixi-sim evidence); prostate: auto (none)
        "context_slices",
        "datalist_file",
        "demo_report",
        "demo_source",
        "network_def#in_channels",
        "output_dir",
        "presets#demo#in_plane_size",
        "presets#demo#pixdim",
        "presets#demo#source_checkpoint",
        "presets#real#in_plane_size",
        "presets#real#max_steps",
        "presets#real#pixdim",
        "presets#real#source_checkpoint",
        "slice_axis",
        "source",
        "source_checkpoint",
        "source_model_check",
        "train#handlers#1#group_key",
        "train#preprocessing#context_slices",
        "train#preprocessing#intensity",
        "train#preprocessing#merge_labels",
        "validate#preprocessing#context_slices",
        "validate#preprocessing#intensity",
        "validate#preprocessing#merge_labels",
        "work_dir",
    },
    "evaluate.json": {
        "_desc_",
        "evaluation#scoring#largest_component",
        "evaluation#notes",
        "largest_component",
        "tolerances_mm",
    },
    "pretrain.json": {
        "_desc_",
        "bundle_root",
        "context_slices",
        "datalist_file",
        "network_def#in_channels",
        "output_dir",
        "presets#demo#in_plane_size",
        "presets#demo#pixdim",
        "presets#real#in_plane_size",
        "presets#real#max_steps",
        "presets#real#pixdim",
        "slice_axis",
        "source",
        "target",
        "target_site",
        "train#preprocessing#context_slices",
        "train#preprocessing#intensity",
        "train#preprocessing#merge_labels",
        "validate#preprocessing#context_slices",
        "validate#preprocessing#intensity",
        "validate#preprocessing#merge_labels",
        "work_dir",
    },
    "inference.json": {
        "_desc_",
        "bundle_root",
        "context_slices",
        "dicom_seg#property_type",
        "in_plane_size#0",
        "in_plane_size#1",
        "mask_suffix",
        "network_def#in_channels",
        "organ",
        "pixdim#0",
        "pixdim#1",
        "pixdim#2",
        "preprocessing#transforms#1#context_slices",
        "preprocessing#transforms#1#intensity",
        "slice_axis",
        "volume_range_ml#0",
        "volume_range_ml#1",
    },
    "multi_gpu_train.json": {"datalist_file", "demo_report", "demo_source"},
    "sgd_nesterov.json": set(),
    "methods/adabn.json": set(),
    "methods/adaptsegnet.json": set(),
    "methods/aiva+adabn.json": set(),
    "methods/aiva_v1.json": set(),
    "methods/oracle.json": {"_desc_", "selection_rule"},
    "methods/segjdot.json": set(),
    "methods/source.json": set(),
}


def differences(a, b, path=()):
    """The "#"-paths where two parsed JSON trees differ (a key in one only counts as a difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield "#".join((*path, key))
            else:
                yield from differences(a[key], b[key], (*path, key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, (*path, str(index)))
    elif a != b:
        yield "#".join(path)


def allowed(path: str, listed: set) -> bool:
    """Whether ``path`` is a listed path or lies under one."""
    return any(path == item or path.startswith(item + "#") for item in listed)


def test_allowed_covers_sub_paths_only():
    assert allowed("presets#demo#pixdim#0", {"presets#demo#pixdim"}) and allowed("pixdim", {"pixdim"})
    assert not allowed("presets#demo#pixdimension", {"presets#demo#pixdim"})
    assert not allowed("presets", {"presets#demo"})


def test_differences_finds_what_differs():
    assert list(differences({"a": 1, "b": [1, {"c": 2}]}, {"a": 1, "b": [1, {"c": 3}], "d": 0})) == ["b#1#c", "d"]


def test_every_shared_config_file_is_listed():
    files = [
        {str(p.relative_to(CONFIGS / b / "configs")) for p in (CONFIGS / b / "configs").rglob("*.json")}
        for b in BUNDLES
    ]
    shared = {f for f in files[0] & files[1] if not f.startswith("datalist") and f != "metadata.json"}
    assert shared == set(ALLOWED), f"list the shared config files here: {sorted(shared ^ set(ALLOWED))}"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_shared_parts_are_identical(name):
    brain, prostate = (json.loads((CONFIGS / b / "configs" / name).read_text(encoding="utf-8")) for b in BUNDLES)
    unexpected = sorted(path for path in differences(brain, prostate) if not allowed(path, ALLOWED[name]))
    assert not unexpected, f"{name}: the bundles differ at {unexpected}; change both (or list a bundle-specific key)"


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("name", ["train.json", "pretrain.json"])
def test_the_demo_switch_picks_one_preset(bundle, name, tmp_path):
    """`demo` (the datalist says SYNTHETIC) is read by `preset` alone: every preset setting follows it, and a
    top-level override still wins."""
    import copy

    from monai.bundle import ConfigParser

    config = json.loads((CONFIGS / bundle / "configs" / name).read_text(encoding="utf-8"))
    presets = config["presets"]
    assert set(presets) == {"demo", "real"} and presets["demo"].keys() == presets["real"].keys()
    for synthetic, chosen in ((True, "demo"), (False, "real")):
        datalist = tmp_path / f"datalist_{chosen}.json"
        datalist.write_text(json.dumps({"synthetic": True} if synthetic else {}))
        paths = {"datalist": str(datalist), "output_dir": str(tmp_path), "bundle_root": str(tmp_path)}
        parser = ConfigParser(copy.deepcopy(config))
        parser.update(paths)
        assert parser.get_parsed_content("demo") is synthetic
        for key, value in presets[chosen].items():
            if not str(value).startswith("$"):
                assert parser.get_parsed_content("preset")[key] == value, (bundle, name, chosen, key)
                if key in config:
                    assert parser.get_parsed_content(key) == value, (bundle, name, chosen, key)
        if "source_checkpoint" in presets[chosen]:  # brain: the demo's own source model, else the shipped one
            expected = f"{tmp_path}/demo_source/model.pt" if synthetic else f"{tmp_path}/models/model.pt"
            assert parser.get_parsed_content("source_checkpoint") == expected
        parser = ConfigParser(copy.deepcopy(config))
        parser.update({**paths, "max_steps": 7})
        assert parser.get_parsed_content("max_steps") == 7


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_bundle_requires_the_library_version_it_ships_with(bundle):
    """The configs call ``aiva_monai`` helpers that older releases lack: metadata.json names this version."""
    import aiva_monai

    metadata = json.loads((CONFIGS / bundle / "configs" / "metadata.json").read_text())
    assert metadata["required_packages_version"]["aiva-monai"] == aiva_monai.__version__
