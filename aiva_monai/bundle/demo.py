"""The built-in SYNTHETIC demo: its source model (shipped or pretrained once) and its printed headline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["SHIPPED_DEMO_SOURCE", "shipped_demo_source", "demo_source_model", "demo_report", "demo_headline"]

logger = logging.getLogger(__name__)

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
