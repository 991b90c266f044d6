"""Where a bundle lies: found from the ``--config_file`` of the command, wherever the package is installed."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

__all__ = ["REPOSITORY", "config_file_folders", "locate_bundle_root", "verify_metadata"]

# the checkout above this package (an editable install); a wheel install has no bundles here
REPOSITORY = Path(__file__).resolve().parents[2]


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


def verify_metadata(meta_file, schema_file=REPOSITORY / "bundles" / "schema" / "meta_schema.json") -> None:
    """Validate a bundle's metadata.json against the schema shipped in this repository (offline)."""
    import jsonschema  # noqa: PLC0415  (only the metadata check needs it, not a bundle run)

    meta = json.loads(Path(meta_file).read_text())
    schema = json.loads(Path(schema_file).read_text())
    jsonschema.validate(meta, schema)
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"{meta_file}: version {meta['version']} has no changelog entry.")


# -- method overlays (configs/methods/*.json) ---------------------------------------------------------------
