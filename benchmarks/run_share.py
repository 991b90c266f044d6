"""The clustering share of a real training run, read from its own files: no re-run, no composite.

    python benchmarks/run_share.py RUN_DIR [more run dirs] [--steps-per-round 1000] [--csv out.csv]

A run folder of ``train.json`` (or of ``aiva_monai.experiments run``) holds ``train.log`` and
``clustering_stats.csv``. For every clustering round E this prints the round's seconds per stage (from the
CSV, which the handler writes as it runs), the seconds the training epoch that follows it took (from the
log's ``training epoch E/N started`` and ``training epoch E/N: T/T iterations ... done`` lines, ``training
started`` and ``training: T/T ...`` in a one-epoch run, so
validation and checkpoint scoring are not counted as training), the seconds per step, and the share of
AIVA's wall time the round would take at the given schedule (a round every ``--steps-per-round`` steps):

    share = round / (round + steps_per_round * seconds_per_step)

Both terms come from the same run, on the same machine, at the same time, so a machine that is slow (or
shared) slows both. The first round runs before any training step and right after the AdaBN start pass;
it is reported like the others and marked. Exit code 1 when a folder lacks either file or a round has no
training epoch to pair with.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from log_silences import timestamped_lines  # noqa: E402  (a sibling script: the log's timestamped records)

# a one-epoch run's lines say "training started" / "training: T/T iterations" (no "epoch 1/1")
STARTED = re.compile(r"INFO - training(?: epoch (\d+)/\d+)? started: (\d+) iterations")
DONE = re.compile(r"INFO - training(?: epoch (\d+)/\d+)?: (\d+)/\d+ iterations, .* done")
STAGES = ("embed", "pca", "tsne", "kmeans", "match", "means")


def training_epochs(log: Path) -> dict[int, tuple[float, int]]:
    """{epoch: (training seconds, iterations)} from a run's log; a resumed run's last complete try wins."""
    started: dict[int, datetime.datetime] = {}
    epochs: dict[int, tuple[float, int]] = {}
    for when, line in timestamped_lines(log):
        if match := STARTED.search(line):
            started[int(match.group(1) or 1)] = when
        elif (match := DONE.search(line)) and int(match.group(1) or 1) in started:
            epoch = int(match.group(1) or 1)
            epochs[epoch] = ((when - started[epoch]).total_seconds(), int(match.group(2)))
    return epochs


def clustering_rounds(stats_csv: Path) -> dict[int, dict[str, float]]:
    """{epoch: {stage: seconds, 'slices': n}} from the handler's clustering_stats.csv (last row per epoch)."""
    rounds = {}
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            stages = {stage: float(row.get(f"time_{stage}") or 0.0) for stage in STAGES}
            stages["slices"] = int(row["n_source"]) + int(row["n_target"])
            rounds[int(row["epoch"])] = stages
    return rounds


def run_rows(run_dir: Path, steps_per_round: int) -> list[dict]:
    """One row per clustering round that a training epoch followed. Raises FileNotFoundError / ValueError."""
    log, stats = run_dir / "train.log", run_dir / "clustering_stats.csv"
    for path in (log, stats):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (is {run_dir} a training run's folder?)")
    epochs, rounds = training_epochs(log), clustering_rounds(stats)
    unpaired = sorted(set(rounds) - set(epochs))
    if unpaired and unpaired != [max(rounds)]:  # only the last round may still wait for its epoch
        hint = "" if epochs else " (no 'training epoch E/N started' line: logs of bundles before 0.2.6 have none)"
        raise ValueError(f"{run_dir}: rounds {unpaired} have no finished training epoch in {log}{hint}")
    rows = []
    for epoch in sorted(set(rounds) & set(epochs)):
        round_s = sum(rounds[epoch][stage] for stage in STAGES)
        train_s, steps = epochs[epoch]
        per_step = train_s / steps
        rows.append(
            {
                "round": epoch,
                "first": epoch == min(rounds),
                "slices": rounds[epoch]["slices"],
                **{f"{stage}_s": rounds[epoch][stage] for stage in STAGES},
                "round_s": round_s,
                "train_s": train_s,
                "steps": steps,
                "s_per_step": per_step,
                "share": round_s / (round_s + steps_per_round * per_step),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps-per-round", type=int, default=1000, help="the schedule the share is stated at")
    parser.add_argument("--csv", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows, failed = [], False
    for number, run_dir in enumerate(args.runs, 1):
        try:
            found = run_rows(run_dir, args.steps_per_round)
            rows += [{"run": number, "run_dir": str(run_dir), **row} for row in found]
        except (OSError, ValueError, KeyError) as error:
            print(f"error: {error}", file=sys.stderr)
            failed = True
    per = args.steps_per_round
    print(
        f"| run | round | slices | embed s | t-SNE s | means s | round s | training s / steps | s per step "
        f"| share at a round per {per:,} steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = " (first: before any step)" if row["first"] else ""
        print(
            f"| {row['run']} | {row['round']}{mark} | {row['slices']:,} | {row['embed_s']:.1f} | {row['tsne_s']:.1f} "
            f"| {row['means_s']:.1f} | {row['round_s']:.1f} | {row['train_s']:.0f} / {row['steps']} "
            f"| {row['s_per_step']:.3f} | {100 * row['share']:.1f} % |"
        )
    print("\nruns: " + "; ".join(f"{number} = {run_dir}" for number, run_dir in enumerate(args.runs, 1)))
    later = [row["share"] for row in rows if not row["first"]]
    if later:
        print(
            f"rounds after the first: {len(later)}; share median {100 * statistics.median(later):.1f} %, "
            f"range {100 * min(later):.1f}-{100 * max(later):.1f} %"
        )
    if args.csv and rows:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
