"""A self-contained, model-zoo layout copy of a bundle: ``configs/``, ``models/``, ``docs/``, ``LICENSE`` and
``scripts/`` holding exactly the ``aiva_monai`` modules its configs need (renamed ``scripts``), so the copy
runs where aiva-monai is not installed (``python -m monai.bundle run`` from the copy's folder, as zoo
bundles with custom code do).

    python -m aiva_monai.zoo_export bundles/aiva_brain exported/aiva_brain
    python -m aiva_monai.zoo_export bundles/aiva_prostate exported/aiva_prostate --checkpoint runs/prostate/model.pt

What it does:

- the modules: every ``aiva_monai.<module>`` a config names (``_target_`` and ``$`` expressions), and every
  ``aiva_monai`` module those import (module level or inside functions), found by reading their source
  (``ast``); copied with ``aiva_monai`` renamed ``scripts`` in code and configs;
- ``metadata.json``: ``required_packages_version`` lists the distributions the copied code imports (the
  versions installed here; torch, MONAI and numpy have their own fields), never aiva-monai, which is not on
  the package index; ``schema`` is the model zoo's schema URL;
- files over the zoo's 25 MB limit are left out and listed in ``large_files.yml`` (path, url, hash) for
  download: give ``--large_files_url`` (the folder they will be uploaded to).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import aiva_monai
from aiva_monai.io import write_json_atomic, write_text_atomic

__all__ = [
    "export_bundle",
    "config_modules",
    "module_closure",
    "third_party_distributions",
    "ZOO_SCHEMA_URL",
    "ZOO_FILE_LIMIT_MB",
]

logger = logging.getLogger(__name__)

PACKAGE = "aiva_monai"
VENDORED = "scripts"
PACKAGE_ROOT = Path(aiva_monai.__file__).resolve().parent
# the schema the model zoo validates metadata.json against (its ci downloads it from this address)
ZOO_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
ZOO_FILE_LIMIT_MB = 25.0
# distributions with their own metadata fields, or not to list
_OWN_FIELDS = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}
_REFERENCE = re.compile(rf"\b{PACKAGE}((?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` (``aiva_monai.x.y``) in this package, or None if it is not a module."""
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    for candidate in (PACKAGE_ROOT / relative / "__init__.py", (PACKAGE_ROOT / relative).with_suffix(".py")):
        if candidate.is_file() and candidate != PACKAGE_ROOT.with_suffix(".py"):
            return candidate
    return None


def _longest_module(dotted: str) -> str | None:
    """``aiva_monai.inference.SaveMaskd`` -> ``aiva_monai.inference`` (the longest prefix that is a module)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if _module_file(name) is not None:
            return name
    return None


def config_modules(config_files) -> set[str]:
    """The ``aiva_monai`` modules named in config files (any string: ``_target_`` values, ``$`` expressions)."""
    found = {PACKAGE}
    for file in config_files:
        for match in _REFERENCE.finditer(Path(file).read_text(encoding="utf-8")):
            module = _longest_module(PACKAGE + match.group(1))
            if module:
                found.add(module)
    return found


def _imports(file: Path, module: str) -> tuple[set[str], set[str]]:
    """(aiva_monai modules, top-level third-party names) imported anywhere in ``file``."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    ours, theirs = set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                resolved = _longest_module(name)
                if resolved:
                    ours.add(resolved)
            elif name and not name.startswith("."):
                theirs.add(name.split(".")[0])
    return ours, theirs


def module_closure(modules) -> tuple[set[str], set[str]]:
    """(every aiva_monai module ``modules`` need, with the packages above them; third-party top-level imports)."""
    todo, seen, third_party = list(modules), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a.b.c runs a/__init__ and a/b/__init__
        ours, theirs = _imports(_module_file(name), name)
        todo.extend(ours - seen)
        third_party |= theirs
    stdlib = set(sys.stdlib_module_names)
    return seen, {name for name in third_party if name not in stdlib and name != PACKAGE}


def third_party_distributions(top_level: set[str]) -> dict[str, str]:
    """{distribution: installed version} providing the import names ``top_level`` (e.g. ``sklearn`` ->
    scikit-learn). ValueError naming an import no installed distribution provides."""
    providers = importlib.metadata.packages_distributions()
    found = {}
    for name in sorted(top_level):
        distributions = providers.get(name)
        if not distributions:
            if importlib.util.find_spec(name) is None:
                raise ValueError(f"the bundle's code imports {name}, which no installed distribution provides.")
            continue
        for distribution in distributions:
            found[distribution] = importlib.metadata.version(distribution)
    return found


def _vendored(text: str) -> str:
    return re.sub(rf"\b{PACKAGE}\b", VENDORED, text)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_bundle(
    bundle_dir,
    output_dir,
    checkpoint=None,
    large_files_url: str | None = None,
    file_limit_mb: float = ZOO_FILE_LIMIT_MB,
) -> Path:
    """Writes the zoo-layout copy of ``bundle_dir`` into ``output_dir`` (which must not exist or be empty).

    Args:
        checkpoint: weights to ship as ``models/model.pt`` (e.g. a trained prostate model: the zoo requires
            one); default: the bundle's own ``models/``.
        large_files_url: where files over ``file_limit_mb`` will be uploaded (``<url>/<path>``); required when
            there is one.

    Returns the copy's folder. Raises ValueError when a file is too large and no ``large_files_url`` is given,
    or when the copied code imports something no installed distribution provides.
    """
    source, target = Path(bundle_dir).resolve(), Path(output_dir)
    if not (source / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{source} is not a bundle: no configs/metadata.json.")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty: choose a new folder for the export.")
    target.mkdir(parents=True, exist_ok=True)
    configs = sorted(p for p in (source / "configs").rglob("*") if p.is_file())
    modules, third_party = module_closure(config_modules(p for p in configs if p.suffix in (".json", ".yaml", ".yml")))

    for file in configs:
        copy = target / file.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        if file.name == "metadata.json":
            continue
        if file.suffix in (".json", ".yaml", ".yml"):
            copy.write_text(_vendored(file.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            shutil.copy2(file, copy)
    for name in sorted(modules):
        file = _module_file(name)
        copy = target / VENDORED / file.relative_to(PACKAGE_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(_vendored(file.read_text(encoding="utf-8")), encoding="utf-8")
    for folder in ("docs",):
        if (source / folder).is_dir():
            shutil.copytree(source / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(source / "LICENSE", target / "LICENSE")
    (target / "models").mkdir(exist_ok=True)
    if checkpoint is not None:
        shutil.copy2(checkpoint, target / "models" / "model.pt")
    elif (source / "models").is_dir():
        for file in (source / "models").iterdir():
            if file.is_file():
                shutil.copy2(file, target / "models" / file.name)

    meta = json.loads((source / "configs" / "metadata.json").read_text(encoding="utf-8"))
    packages = third_party_distributions(third_party)
    for distribution, field in _OWN_FIELDS.items():
        packages.pop(distribution, None)
        meta[field] = importlib.metadata.version(distribution)
    meta["required_packages_version"] = dict(sorted(packages.items(), key=lambda item: item[0].lower()))
    meta["schema"] = ZOO_SCHEMA_URL
    write_json_atomic(target / "configs" / "metadata.json", meta)

    large = [p for p in sorted(target.rglob("*")) if p.is_file() and p.stat().st_size > file_limit_mb * 1024 * 1024]
    if large:
        if not large_files_url:
            raise ValueError(
                f"{[str(p.relative_to(target)) for p in large]} exceed the model zoo's {file_limit_mb:g} MB limit: "
                "pass --large_files_url (where they will be uploaded) to list them in large_files.yml."
            )
        entries = []
        for path in large:
            relative = path.relative_to(target).as_posix()
            entries.append(
                f'  - path: "{relative}"\n    url: "{large_files_url.rstrip("/")}/{relative}"\n'
                f'    hash_val: "{_sha256(path)}"\n    hash_type: "sha256"\n'
            )
            path.unlink()  # downloaded by the zoo's tools from the url
        write_text_atomic(target / "large_files.yml", "large_files:\n" + "".join(entries))
    logger.info(
        f"exported {source.name} to {target}: {len(modules)} module(s) in scripts/, required packages "
        f"{sorted(packages)}" + (f", {len(large)} large file(s) in large_files.yml" if large else "")
    )
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiva_monai.zoo_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle_dir", help="the bundle folder, e.g. bundles/aiva_brain")
    parser.add_argument("output_dir", help="a new folder for the zoo-layout copy")
    parser.add_argument("--checkpoint", help="weights to ship as models/model.pt (default: the bundle's models/)")
    parser.add_argument("--large_files_url", help="upload folder URL for files over the zoo's 25 MB limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_bundle(
            args.bundle_dir, args.output_dir, checkpoint=args.checkpoint, large_files_url=args.large_files_url
        )
    except (OSError, ValueError) as error:
        logger.error(f"zoo export failed: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
