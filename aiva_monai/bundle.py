"""Helpers the bundle configs call: locating the bundle, resolving data, the built-in demo."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from pathlib import Path

import jsonschema

from aiva_monai.data.cc359 import find_cc359, write_cc359_datalist
from aiva_monai.data.datalist import load_datalist
from aiva_monai.data.demo import DEMO_SITES, make_demo_dataset
from aiva_monai.data.prostate import find_prostate, make_prostate_demo, write_prostate_datalist

__all__ = [
    "locate_bundle_root",
    "resolve_datalist",
    "datalist_base_dir",
    "is_synthetic",
    "default_site",
    "other_sites",
    "entries",
    "unlabelled_slices",
    "latest_checkpoint",
    "require_file",
    "demo_source_model",
    "demo_report",
    "verify_metadata",
    "present",
    "handler_of",
    "save_weights",
    "copy_weights",
    "write_method_card",
    "adabn_checkpoint",
    "evaluation_checkpoints",
]

logger = logging.getLogger(__name__)
REPOSITORY = Path(__file__).resolve().parents[1]


def config_file_folders(argv: list[str] | None = None) -> list[Path]:
    """The folders holding the ``--config_file`` files of this process's command line (``python -m
    monai.bundle run --config_file ...``: one path, a comma-separated list or a list literal), so that a
    bundle is found from its own configs wherever it lies and wherever the package is installed."""
    argv = sys.argv if argv is None else argv
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config_file"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config_file=")]
    folders: list[Path] = []
    for value in values:
        try:
            files = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            files = value
        for file in [files] if isinstance(files, str) else files:
            for part in str(file).split(","):
                if part.strip():
                    folders.append(Path(part.strip()).expanduser().resolve().parent)
    return folders


def locate_bundle_root(name: str) -> str:
    """The bundle folder: the bundle whose ``configs/`` holds a ``--config_file`` of this command (or is above
    it, for ``configs/methods/``), else the current folder if it is that bundle, else ``./bundles/<name>``,
    else the one beside the package (an editable install of this repository), else the folder holding this
    package (a zoo export, where this code is the bundle's ``scripts/``). ``--bundle_root`` overrides it."""
    from_configs = [folder.parents[i] for folder in config_file_folders() for i in range(min(2, len(folder.parents)))]
    candidates = [*from_configs, Path.cwd(), Path.cwd() / "bundles" / name, REPOSITORY / "bundles" / name, REPOSITORY]
    for candidate in candidates:
        meta = candidate / "configs" / "metadata.json"
        if meta.is_file() and json.loads(meta.read_text()).get("name") == name:
            return str(candidate.resolve())
    raise FileNotFoundError(f"bundle '{name}' not found in {[str(c) for c in candidates]}: pass --bundle_root.")


# layout -> (finder of the release's files, datalist writer, SYNTHETIC demo maker, what the files look like)
LAYOUTS = {
    "cc359": (
        find_cc359,
        write_cc359_datalist,
        make_demo_dataset,
        "CC359 files (CCxxxx_<vendor>_<field>_<age>_<sex>.nii.gz)",
    ),
    "prostate": (
        find_prostate,
        write_prostate_datalist,
        make_prostate_demo,
        "prostate site folders (ISBI, ISBI_1.5, I2CVB, UCL, BIDMC, HK) with CaseNN.nii.gz",
    ),
}


def resolve_datalist(dataset_dir, datalist, output_dir, demo_dir=None, layout: str = "cc359") -> str:
    """Path of the datalist JSON to use.

    - ``datalist`` given: that file (a datalist JSON, see ``aiva_monai.data.datalist``);
    - no ``dataset_dir``: the built-in SYNTHETIC demo set of ``layout``, made under ``demo_dir``
      (default ``<output_dir>/demo_data``) on first use;
    - ``dataset_dir`` holding ``datalist.json``: that file;
    - ``dataset_dir`` holding the release files of ``layout`` ("cc359": per-site 45/5/10 split;
      "prostate": per-site 60/15/25 % split): a datalist written to ``<output_dir>/datalist_<layout>.json``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown data layout {layout!r}; layouts: {sorted(LAYOUTS)}.")
    finder, writer, demo_maker, looks_like = LAYOUTS[layout]
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} does not exist.")
        return str(path)
    if not dataset_dir:
        return str(demo_maker(Path(demo_dir or Path(output_dir) / "demo_data")))
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset_dir {dataset_dir} does not exist.")
    if (dataset_dir / "datalist.json").is_file():
        return str(dataset_dir / "datalist.json")
    try:
        finder(dataset_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir}: no {looks_like} and no datalist.json; pass --datalist with a datalist JSON."
        ) from None
    return str(writer(dataset_dir, Path(output_dir) / f"datalist_{layout}.json"))


def is_synthetic(datalist_file) -> bool:
    """True for the built-in SYNTHETIC demo set (its datalist says so); the configs then use demo settings."""
    return bool(json.loads(Path(datalist_file).read_text()).get("synthetic", False))


def datalist_base_dir(dataset_dir, datalist_file) -> str:
    """Relative paths in a datalist are relative to ``dataset_dir`` when given, else to the JSON's folder."""
    return str(Path(dataset_dir) if dataset_dir else Path(datalist_file).parent)


def default_site(datalist_file, role: str, site=None):
    """``site`` if given, else the datalist's ``default_<role>_site`` (role: "source" or "target")."""
    if site:
        return site
    content = json.loads(Path(datalist_file).read_text())
    found = content.get(f"default_{role}_site")
    if found is None and content.get("synthetic"):
        found = DEMO_SITES[0] if role == "source" else DEMO_SITES[1]
    if found is None:
        sites = sorted({e.get("site") for split in ("training", "validation", "test") for e in content.get(split, [])})
        raise ValueError(f"no --{role}_site given and {datalist_file} names no default; sites: {sites}.")
    return found


def other_sites(datalist_file, target: str, sites=None) -> list[str]:
    """Leave-one-site-out sources: ``sites`` if given (a list, or one comma-separated string), else every
    site of the datalist's training split except ``target``. Their union is one source for the clustering."""
    if sites:
        chosen = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else [str(s) for s in sites]
        if target in chosen:
            raise ValueError(f"the target site {target} is also listed as a source site ({chosen}).")
        return chosen
    content = json.loads(Path(datalist_file).read_text())
    chosen = sorted({e.get("site") for e in content.get("training", []) if e.get("site") and e.get("site") != target})
    if not chosen:
        raise ValueError(f"{datalist_file}: no training site other than the target {target}.")
    return chosen


def entries(datalist_file, split, sites, base_dir, labels: bool = True) -> list[dict]:
    """Datalist entries; with ``labels=False`` the ``label`` key is removed, so no code path can read a
    target label (adaptation never sees one)."""
    found = load_datalist(datalist_file, split, sites, base_dir=base_dir, require_labels=labels)
    return found if labels else [{k: v for k, v in e.items() if k != "label"} for e in found]


def unlabelled_slices(datalist_file, split, site, base_dir, transform, slice_axis: int = 0):
    """The image slices of ``site``'s ``split`` subjects with their labels removed (a ``SliceDataset`` of the key
    "image" only), e.g. held-out target slices for label-free model selection; None when that split holds no
    subject of ``site``."""
    from aiva_monai.data import SliceDataset

    content = json.loads(Path(datalist_file).read_text())
    sites = {site} if isinstance(site, str) else set(site)
    if not any(entry.get("site") in sites for entry in content.get(split, [])):
        return None
    found = load_datalist(datalist_file, split, site, base_dir=base_dir, require_labels=False)
    data = [{k: v for k, v in e.items() if k != "label"} for e in found]
    return SliceDataset(data, transform, keys=("image",), slice_axis=slice_axis, progress=False)


def require_file(path, what: str) -> str:
    """``path`` if it is a file, else FileNotFoundError naming it and ``what`` it should be."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist ({what}).")
    return str(path)


def latest_checkpoint(folder) -> str | None:
    """Newest ``checkpoint_*.pt`` in ``folder`` by its iteration number (for resuming), or None."""
    folder = Path(folder)
    found = []
    for path in folder.glob("checkpoint*.pt"):
        numbers = re.findall(r"(\d+)", path.stem)
        found.append((int(numbers[-1]) if numbers else -1, path))
    return str(max(found)[1]) if found else None


SHIPPED_DEMO_SOURCE = "models/demo_source.pt"  # a bundle's pretrained demo source model, beside its record (.json)


def shipped_demo_source(bundle_root, datalist_file, max_steps: int) -> Path | None:
    """The bundle's shipped demo source model, if it was pretrained exactly as ``demo_source_model`` would
    pretrain now: same synthetic data version (the datalist's ``demo_version``) and ``max_steps``; else None."""
    model = Path(bundle_root) / SHIPPED_DEMO_SOURCE
    record = model.with_suffix(".json")
    if not (model.is_file() and record.is_file()):
        return None
    made = json.loads(record.read_text())
    data = json.loads(Path(datalist_file).read_text())
    if made.get("demo_version") != data.get("demo_version") or made.get("max_steps") != int(max_steps):
        return None
    return model


def demo_source_model(bundle_root, model_path, datalist_file, max_steps: int = 300, **overrides) -> str:
    """The demo's source model at ``model_path``: a copy of the bundle's shipped demo source model when it
    matches (``shipped_demo_source``; no overrides), else pretrain.json run once (``max_steps``, plus
    ``overrides`` such as ``target_site``) on the SYNTHETIC source site(s)."""
    model = Path(model_path)
    if not model.is_file():
        shipped = None if overrides else shipped_demo_source(bundle_root, datalist_file, max_steps)
        if shipped is not None:
            import shutil

            from aiva_monai.io import atomic_path

            logger.info(
                f"demo: source model = {shipped} (pretrain.json on the synthetic source site, {max_steps} steps; "
                f"delete {model} and pass --demo_pretrain_steps N to pretrain one here)"
            )
            model.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(model) as temporary:
                shutil.copyfile(shipped, temporary)
        else:
            from monai.bundle import run

            logger.info(f"demo: pretraining a source model on the synthetic source site into {model.parent}")
            run(
                config_file=str(Path(bundle_root) / "configs" / "pretrain.json"),
                output_dir=str(model.parent),
                datalist=str(datalist_file),
                max_steps=int(max_steps),
                epoch_length=min(100, int(max_steps)),
                **overrides,
            )
    if not model.is_file():
        raise RuntimeError(f"demo pretraining finished without writing {model}.")
    return str(model)


def demo_report(bundle_root, output_dir, datalist_file, **overrides) -> dict:
    """After the demo's adaptation: run the evaluate overlay (source and adapted model on the synthetic
    target and source test subjects) and print the scores."""
    from monai.bundle import run

    configs = Path(bundle_root) / "configs"
    run(
        config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
        output_dir=str(output_dir),
        datalist=str(datalist_file),
        **overrides,
    )
    summary = Path(output_dir) / "evaluation" / "summary.md"
    headline = demo_headline(summary.parent / "evaluation.csv")
    print(f"\nSYNTHETIC demo finished: scores above, also in {summary}; figures in {summary.parent}.")
    if headline:
        print(headline)
    return {"summary": str(summary), "headline": headline}


def demo_headline(evaluation_csv, metric: str = "dice") -> str:
    """One line: the target test mean ``metric`` of the source model, AdaBN and the adapted model (the configured
    rule's pick, the row whose name holds "adapted" and comes first), and the adapted model's margins over both."""
    import csv

    path = Path(evaluation_csv)
    if not path.is_file():
        return ""
    scores: dict[str, list[float]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("set") == "target test" and row.get(metric) not in (None, ""):
                scores.setdefault(row["model"], []).append(float(row[metric]))
    means = {model: 100 * sum(values) / len(values) for model, values in scores.items()}
    adapted = next((model for model in means if model.startswith("adapted")), None)
    if adapted is None or "source" not in means:
        return ""
    line = f"target test {metric}: source {means['source']:.2f}"
    if "adabn" in means:
        line += f", AdaBN {means['adabn']:.2f}"
    line += f", {adapted} {means[adapted]:.2f} ({means[adapted] - means['source']:+.2f} vs source"
    if "adabn" in means:
        line += f", {means[adapted] - means['adabn']:+.2f} vs AdaBN"
    return line + ")"


def verify_metadata(meta_file, schema_file=REPOSITORY / "bundles" / "schema" / "meta_schema.json") -> None:
    """Validate a bundle's metadata.json against the schema shipped in this repository (offline)."""
    meta = json.loads(Path(meta_file).read_text())
    schema = json.loads(Path(schema_file).read_text())
    jsonschema.validate(meta, schema)
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"{meta_file}: version {meta['version']} has no changelog entry.")


# -- method overlays (configs/methods/*.json) ---------------------------------------------------------------


def handler_of(handlers, type_name: str):
    """The handler of ``handlers`` whose class is named ``type_name``, or None (it is switched off): configs refer
    to a handler of a list by what it is, not by its position in the list."""
    found = [h for h in handlers if type(h).__name__ == type_name]
    if len(found) > 1:
        raise ValueError(f"{len(found)} handlers of type {type_name} in the list: name one by position instead.")
    return found[0] if found else None


def present(mapping: dict) -> dict:
    """``mapping`` without its None values: a method overlay sets the checkpoint entries it does not use
    (e.g. AIVA's clustering state) to None, and the savers / loaders get the rest."""
    return {key: value for key, value in dict(mapping).items() if value is not None}


def save_weights(network, path) -> str:
    """The network's state dict written atomically to ``path`` (bare, like the model-zoo ``model.pt``)."""
    import torch

    from aiva_monai.io import atomic_path
    from aiva_monai.networks import _unwrap

    with atomic_path(path) as temporary:
        torch.save(_unwrap(network).state_dict(), temporary)
    return str(path)


def copy_weights(source, path) -> str:
    """The ``source`` checkpoint's network weights (bare, or under "model"/"network") saved as ``path``:
    the ``source`` method's "adapted" model is the source model itself."""
    import torch

    from aiva_monai.evaluation import read_network_weights
    from aiva_monai.io import atomic_path

    state = read_network_weights(source)
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return str(path)


def adabn_checkpoint(network, source_checkpoint, apply_adabn, path) -> str:
    """The AdaBN baseline beside an adaptation run: ``source_checkpoint``'s weights with ``apply_adabn(network)``
    (e.g. ``@adabn#apply``) re-estimating the BatchNorm statistics on the unlabelled target training slices,
    saved to ``path`` (made once; a second call reuses the file)."""
    from aiva_monai.evaluation import load_network_weights

    if not Path(path).is_file():
        load_network_weights(network, source_checkpoint)
        apply_adabn(network)
        save_weights(network, path)
    return str(path)


def evaluation_checkpoints(output_dir, source_checkpoint, adabn=None, method: str = "adapted") -> dict:
    """{model name: checkpoint} for evaluate.json: the source model, the AdaBN baseline (when given), and every
    selection rule's pick of the run in ``output_dir`` (its ``selection.json``), one entry per distinct file
    named ``"<method> (<rules>)"``, the configured rule first and marked as the run's model; without a
    ``selection.json``: ``<output_dir>/model.pt`` as ``method``."""
    found = {"source": str(source_checkpoint)}
    if adabn:
        found["adabn"] = str(adabn)
    selection = Path(output_dir) / "selection.json"
    if not selection.is_file():
        found[method] = str(Path(output_dir) / "model.pt")
        return found
    content = json.loads(selection.read_text())
    by_file: dict[str, list[str]] = {}
    for rule, pick in content["picks"].items():
        by_file.setdefault(pick["file"], []).append(rule)
    default = content["picks"][content["rule"]]["file"]
    for file in sorted(by_file, key=lambda f: f != default):
        rules = sorted(by_file[file], key=lambda rule: rule != content["rule"])  # the configured rule first in its name
        found[f"{method} ({', '.join(rules)})"] = str(Path(output_dir) / file)
    return found


def write_method_card(
    output_dir, method: str, selection_rule: str, reads_target_labels: bool, selection: str | None = None, **settings
) -> str:
    """``<output_dir>/method.json``: the method of a run, whether it reads target labels, its model-selection
    rule and reference, and ``settings`` (hyper-parameters). ``reads_target_labels`` (from the overlay) must
    agree with ``aiva_monai.methods.METHODS``: only ``oracle`` reads target labels."""
    from aiva_monai.methods import METHODS
    from aiva_monai.methods import reads_target_labels as known

    if bool(reads_target_labels) != known(method):
        raise ValueError(
            f"method {method!r}: the config says reads_target_labels={reads_target_labels}, "
            f"aiva_monai.methods.METHODS says {known(method)}."
        )
    from aiva_monai.io import write_json_atomic

    card = {
        "method": method,
        "reads_target_labels": known(method),
        "selection_rule": selection_rule,
        "selection": selection,
        "summary": METHODS[method].summary,
        "reference": METHODS[method].reference,
        "settings": {
            key: (value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value))
            for key, value in settings.items()
        },
    }
    path = Path(output_dir) / "method.json"
    write_json_atomic(path, card)
    return str(path)
