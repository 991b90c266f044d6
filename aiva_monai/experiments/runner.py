"""Running one cell: ``monai.bundle run`` subprocesses (training overlay, then evaluation) and the record fields."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiva_monai.bundle import REPOSITORY, source_statistics_model
from aiva_monai.experiments.grid import AIVA_METHODS, Cell, Preset
from aiva_monai.methods import reads_target_labels


def default_bundles_dir() -> Path:
    """The folder holding the bundles (``aiva_brain/``, ``aiva_prostate/``): the repository's ``bundles/`` for a
    checkout or an editable install, else ``./bundles`` (a wheel install run beside a copy of the bundles)."""
    beside = REPOSITORY / "bundles"
    return beside if (beside / "aiva_brain" / "configs").is_dir() else Path.cwd() / "bundles"


def git_commit(folder: Path = REPOSITORY) -> str:
    """``git rev-parse HEAD`` of the repository, with ``+dirty`` when tracked files differ from it; for an
    installed package (no checkout) ``aiva-monai <version>``."""
    if not (folder / ".git").exists():
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"aiva-monai {version('aiva-monai')}"
        except PackageNotFoundError:
            return "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _die_with_parent() -> None:
    # Linux: the bundle subprocess gets SIGKILL when the runner dies (even by SIGKILL), so a killed matrix
    # leaves no orphan training behind to race with its restart
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _applicable(overrides: dict, config_files: Sequence[Path]) -> dict:
    """The ``overrides`` a config accepts: plain keys, and nested ``a#b`` keys whose parent ``a`` exists
    (e.g. ``cluster_options#...`` is dropped for ``pretrain.json``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(c) for c in config_files]))
    return {
        k: v
        for k, v in overrides.items()
        if "#" not in k.replace("::", "#") or k.replace("::", "#").rsplit("#", 1)[0] in parser
    }


def _cli_value(value) -> str:
    # monai.bundle's command line (python-fire) parses Python literals; strings are passed as they are
    return value if isinstance(value, str) else repr(value)


def run_bundle(
    config_files: Sequence[str | Path], overrides: dict, log_file: Path, env: dict | None = None, cwd=None
) -> None:
    """``python -m monai.bundle run`` in a subprocess (in folder ``cwd``, default this process's), output appended
    to ``log_file``; RuntimeError with the log's tail on failure. The bundle is found from its config files."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(c) for c in config_files])]
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(("\n$ " + " ".join(command) + "\n").encode())
        log.flush()
        process = subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
            env=env,
        )
    if process.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"monai.bundle run failed (exit {process.returncode}); log {log_file}:\n{tail}")


@dataclass
class BundleCellRunner:
    """Runs one cell through the bundle configs (subprocesses) and returns its result fields.

    Args:
        preset: the data set's preset.
        output: the matrix folder (runs in ``<output>/runs/<cell>``, source models in ``<output>/pretrain``).
        dataset_dir, datalist: the data (``--dataset_dir`` / ``--datalist`` of the bundle configs).
        epoch_length, cluster_every: per-epoch length (validation + checkpoint) and AIVA's clustering
            interval; default min(steps, 500) and min(steps, 1000).
        pretrain_steps: steps of the source models the runner pretrains (cc359, prostate).
        source_checkpoint: use this source model for every cell (default: the preset's shipped one, else
            pretrained per source by the runner).
        overrides: extra ``monai.bundle`` overrides for every training and evaluation run.
        cluster_figure: methods whose evaluation draws the before/after cluster figure (default: aiva).
        selection: the label-free selection rule of every adaptation run (default: the bundle's).
        bundles: the folder holding the bundles (default ``default_bundles_dir()``).
    """

    preset: Preset
    output: Path
    dataset_dir: str | None = None
    datalist: str | None = None
    epoch_length: int | None = None
    cluster_every: int | None = None
    pretrain_steps: int | None = None
    source_checkpoint: str | None = None
    overrides: dict = field(default_factory=dict)
    cluster_figure: tuple[str, ...] = ("aiva",)
    selection: str | None = None
    bundles: Path = field(default_factory=default_bundles_dir)

    def __post_init__(self):
        # the bundle subprocesses run in another folder: every path they get is absolute
        self.bundles = Path(self.bundles).resolve()
        self.output = Path(self.output).resolve()
        for name in ("dataset_dir", "datalist", "source_checkpoint"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).expanduser().resolve()))
        if not (self.bundle_root / "configs" / "metadata.json").is_file():
            raise FileNotFoundError(
                f"bundle '{self.preset.bundle}' not found in {self.bundles}: pass the folder that holds the bundles "
                "(--bundles DIR)."
            )

    def _run_bundle(self, config_files, overrides: dict, log_file: Path) -> None:
        run_bundle(config_files, overrides, log_file, cwd=self.bundles.parent)

    @property
    def bundle_root(self) -> Path:
        return self.bundles / self.preset.bundle

    @property
    def configs(self) -> Path:
        return self.bundle_root / "configs"

    def method_configs(self, method: str) -> list[Path]:
        extra = [self.configs / name for name in self.preset.extra_configs]
        train = [self.configs / "train.json", *extra]
        return train if method == "aiva" else [*train, self.configs / "methods" / f"{method}.json"]

    def data_overrides(self) -> dict:
        found = {}
        if self.dataset_dir:
            found["dataset_dir"] = str(self.dataset_dir)
        datalist = self.datalist or (
            str(self.bundle_root / self.preset.shipped_datalist) if self.preset.shipped_datalist else None
        )
        if datalist:
            found["datalist"] = str(datalist)
        return found

    def site_overrides(self, cell: Cell) -> dict:
        found = {"target_site": cell.target}
        if self.preset.leave_one_site_out:
            found["source_site"] = ",".join(cell.sources)
            found["work_dir"] = str(self.output / "pretrain")
        else:
            (found["source_site"],) = cell.sources
        return found

    def source_model(self, cell: Cell) -> str:
        """The source checkpoint of the cell's sources: given, shipped, or pretrained here once (seed 0)."""
        if self.source_checkpoint:
            return str(self.source_checkpoint)
        if self.preset.shipped_source_model:
            return str(self.bundle_root / self.preset.shipped_source_model)
        name = (
            f"pretrain_target_{cell.target}" if self.preset.leave_one_site_out else f"pretrain_{'+'.join(cell.sources)}"
        )
        folder = self.output / "pretrain" / name
        done = folder / "pretrain_done.json"
        if not done.is_file():  # a killed pretraining restarts from scratch (pretrain.json keeps no checkpoints)
            (folder / "model.pt").unlink(missing_ok=True)
            steps = int(self.pretrain_steps or self.preset.pretrain_steps)
            overrides = {
                **self.data_overrides(),
                **self.site_overrides(cell),
                "output_dir": str(folder),
                "max_steps": steps,
                "epoch_length": min(steps, 500),
                "seed": 0,
            }
            pretrain_configs = [self.configs / "pretrain.json", *[self.configs / n for n in self.preset.extra_configs]]
            overrides.update(_applicable(self.overrides, pretrain_configs))
            print(
                f"    pretraining the source model for {'+'.join(cell.sources)} ({steps} steps) into {folder}",
                flush=True,
            )
            self._run_bundle(pretrain_configs, overrides, folder / "pretrain.log")
            from aiva_monai.io import write_json_atomic

            write_json_atomic(done, {"steps": steps, "sources": list(cell.sources), "commit": git_commit()})
        return str(folder / "model.pt")

    def train_overrides(self, cell: Cell, run_dir: Path) -> dict:
        epoch_length = int(self.epoch_length or min(cell.steps, 500))
        overrides = {
            **self.data_overrides(),
            **self.site_overrides(cell),
            "source_checkpoint": self.source_model(cell),
            "output_dir": str(run_dir),
            "seed": cell.seed,
            "max_steps": cell.steps,
            "epoch_length": epoch_length,
        }
        if cell.method in AIVA_METHODS:
            overrides["n_clusters"] = int(cell.k)
            overrides["cluster_every"] = int(self.cluster_every or min(cell.steps, 1000))
        if self.selection:
            overrides["selection"] = self.selection
        overrides.update(self.overrides)
        return overrides

    def __call__(self, cell: Cell, run_dir: Path, progress: Callable[[str], None] = print) -> dict:
        configs = self.method_configs(cell.method)
        overrides = self.train_overrides(cell, run_dir)
        progress("training" if cell.method not in ("source", "adabn") else "preparing the model")
        self._run_bundle(configs, overrides, run_dir / "train.log")
        card = (
            json.loads((run_dir / "method.json").read_text())
            if (run_dir / "method.json").is_file()
            else {
                "selection_rule": (
                    "best Dice on the source validation subjects (train.json); target labels are never read"
                ),
                "reads_target_labels": False,
            }
        )
        if bool(card["reads_target_labels"]) != reads_target_labels(cell.method):
            raise RuntimeError(f"{run_dir}/method.json: reads_target_labels disagrees with METHODS for {cell.method}.")

        progress("evaluating")
        figure = cell.method in self.cluster_figure
        model = str(run_dir / "model.pt")
        checkpoints = {"source": overrides["source_checkpoint"]} if figure and cell.method != "source" else {}
        picks = _selection_picks(run_dir)  # {rule: file}, for the methods that keep candidates
        by_file = defaultdict(list)
        for rule, file in picks.items():
            by_file[file].append(rule)
        names = {file: f"{cell.method} [{' '.join(rules)}]" for file, rules in by_file.items()}
        if picks:
            checkpoints.update({names[file]: str(run_dir / file) for file in by_file})
            main_name = names[picks[card["selection"]]] if card.get("selection") in picks else None
        else:
            checkpoints[cell.method] = model
            main_name = cell.method
        # the pick with the source BatchNorm statistics (per-site BatchNorm), on the source test volumes only
        for_source = source_statistics_model(run_dir, cell.method, ["source test"])
        checkpoints.update(for_source)
        marker = " (READS TARGET LABELS: target-supervised upper bound)" if reads_target_labels(cell.method) else ""
        evaluation = {
            **overrides,
            "eval_checkpoints": checkpoints,
            "cluster_figure": figure,
            "cluster_figure_options#models": [n for n in checkpoints if n == "source" or n == main_name],
            "tolerances_mm": list(self.preset.tolerances_mm),
            "evaluation#selection_rule": card["selection_rule"],
            "evaluation#notes": (
                f"$'method: {cell.method}{marker}, seed {cell.seed}, {cell.steps} steps\\n' + 'data: ' + @datalist_file"
                " + '\\nsource: ' + str(@source) + ', target: ' + @target"
            ),
        }
        self._run_bundle([*configs, self.configs / "evaluate.json"], evaluation, run_dir / "evaluate.log")
        rows = list(csv.DictReader(io.StringIO((run_dir / "evaluation" / "evaluation.csv").read_text())))

        def volumes_of(name):
            found = []
            for row in rows:
                if row["model"] != name:
                    continue
                entry = {"subject": row.get("subject", ""), "set": row["set"], "site": row.get("site", "")}
                for key, value in row.items():
                    if key == "dice" or key.startswith("surface_dice"):
                        entry[key] = float(value) if value not in ("", "nan") else None
                found.append(entry)
            return found

        result = {
            "selection_rule": card["selection_rule"],
            "volumes": volumes_of(main_name),
            "config": {
                "bundle": self.preset.bundle,
                "config_files": [str(Path(c).relative_to(self.bundles.parent)) for c in configs],
                "bundles": str(self.bundles),
                "overrides": {k: v for k, v in overrides.items()},
            },
            "figures": {"clusters": str(run_dir / "evaluation" / "clusters.png")}
            if figure and (run_dir / "evaluation" / "clusters.png").is_file()
            else {},
        }
        if for_source:
            result["source_statistics_volumes"] = volumes_of(next(iter(for_source)))
        if picks:
            result["selection"] = card.get("selection")
            result["rule_volumes"] = {rule: volumes_of(names[file]) for rule, file in picks.items()}
            result["selection_table"] = list(csv.DictReader(io.StringIO((run_dir / "selection.csv").read_text())))
        return result


def _selection_picks(run_dir: Path) -> dict:
    """{rule: candidate file} from a run's ``selection.json`` (empty for runs without candidates)."""
    path = Path(run_dir) / "selection.json"
    if not path.is_file():
        return {}
    return {rule: pick["file"] for rule, pick in json.loads(path.read_text())["picks"].items()}
