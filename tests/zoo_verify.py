"""The model zoo's bundle checks in full mode, written for this project (the zoo's ``ci/verify_bundle.py`` runs
the same kinds of checks; this is not its code), offline and on CPU:

1. directory: ``configs/metadata.json`` and ``LICENSE`` required, ``models/model.pt`` and
   ``configs/inference.{json,yaml,yml}`` expected; a ``large_files.{yml,yaml,json}`` entry needs a path, a url
   and a hash (nothing is downloaded here);
2. version: ``version`` and ``changelog`` present, the version listed in the changelog;
3. metadata: valid against the schema (an offline copy, ``--schema``); every required package an installed
   distribution (what a fresh environment installs from the package index), none of them aiva-monai;
4. properties: ``create_workflow`` of the inference config (workflow type "infer") and of ``train.json``
   ("train"), with no data arguments, initialise and ``check_properties()`` returns no missing property
   (the zoo checks the apps of ``supported_apps``; these bundles declare none, so MONAI's own property lists
   are checked);
5. data shape: ``verify_net_in_out`` of ``network_def`` on the metadata's input shape;
6. TorchScript: ``ckpt_export`` of ``models/model.pt`` loads with ``torch.jit.load`` and agrees with the eager
   network; a shipped ``models/model.ts`` loads.

    python tests/zoo_verify.py exported/aiva_brain --schema bundles/schema/meta_schema.json

It imports only monai, torch and jsonschema (and the bundle's own ``scripts/``, through its configs), so it
can run where aiva-monai is not installed (``tests/without_aiva_monai.py``). Exit code 0 when every check
passes; an exception names the first that fails.
"""

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import jsonschema
import torch
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_net_in_out

CONFIG_SUFFIXES = ("json", "yaml", "yml")


def _config(folder: Path, stem: str) -> Path | None:
    for suffix in CONFIG_SUFFIXES:
        if (folder / f"{stem}.{suffix}").is_file():
            return folder / f"{stem}.{suffix}"
    return None


def check_directory(bundle: Path) -> None:
    for required in ("configs/metadata.json", "LICENSE"):
        if not (bundle / required).is_file():
            raise ValueError(f"{bundle}: required file {required} is missing.")
    if not (bundle / "models" / "model.pt").is_file():
        raise ValueError(f"{bundle}: models/model.pt is missing (the zoo expects weights).")
    if _config(bundle / "configs", "inference") is None:
        raise ValueError(f"{bundle}: no configs/inference.json (or .yaml / .yml).")
    large = _config(bundle, "large_files")
    if large is not None:
        text = large.read_text(encoding="utf-8")
        for key in ("path:", "url:", "hash_val:"):
            if key not in text:
                raise ValueError(f"{large}: an entry without {key}")


def check_version(meta: dict, bundle: Path) -> None:
    for key in ("version", "changelog"):
        if key not in meta:
            raise ValueError(f"{bundle}: '{key}' missing in configs/metadata.json.")
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"{bundle}: version {meta['version']} is not in the changelog.")


def check_metadata(meta: dict, schema: Path, bundle: Path) -> None:
    jsonschema.validate(meta, json.loads(schema.read_text(encoding="utf-8")))
    for name, version in meta.get("required_packages_version", {}).items():
        if name.lower().replace("_", "-") == "aiva-monai":
            raise ValueError(f"{bundle}: metadata requires aiva-monai, which is not on the package index.")
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"{bundle}: required package {name}=={version} is not an installed distribution."
            ) from None


def check_properties(bundle: Path) -> None:
    meta, logging_file = bundle / "configs" / "metadata.json", bundle / "configs" / "logging.conf"
    for stem, kind in (("inference", "infer"), ("train", "train")):
        config = _config(bundle / "configs", stem)
        if config is None:
            continue
        workflow = create_workflow(
            config_file=str(config),
            workflow_type=kind,
            meta_file=str(meta),
            logging_file=str(logging_file),
            bundle_root=str(bundle),
        )
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"{config}: missing {kind} properties {missing}.")


def check_data_shape(bundle: Path) -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(_config(bundle / "configs", "inference")),
        bundle_root=str(bundle),
        device="cpu",
        n=1,
    )


def check_torchscript(bundle: Path) -> None:
    config, meta = _config(bundle / "configs", "inference"), bundle / "configs" / "metadata.json"
    exported = bundle / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(meta),
        config_file=str(config),
        bundle_root=str(bundle),
    )
    scripted = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def").eval()
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    shape = json.loads(meta.read_text(encoding="utf-8"))["network_data_format"]["inputs"]["image"]
    sample = torch.rand(1, shape["num_channels"], *shape["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float((scripted(sample) - network(sample)).abs().max())
    if difference > 1e-4:
        raise ValueError(f"{bundle}: the TorchScript export differs from the eager network by {difference}.")
    if (bundle / "models" / "model.ts").is_file():
        torch.jit.load(str(bundle / "models" / "model.ts"))


def verify(bundle, schema) -> None:
    bundle, schema = Path(bundle).resolve(), Path(schema).resolve()
    sys.path.insert(0, str(bundle))  # the bundle's scripts/, as the zoo's check does
    os.chdir(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    for name, check in (
        ("directory", lambda: check_directory(bundle)),
        ("version and changelog", lambda: check_version(meta, bundle)),
        ("metadata", lambda: check_metadata(meta, schema, bundle)),
        ("properties", lambda: check_properties(bundle)),
        ("data shape", lambda: check_data_shape(bundle)),
        ("TorchScript", lambda: check_torchscript(bundle)),
    ):
        check()
        print(f"zoo check passed: {name}", flush=True)
    print(f"{bundle.name}: all zoo checks passed", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the model zoo's bundle checks (full mode), offline")
    parser.add_argument("bundle")
    parser.add_argument("--schema", required=True, help="offline copy of the metadata schema")
    arguments = parser.parse_args()
    verify(arguments.bundle, arguments.schema)
