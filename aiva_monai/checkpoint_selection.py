"""CheckpointSelectionHandler: keep every adaptation epoch's model, score it with every label-free rule, and
write the configured rule's pick as ``model.pt``."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from aiva_monai.io import atomic_path, write_csv_atomic, write_json_atomic
from aiva_monai.networks import _unwrap
from aiva_monai.progress import RoundProgress
from aiva_monai.selection import (
    SELECTION_RULES,
    agreement_dice,
    choices,
    choose,
    information_maximization,
    intensity_perturbations,
    prediction_entropy,
)

__all__ = ["CheckpointSelectionHandler", "TargetScoring", "source_statistics_file", "target_scores"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def target_scores(
    network: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    perturbations: Sequence[Callable] = (),
    device=None,
    progress: Callable | None = None,
) -> dict:
    """Label-free scores of ``network`` (eval mode) on unlabelled target slices ``images`` (N, C, H, W):
    ``target_entropy``, ``target_im`` and, with ``perturbations``, ``target_agreement`` (mean over them).

    ``progress("scores", done, total)`` follows the forward passes (N slices, once more per perturbation);
    None: this module's logger, a line at most every 10 s."""
    device = device or next(network.parameters()).device
    was_training = network.training
    network.eval()
    total, done = len(images) * (1 + len(perturbations)), 0
    progress = progress or RoundProgress(logger, every_s=10.0, clock=None)
    progress("scores", 0, total)
    try:

        def predict(batch_images):
            nonlocal done
            out = []
            for i in range(0, len(batch_images), batch_size):
                out.append(torch.softmax(network(batch_images[i : i + batch_size].to(device)).float(), dim=1).cpu())
                done += len(out[-1])
                progress("scores", done, total)
            return torch.cat(out)

        probs = predict(images)
        scores = {"target_entropy": prediction_entropy(probs), "target_im": information_maximization(probs)}
        if perturbations:
            labels = probs.argmax(dim=1)
            scores["target_agreement"] = sum(
                agreement_dice(labels, predict(perturb(images)).argmax(dim=1)) for perturb in perturbations
            ) / len(perturbations)
    finally:
        network.train(was_training)
    return scores


@dataclass
class TargetScoring:
    """The held-out UNLABELLED target slices the target-only rules score, and how (only ``image_key`` is read).

    Attributes:
        dataset: the slices (e.g. the target validation subjects' slices, without labels).
        image_key: key of the image in a sample.
        max_slices: an evenly spaced subset of at most this many slices (bounds the cost per candidate);
            None: all.
        perturbations: callables (N, C, H, W) -> (N, C, H, W) for ``target_agreement``; None:
            ``intensity_perturbations()``; empty to leave that score out.
        batch_size: slices per forward pass.
    """

    dataset: Any
    image_key: str = "image"
    max_slices: int | None = 512
    perturbations: Sequence[Callable] | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.perturbations = intensity_perturbations() if self.perturbations is None else list(self.perturbations)

    def images(self) -> torch.Tensor:
        """(N, C, H, W) float images of the evenly spaced subset."""
        n = len(self.dataset)
        count = n if not self.max_slices else min(n, int(self.max_slices))
        positions = torch.linspace(0, n - 1, count).round().long().unique().tolist()
        return torch.stack([torch.as_tensor(self.dataset[i][self.image_key]).float() for i in positions])


def source_statistics_file(file: str) -> str:
    """A weights file's copy with the source statistics: a/epoch_0002.pt -> a/epoch_0002_source_statistics.pt."""
    path = Path(file)
    return str(path.with_name(f"{path.stem}_source_statistics{path.suffix}"))


class CheckpointSelectionHandler:
    """Label-free model selection for an adaptation trainer (``aiva_monai.selection``).

    Every ``interval`` epochs (at ``EPOCH_COMPLETED``) the current model becomes a *candidate*: optionally
    ``prepare``d (e.g. AdaBN re-estimation of its BatchNorm statistics: the candidate is the model as it
    would be deployed), scored — Dice on the labelled SOURCE validation subjects (``validator``, which this
    handler runs: do not also attach a ``ValidationHandler``) and the target-only scores of
    ``target_scores`` on held-out UNLABELLED target slices — and saved as ``<output_dir>/selection/epoch_N.pt``.
    After every candidate, ``<output_dir>/selection.csv`` lists every candidate's scores and which rules pick
    it, ``selection.json`` maps every rule to its pick, and the pick of ``rule`` is copied to
    ``<output_dir>/<model_filename>``. At the end of the run, candidates no rule picks are deleted.

    Target labels are never read: the target slices are only asked for their image.

    Args:
        network: the trained network (its weights and buffers are restored after each candidate).
        output_dir: run folder.
        rule: the rule whose pick becomes ``model_filename`` (``aiva_monai.selection.SELECTION_RULES``).
        validator: MONAI evaluator of the source validation subjects; None leaves out the source rules.
        source_metric: the validator's metric name holding the source Dice.
        target: the held-out unlabelled target slices and how they are scored (``TargetScoring``, or a dict
            of its fields); None leaves out the target rules.
        prepare: callable(network) applied to the network before scoring and saving (changes are undone
            afterwards for training to continue), e.g. AdaBN.
        interval: epochs between candidates.
        model_filename: where the pick of ``rule`` goes.
        site_context: callable(site) -> context manager that installs that site's BatchNorm statistics
            (``AdaptationBatchNorm.site_statistics``, mode "per_site": the source set the source passes kept
            up to date). When given, every candidate is also saved with the SOURCE statistics
            (``selection/epoch_N_source_statistics.pt``) and the pick of ``rule`` is copied to
            ``<model_filename stem>_source_statistics.pt``: the adapted weights for the source site's scans
            (the candidate itself carries the target statistics). The context must be left before the
            candidate's buffers are restored (it swaps tensors, the restore copies into them).

    ``state_dict()`` holds the candidates' records, so a resumed run continues the same table.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        output_dir: str | Path,
        rule: str = "source_best",
        validator: Engine | None = None,
        source_metric: str = "val_source_dice",
        target: TargetScoring | dict | None = None,
        prepare: Callable | None = None,
        interval: int = 1,
        model_filename: str = "model.pt",
        site_context: Callable | None = None,
    ) -> None:
        if rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {rule!r}; choose one of {sorted(SELECTION_RULES)}.")
        score = SELECTION_RULES[rule].score
        if score == "source_dice" and validator is None:
            raise ValueError(f"selection rule {rule!r} needs a source validator.")
        target = TargetScoring(**target) if isinstance(target, dict) else target
        if score is not None and score.startswith("target_") and target is None:
            raise ValueError(f"selection rule {rule!r} needs held-out unlabelled target slices (target).")
        self.network = network
        self.output_dir = Path(output_dir)
        self.rule = rule
        self.validator = validator
        self.source_metric = source_metric
        self.target = target
        self.prepare = prepare
        self.interval = int(interval)
        self.model_filename = model_filename
        self.site_context = site_context
        self.records: list[dict] = []
        self._images: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.add_candidate)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    # -- candidates -------------------------------------------------------------------------------

    def _target_images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self.target.images()
        return self._images

    def add_candidate(self, engine: Engine) -> dict:
        """Score and save the current model as a candidate; returns its record."""
        epoch, iteration = int(engine.state.epoch), int(engine.state.iteration)
        if any(r["epoch"] == epoch for r in self.records):  # a resumed run repeating an epoch it recorded
            return next(r for r in self.records if r["epoch"] == epoch)
        plain = _unwrap(self.network)
        saved = {k: v.detach().clone() for k, v in plain.state_dict().items()} if self.prepare is not None else None
        was_training = plain.training
        try:
            if self.prepare is not None:
                self.prepare(plain)
            record = {"epoch": epoch, "iteration": iteration, "file": f"selection/epoch_{epoch:04d}.pt"}
            if self.validator is not None:
                self.validator.run(epoch)
                record["source_dice"] = float(self.validator.state.metrics[self.source_metric])
            if self.target is not None:
                record.update(
                    target_scores(
                        plain,
                        self._target_images(),
                        batch_size=self.target.batch_size,
                        perturbations=self.target.perturbations,
                    )
                )
            with atomic_path(self.output_dir / record["file"]) as temporary:
                torch.save(plain.state_dict(), temporary)
            if self.site_context is not None:
                record["source_statistics_file"] = source_statistics_file(record["file"])
                with self.site_context("source"), atomic_path(self.output_dir / record["source_statistics_file"]) as t:
                    torch.save(plain.state_dict(), t)
        finally:
            if saved is not None:
                plain.load_state_dict(saved)
            plain.train(was_training)
        self.records.append(record)
        self._write_tables()
        logger.info(
            "selection candidate epoch %d: %s",
            epoch,
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)),
        )
        return record

    def picks(self) -> dict[str, dict]:
        """{rule: picked record} for every rule the recorded scores can answer."""
        return choices(self.records)

    def _write_tables(self) -> None:
        picks = self.picks()
        rows = [{**r, "picked_by": " ".join(name for name, pick in picks.items() if pick is r)} for r in self.records]
        write_csv_atomic(
            self.output_dir / "selection.csv", rows, fieldnames=list(dict.fromkeys(k for r in rows for k in r))
        )
        chosen = choose(self.records, self.rule)
        write_json_atomic(
            self.output_dir / "selection.json",
            {
                "rule": self.rule,
                "model": self.model_filename,
                "picks": {
                    name: {
                        "epoch": p["epoch"],
                        "iteration": p["iteration"],
                        "file": p["file"],
                        "description": SELECTION_RULES[name].description,
                    }
                    for name, p in picks.items()
                },
            },
        )
        with atomic_path(self.output_dir / self.model_filename) as temporary:
            shutil.copyfile(self.output_dir / chosen["file"], temporary)
        companion = self.output_dir / self.source_statistics_filename
        if "source_statistics_file" in chosen:
            with atomic_path(companion) as temporary:
                shutil.copyfile(self.output_dir / chosen["source_statistics_file"], temporary)
        elif companion.exists():  # e.g. a run resumed without site_context: never leave a stale one beside model.pt
            logger.info("removing %s: the pick %s has no source-statistics copy", companion, chosen["file"])
            companion.unlink()

    @property
    def source_statistics_filename(self) -> str:
        """Where the pick of ``rule`` with the source statistics goes (model.pt -> model_source_statistics.pt)."""
        return source_statistics_file(self.model_filename)

    def finish(self, engine: Engine | None = None) -> None:
        """Delete the candidates no rule picks."""
        if not self.records:
            return
        kept = {p["file"] for p in self.picks().values()}
        for record in self.records:
            if record["file"] not in kept:
                (self.output_dir / record["file"]).unlink(missing_ok=True)
                if "source_statistics_file" in record:
                    (self.output_dir / record["source_statistics_file"]).unlink(missing_ok=True)

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.records = [dict(r) for r in state.get("records", [])]
