"""The files of a run: checkpoints to resume from, saved weights, the AdaBN baseline, the checkpoints evaluated,
the method card."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "require_file",
    "latest_checkpoint",
    "save_weights",
    "copy_weights",
    "adabn_checkpoint",
    "evaluation_checkpoints",
    "source_statistics_model",
    "write_method_card",
]


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


def source_statistics_model(output_dir, method: str = "adapted", sets=("source test",), model_file="model.pt") -> dict:
    """{name: {"file", "sets"}} (a ``run_evaluation`` checkpoint) of the run's adapted model with the SOURCE BatchNorm
    statistics (the selection handler's copy of ``model_file``, e.g. ``model_source_statistics.pt``; written with
    per-site BatchNorm), named ``"<method> (<configured rule>) with source statistics"``, to be scored on ``sets``
    only: it is a model for the source site's scans. Empty when the run has no such file."""
    from aiva_monai.checkpoint_selection import source_statistics_file

    selection = Path(output_dir) / "selection.json"
    content = json.loads(selection.read_text()) if selection.is_file() else {}
    model_file = content.get("model", model_file)  # the selection handler's own name for the pick, when it wrote one
    path = Path(source_statistics_file(str(Path(output_dir) / model_file)))
    if not path.is_file():
        return {}
    rule = content.get("rule")
    name = f"{method} ({rule}) with source statistics" if rule else f"{method} with source statistics"
    return {name: {"file": str(path), "sets": list(sets)}}


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
