"""Per-volume evaluation (Dice, surface Dice in mm) of one or more checkpoints, written as CSV,
a markdown summary and cluster figures."""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose, KeepLargestConnectedComponentd

from aiva_monai.clustering import ClusteringSettings
from aiva_monai.embedding import embed_and_cluster
from aiva_monai.handlers import ProgressLogHandler, SurfaceDiceHandler
from aiva_monai.io import write_text_atomic
from aiva_monai.metrics import voxel_spacing
from aiva_monai.network_pass import NetworkPass
from aiva_monai.networks import BottleneckTap
from aiva_monai.progress import RoundProgress
from aiva_monai.visualize import plot_clusterings

__all__ = [
    "read_network_weights",
    "load_network_weights",
    "evaluate_volumes",
    "summarize",
    "ClusterFigure",
    "VolumeScoring",
    "run_evaluation",
]

logger = logging.getLogger(__name__)


def read_network_weights(checkpoint: str | Path) -> dict:
    """The network state dict of a checkpoint saved bare (model-zoo ``models/model.pt``) or under a
    "network"/"model"/"state_dict" key; errors name the file."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist.")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise ValueError(f"checkpoint {checkpoint} cannot be read: {error}") from None
    for key in ("network", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def load_network_weights(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Load ``read_network_weights(checkpoint)`` into ``network``."""
    state = read_network_weights(checkpoint)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the network {type(network).__name__}: {error}"
        ) from None
    return network


def surface_dice_key(tolerance_mm: float) -> str:
    return f"surface_dice_{tolerance_mm:g}mm"


def evaluate_volumes(
    network,
    dataset,
    inferer,
    *,
    device="cpu",
    tolerances_mm=(1.0,),
    num_classes: int = 2,
    amp: bool = False,
    num_workers: int = 0,
    largest_component: bool = False,
    progress_name: str = "evaluation",
) -> list[dict]:
    """Dice and surface Dice (at each of ``tolerances_mm``, each volume's own spacing) of every 3D volume.

    Args:
        network: the 2D network, weights loaded.
        dataset: preprocessed volumes (dicts with channel-first ``image`` and ``label`` MetaTensors,
            plus ``subject`` and ``site``).
        inferer: e.g. ``monai.inferers.SliceInferer`` running the 2D network over the volume.
        tolerances_mm: surface-Dice tolerances; empty for Dice only.
        largest_component: keep only the largest connected component of each foreground class
            (prostate post-processing). An empty prediction stays empty and scores Dice 0.
        progress_name: what the progress lines (at most every 20 s) call this evaluation.

    Returns:
        One dict per volume: subject, site, dice, surface_dice_<t>mm for each tolerance, predicted_ml, reference_ml.
    """
    steps = [
        Activationsd("pred", softmax=True),
        AsDiscreted(("pred", "label"), argmax=(True, False), to_onehot=num_classes),
    ]
    if largest_component:
        steps.append(KeepLargestConnectedComponentd("pred", applied_labels=list(range(1, num_classes)), is_onehot=True))
    postprocessing = Compose(steps)
    pair = from_engine(["pred", "label"])
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=DataLoader(dataset, batch_size=1, num_workers=num_workers),
        network=network,
        inferer=inferer,
        postprocessing=postprocessing,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=pair)},
        additional_metrics={surface_dice_key(t): SurfaceDiceHandler(t, output_transform=pair) for t in tolerances_mm},
        amp=amp,
    )
    ProgressLogHandler(progress_name, every_s=20.0, unit="volumes").attach(evaluator)
    rows: list[dict] = []

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        # the evaluator's output holds only image/label/pred; subject and site stay in the (decollated) batch
        for item, entry in zip(engine.state.output, engine.state.batch):
            (spacing,) = voxel_spacing(item["label"][None])
            voxel_ml = float(np.prod(spacing)) / 1000.0
            rows.append(
                {
                    "subject": entry.get("subject", ""),
                    "site": entry.get("site", ""),
                    "predicted_ml": round(float(item["pred"][1:].sum()) * voxel_ml, 2),
                    "reference_ml": round(float(item["label"][1:].sum()) * voxel_ml, 2),
                }
            )

    evaluator.run()
    for key in ("dice", *map(surface_dice_key, tolerances_mm)):
        values = evaluator.state.metric_details[key].reshape(len(rows), -1).mean(dim=1)
        for row, value in zip(rows, values.tolist()):
            row[key] = round(value, 4)
    return rows


def summarize(rows: list[dict], tolerances_mm=(1.0,)) -> str:
    """Markdown table: one line per (model, set) with n and mean +/- std (in %) of surface Dice at each
    tolerance and of Dice."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["set"])].append(row)
    keys = [*map(surface_dice_key, tolerances_mm), "dice"]
    titles = [f"surface Dice @ {t:g} mm" for t in tolerances_mm] + ["Dice"]
    lines = ["| model | set | volumes | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(keys)]

    def line(model, name, members):
        cells = []
        for key in keys:
            values = 100 * np.array([m[key] for m in members], dtype=float)
            cells.append(f"{np.nanmean(values):.2f} +/- {np.nanstd(values):.2f}")
        return f"| {model} | {name} | {len(members)} | " + " | ".join(cells) + " |"

    for (model, name), members in groups.items():
        lines.append(line(model, name, members))
        sites = sorted({str(m.get("site", "")) for m in members})
        if len(sites) > 1:  # a union of sites (prostate sources): one line per site as well
            lines += [
                line(model, f"{name}: site {site}", [m for m in members if str(m.get("site", "")) == site])
                for site in sites
            ]
    return "\n".join(lines)


def _write_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


@dataclass
class ClusterFigure:
    """``clusters.png`` of an evaluation: one panel per drawn checkpoint, the joint embedding of the source and
    target slices with matched clusters in the same colour.

    Attributes:
        datasets: (source slices, target slices).
        n_clusters: k.
        settings: the round's ``ClusteringSettings`` (or a dict, e.g. the bundle's ``cluster_options``).
        models: names of the checkpoints drawn; None: every checkpoint.
    """

    datasets: Sequence
    n_clusters: int = 12
    settings: dict | None = None
    models: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str) or len(self.datasets) != 2:
            raise ValueError(f"ClusterFigure.datasets must be (source slices, target slices), got {self.datasets!r}.")

    def draws(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models


@dataclass(frozen=True)
class VolumeScoring:
    """How each volume is scored (the options of ``evaluate_volumes``): surface-Dice tolerances in mm (empty:
    Dice only), largest-connected-component post-processing, mixed-precision inference."""

    tolerances_mm: tuple[float, ...] = (1.0,)
    largest_component: bool = False
    amp: bool = False

    def __post_init__(self):
        object.__setattr__(self, "tolerances_mm", tuple(float(t) for t in self.tolerances_mm))


def _checkpoint_files(checkpoints: dict, datasets: dict) -> tuple[dict, dict]:
    """({model name: file}, {model name: set names}) of ``run_evaluation``'s checkpoints; a set name that is not a
    key of ``datasets`` is an error (a typo would silently score nothing)."""
    files, sets_of = {}, {}
    for name, entry in checkpoints.items():
        files[name], sets_of[name] = (
            (str(entry["file"]), list(entry["sets"])) if isinstance(entry, dict) else (entry, list(datasets))
        )
        unknown = [s for s in sets_of[name] if s not in datasets]
        if unknown:
            raise ValueError(f"checkpoint {name!r}: unknown test sets {unknown}; the sets are {list(datasets)}.")
    return files, sets_of


def run_evaluation(
    network,
    checkpoints: dict,
    datasets: dict,
    inferer,
    output_dir,
    *,
    device="cpu",
    scoring: VolumeScoring | dict | None = None,
    selection_rule: str = "",
    notes: str = "",
    clusters: ClusterFigure | dict | None = None,
) -> dict:
    """Evaluate every checkpoint on every volume set (or on the sets named with it); write ``evaluation.csv``,
    ``summary.md`` and, when ``clusters`` is given, ``clusters.png`` (``ClusterFigure``).

    Args:
        network: the network (its weights are replaced by each checkpoint in turn).
        checkpoints: {"source": path, "adapted": path}, evaluated in this order; a value may also be
            {"file": path, "sets": [set names]} for a checkpoint meant for some sets only (a model with the source
            site's BatchNorm statistics: ["source test"]).
        datasets: {"target test": dataset, "source test": dataset} of preprocessed volumes.
        selection_rule: how the checkpoints were chosen, written next to every number.
        notes: extra lines for the summary (data set, synthetic or simulated, ...).
        scoring: how each volume is scored (a ``VolumeScoring`` or a dict of its fields; default: Dice and
            surface Dice at 1 mm).
        clusters: the cluster figure (a ``ClusterFigure`` or a dict of its fields); None: no figure.

    Returns:
        {"rows": per-volume rows, "summary": markdown table, "files": written paths}.
    """
    output_dir = Path(output_dir)
    clusters = ClusterFigure(**clusters) if isinstance(clusters, dict) else clusters
    scoring = VolumeScoring(**scoring) if isinstance(scoring, dict) else scoring or VolumeScoring()
    tolerances_mm = scoring.tolerances_mm
    checkpoints, sets_of = _checkpoint_files(checkpoints, datasets)
    network = network.to(device)
    rows, clusterings = [], {}
    for model_name, checkpoint in checkpoints.items():
        load_network_weights(network, checkpoint)
        for set_name, dataset in datasets.items():
            if set_name not in sets_of[model_name]:
                continue
            logger.info(f"evaluating {model_name} ({checkpoint}) on {set_name}: {len(dataset)} volumes")
            for row in evaluate_volumes(
                network,
                dataset,
                inferer,
                device=device,
                tolerances_mm=tolerances_mm,
                amp=scoring.amp,
                largest_component=scoring.largest_component,
                progress_name=f"evaluating {model_name} on {set_name}",
            ):
                rows.append({"model": model_name, "set": set_name, **row})
        if clusters is not None and clusters.draws(model_name):
            with BottleneckTap(network) as tap:
                clusterings[f"{model_name} model"] = embed_and_cluster(
                    network,
                    tap,
                    *clusters.datasets,
                    clusters.n_clusters,
                    clusters.settings,
                    NetworkPass(device=device, amp=scoring.amp),
                    report=RoundProgress(
                        logger, f"AIVA {model_name} model: ", ClusteringSettings.coerce(clusters.settings).log_every_s
                    ),
                )
    table = summarize(rows, tolerances_mm)
    program = Path(sys.argv[0]) if sys.argv else Path("")
    # `python -m monai.bundle run ...` shows up as .../monai/bundle/__main__.py
    launcher = f"python -m {'.'.join(program.parent.parts[-2:])}" if program.name == "__main__.py" else program.name
    command = " ".join([launcher, *sys.argv[1:]])
    summary = "\n".join(
        [
            "# Evaluation",
            "",
            table,
            "",
            "- checkpoints: " + ", ".join(f"{k} = `{v}`" for k, v in checkpoints.items()),
            f"- model selection: {selection_rule or 'not stated'}",
            "- metric: per-volume 3D "
            + (
                f"surface Dice at {', '.join(f'{t:g}' for t in tolerances_mm)} mm "
                "(each volume's own voxel spacing) and "
                if tolerances_mm
                else ""
            )
            + "Dice, foreground class, mean +/- std over volumes, in %; an empty prediction scores 0"
            + ("; largest connected component kept" if scoring.largest_component else ""),
            f"- command: `{command}`",
            *([f"- {line}" for line in notes.splitlines() if line.strip()]),
            "",
        ]
    )
    files = [_write_csv(rows, output_dir / "evaluation.csv"), write_text_atomic(output_dir / "summary.md", summary)]
    if clusterings:
        files.append(
            plot_clusterings(clusterings, output_dir / "clusters.png", title="AIVA clusters: source (o) and target (x)")
        )
    print(summary)
    return {"rows": rows, "summary": table, "files": [str(f) for f in files]}
