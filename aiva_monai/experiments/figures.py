"""The report's figures: the target score against k (paper Fig. 5) and qualitative slices."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from aiva_monai.experiments.grid import DEFAULT_K, METHOD_ORDER
from aiva_monai.experiments.runner import default_bundles_dir
from aiva_monai.experiments.store import METRIC_TITLES, row_label, target_mean
from aiva_monai.methods import METHODS, reads_target_labels


def k_figure(records: list[dict], metric: str, path: Path) -> Path | None:
    """Target score against the number of clusters k (paper Fig. 5), one line per row; None without several k."""
    aiva = [r for r in records if r["method"] == "aiva" and r.get("k") is not None and r.get("status", "ok") == "ok"]
    if len({r["k"] for r in aiva}) < 2:
        return None
    from aiva_monai.visualize import plt, save_figure_atomic

    figure, axis = plt.subplots(figsize=(5.5, 4))
    by_row = defaultdict(lambda: defaultdict(list))
    for r in aiva:
        value = target_mean(r, metric)
        if value is not None:
            by_row[row_label(r)][r["k"]].append(100 * value)
    for row, values in sorted(by_row.items()):
        ks = sorted(values)
        axis.errorbar(
            ks, [np.mean(values[k]) for k in ks], yerr=[np.std(values[k]) for k in ks], marker="o", capsize=3, label=row
        )
    for method, style in (("source", ":"), ("oracle", "--")):
        scores = [100 * v for r in records if r["method"] == method for v in [target_mean(r, metric)] if v is not None]
        if scores:
            axis.axhline(np.mean(scores), linestyle=style, color="grey", label=f"{method} (mean)")
    axis.set_xlabel("number of clusters k")
    axis.set_ylabel(f"target {METRIC_TITLES.get(metric, metric)} (%)")
    axis.set_xticks(sorted({r["k"] for r in aiva}))
    axis.legend(fontsize=7)
    return save_figure_atomic(figure, path)


def qualitative_figure(records: list[dict], path: Path, n_slices: int = 3, volume_index: int = 0) -> Path | None:
    """Ground truth and each method's mask on the same target test slices (paper Fig. 6): the first row's
    first seed; the ``volume_index``-th target test volume; ``n_slices`` slices across the labelled extent."""
    import torch
    from monai.bundle import ConfigParser

    from aiva_monai.evaluation import load_network_weights
    from aiva_monai.visualize import plt, save_figure_atomic

    records = [
        r
        for r in records
        if r.get("status", "ok") == "ok" and "config" in r and Path(r["run_dir"], "model.pt").is_file()
    ]
    if not records:
        return None
    first = sorted(records, key=lambda r: (row_label(r), r["seed"]))[0]
    chosen = {}
    for r in records:
        if (
            row_label(r) == row_label(first)
            and r["seed"] == first["seed"]
            and (r["method"] != "aiva" or r.get("k") in (None, DEFAULT_K) or "aiva" not in chosen)
        ):
            chosen[r["method"]] = r
    methods = [m for m in METHOD_ORDER if m in chosen]
    config = first["config"]
    parser = ConfigParser()
    # config files are recorded relative to the folder above the bundles (``bundles/<name>/configs/...``): the
    # run's own bundles folder when it still exists, else this installation's
    recorded = Path(config["bundles"]) if config.get("bundles") else None
    above = recorded.parent if recorded is not None and recorded.is_dir() else default_bundles_dir().parent
    parser.read_config([str(above / c) for c in config["config_files"] if "methods" not in Path(c).parts])
    parser.update(dict(config["overrides"]))
    datalist, base_dir, target = (parser.get_parsed_content(k) for k in ("datalist_file", "base_dir", "target"))
    from aiva_monai.bundle import entries

    volumes = entries(datalist, "test", target, base_dir)
    if not volumes:
        return None
    item = parser.get_parsed_content("validate#preprocessing")(volumes[min(volume_index, len(volumes) - 1)])
    image, label = torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"])
    axis_index = int(parser.get_parsed_content("slice_axis")) + 1
    labelled = torch.nonzero(label.sum(dim=[d for d in range(label.ndim) if d != axis_index]) > 0).flatten()
    if len(labelled) == 0:
        labelled = torch.arange(image.shape[axis_index])
    picks = [int(labelled[int(round(q * (len(labelled) - 1)))]) for q in np.linspace(0.25, 0.75, n_slices)]
    network = parser.get_parsed_content("network_def").eval()
    context = int(parser.get_parsed_content("context_slices")) if "context_slices" in parser else 0

    def slab(tensor, index):  # (C, ...) volume -> (C, H, W) slice (2.5D input: neighbours are channels already)
        return tensor.movedim(axis_index, 1)[:, index]

    predictions = {}
    for method in methods:
        load_network_weights(network, Path(chosen[method]["run_dir"]) / "model.pt")
        with torch.no_grad():
            batch = torch.stack([slab(image, i) for i in picks])
            predictions[method] = network(batch).argmax(1).numpy()
    columns = ["ground truth", *methods]
    figure, axes = plt.subplots(len(picks), len(columns), figsize=(2.2 * len(columns), 2.3 * len(picks)), squeeze=False)
    for r, index in enumerate(picks):
        picture = slab(image, index)[context].numpy()
        truth = slab(label.float(), index)[0].numpy() > 0
        for c, name in enumerate(columns):
            axis = axes[r][c]
            axis.imshow(picture.T, cmap="gray", origin="lower")
            mask = truth if name == "ground truth" else predictions[name][r] > 0
            if mask.any():
                axis.contour(
                    mask.T.astype(float),
                    levels=[0.5],
                    colors=["lime" if name == "ground truth" else "red"],
                    linewidths=0.8,
                )
            if name != "ground truth":
                axis.contour(truth.T.astype(float), levels=[0.5], colors=["lime"], linewidths=0.4, alpha=0.6)
            if r == 0:
                axis.set_title(name + (" *" if name in METHODS and reads_target_labels(name) else ""), fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(
        f"{row_label(first)}, {volumes[min(volume_index, len(volumes) - 1)].get('subject', '')}: "
        "ground truth (green), "
        f"prediction (red); * reads target labels",
        fontsize=9,
    )
    return save_figure_atomic(figure, path, dpi=75)
