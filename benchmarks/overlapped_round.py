"""What a clustering round costs AIVA's training, synchronous vs overlapped, at the brain bundle's real geometry.

One AIVA run (``AIVATrainer`` + ``AIVAClusteringHandler``, batch 8 + 8, ``train.json``'s trainable parameters,
Adam 1e-4, the shipped IXI-HH source model, 80 + 15 subjects at 2 mm, 128 x 128 sagittal slices) of three
epochs of ``--epoch-length`` steps with ``overlap`` and ``overlap_embedding`` on, the brain bundle's CPU
clustering settings otherwise (bfloat16 where the CPU has it, batch 8):

- epoch 1 clusters synchronously (every run's first round, and the bundle's default for every round): the
  training waits for the whole round;
- ``--lead-steps 0``: epoch 2 launches the next round in the background (the embedding pass in a thread on
  copies of the network; PCA, t-SNE, k-means and matching in a process) and trains meanwhile; epoch 3 collects
  it (waits if it has not finished, sums the source means) and trains with it;
- ``--lead-steps N``: the rounds of epochs 2 and 3 are launched N steps before those epochs start and
  collected when they start.

Per step it records when each step ended, so it reports the seconds per step without a round in the
background and beside one (from the step of the launch to the step after which the round was found
finished), what training waited for at each epoch start, and the clustering's share of AIVA's wall time at
the paper's schedule (a round every 1,000 steps), synchronous vs overlapped:

- synchronous: R / (R + 1,000 s0), R the synchronous round, s0 seconds per step;
- overlapped: C / (1,000 s0 + C), C per background round = (what training waited for at epochs 2 and 3 +
  n (s_bg - s0)) / the number of background rounds, n the steps that ran beside a background round at s_bg
  seconds each: the round's cost to training is the waiting plus the slowing of those steps.

    OMP_NUM_THREADS=1 python benchmarks/overlapped_round.py                       # 1 torch thread, 1 t-SNE thread
    OMP_NUM_THREADS=1 python benchmarks/overlapped_round.py --lead-steps 100      # launched ahead
    python benchmarks/overlapped_round.py --source-subjects 20 --target-subjects 5 --epoch-length 40   # quick

Give training fewer torch threads than the machine has cores: the background pass runs on the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustering_round import REPOSITORY, configure_run, datasets, shipped_source_model  # noqa: E402

PAPER_STEPS = 1000


def build(network, source, target, args):
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.data import DataLoader

    from aiva_monai.clustering import ClusteringSettings
    from aiva_monai.data import SeededEndlessSampler
    from aiva_monai.engines import AIVATrainer
    from aiva_monai.handlers import AIVAClusteringHandler
    from aiva_monai.losses import AIVALoss
    from aiva_monai.optim import trainable_parameters

    frozen = ConfigParser.load_config_file(REPOSITORY / "bundles" / "aiva_brain" / "configs" / "train.json")[
        "frozen_modules"
    ]
    trainer = AIVATrainer(
        device=args.device,
        max_epochs=3,
        epoch_length=args.epoch_length,
        network=network,
        train_data_loader=DataLoader(source, batch_size=8, sampler=SeededEndlessSampler(source, seed=0)),
        target_data_loader=DataLoader(target, batch_size=8, sampler=SeededEndlessSampler(target, seed=1)),
        optimizer=torch.optim.Adam(trainable_parameters(network, frozen), 1e-4),
        loss_function=AIVALoss(calibration_iterations=10),
        decollate=False,
    )
    settings = ClusteringSettings(
        batch_size=args.batch,
        precision=args.precision,
        n_jobs=args.tsne_jobs,
        overlap=True,
        overlap_embedding=True,
        overlap_lead_steps=args.lead_steps,
    )
    handler = AIVAClusteringHandler(source, target, 12, settings=settings, progress=False, name="aiva_monai.bench")
    marks = {
        "epoch_started": {},
        "handler_done": {},
        "steps": [],
        "launched_rounds": [],  # the epoch each background round is labelled with, in launch order
        "launched_at_step": [],
        "done_after_step": [],
    }

    def before_handler(engine):  # attached before the handler: runs ahead of it
        marks["epoch_started"][engine.state.epoch] = time.perf_counter()

    trainer.add_event_handler(Events.EPOCH_STARTED, before_handler)
    handler.attach(trainer)

    def epoch_started(engine):  # attached after the handler: runs once it has returned
        marks["handler_done"][engine.state.epoch] = time.perf_counter()

    def step_done(engine):  # attached after the handler: a launch at this step is in its time
        marks["steps"].append((engine.state.epoch, time.perf_counter()))
        in_flight = handler.background.epoch  # stays set until the round is collected
        if in_flight is not None and (not marks["launched_rounds"] or marks["launched_rounds"][-1] != in_flight):
            marks["launched_rounds"].append(in_flight)
            marks["launched_at_step"].append(len(marks["steps"]))
        if len(marks["launched_at_step"]) > len(marks["done_after_step"]) and handler.background.done():
            marks["done_after_step"].append(len(marks["steps"]))

    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, step_done)
    return trainer, handler, marks


def summarise(trainer, handler, marks) -> dict:
    waited = {epoch: marks["handler_done"][epoch] - marks["epoch_started"][epoch] for epoch in (1, 2, 3)}
    steps = marks["steps"]
    windows = list(zip(marks["launched_at_step"], marks["done_after_step"]))  # finished background rounds
    seconds = {}  # per step, by kind
    previous = None
    for number, (epoch, end) in enumerate(steps, start=1):
        if previous is None or steps[number - 2][0] != epoch:
            previous = marks["handler_done"][epoch]  # a step's time starts when the handler let training go on
        kind = "background" if any(a <= number <= b for a, b in windows) else "plain"
        if epoch == 1 and number <= 10:
            kind = "calibration"  # lambda's calibration steps (no alignment term yet) and warm-up: left out
        seconds.setdefault(kind, []).append(end - previous)
        previous = end
    s0 = sum(seconds["plain"]) / len(seconds["plain"])
    n_bg = len(seconds.get("background", []))
    s_bg = sum(seconds.get("background", [])) / n_bg if n_bg else s0
    rounds = max(1, len(windows))
    # per background round: what training waited for at the epoch starts after the first, and the slowing
    overlapped_cost = (waited[2] + waited[3] + n_bg * (s_bg - s0)) / rounds
    paper = PAPER_STEPS * s0
    return {
        "seconds_per_step_plain": s0,
        "seconds_per_step_beside_background_round": s_bg,
        "steps_beside_background_rounds": n_bg,
        "background_rounds": len(windows),
        "background_windows_steps": windows,
        "rounds_finished": len(windows) == len(marks["launched_at_step"]),
        "waited_epoch_1_synchronous_round": waited[1],
        "waited_epoch_2": waited[2],
        "waited_epoch_3": waited[3],
        "synchronous_round_stages": handler.history[0],
        "background_round_stages": handler.history[1:],
        "share_synchronous": waited[1] / (waited[1] + paper),
        "share_overlapped": overlapped_cost / (overlapped_cost + paper),
        "overlapped_cost_seconds_per_round": overlapped_cost,
        "step_end_times": [(epoch, end - marks["epoch_started"][1]) for epoch, end in steps],
        "handler_start_end_times": {
            epoch: (
                marks["epoch_started"][epoch] - marks["epoch_started"][1],
                marks["handler_done"][epoch] - marks["epoch_started"][1],
            )
            for epoch in waited
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=os.environ.get("AIVA_IXI_ROOT", str(REPOSITORY.parent / "shared" / "data" / "ixi_hh"))
    )
    parser.add_argument("--source-subjects", type=int, default=80)
    parser.add_argument("--target-subjects", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training (default 1)")
    parser.add_argument("--tsne-jobs", type=int, default=1, help="openTSNE threads of the background process")
    parser.add_argument("--precision", default="cpu_bfloat16", help="ClusteringSettings.precision (the bundle's)")
    parser.add_argument("--batch", type=int, default=8, help="embedding batch (the bundle's CPU one)")
    parser.add_argument(
        "--epoch-length", type=int, default=120, help="steps per epoch: enough for the background round to finish"
    )
    parser.add_argument(
        "--lead-steps", type=int, default=0, help="overlap_lead_steps (0: launch at the due epoch, used one later)"
    )
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()

    silences = configure_run(args.threads, "%(asctime)s %(threadName)s %(message)s")

    from aiva_monai.network_pass import pass_dtype

    load = os.getloadavg()
    start = time.perf_counter()
    source, target = datasets(args)
    print(f"data: {len(source)} source + {len(target)} target slices, cached in {time.perf_counter() - start:.0f} s")
    network = shipped_source_model(args.device)
    trainer, handler, marks = build(network, source, target, args)
    start = time.perf_counter()
    trainer.run()
    end = time.perf_counter()
    report = {
        "machine": f"{os.cpu_count()} CPUs, load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "tsne_jobs": args.tsne_jobs,
        "precision": f"{args.precision} ({pass_dtype(args.device, args.precision)})",
        "n_source": len(source),
        "n_target": len(target),
        "epoch_length": args.epoch_length,
        "wall_seconds": end - start,
        "lead_steps": args.lead_steps,
        # the rounds' log (the training steps themselves log nothing here): the synchronous round, and each
        # background round from its launch to the step after which it was found finished
        "longest_log_silence_synchronous_round": silences.longest(marks["epoch_started"][1], marks["handler_done"][1]),
        "longest_log_silence_background_rounds": max(
            [
                silences.longest(marks["steps"][a - 1][1] - 2.0, marks["steps"][b - 1][1])
                for a, b in zip(marks["launched_at_step"], marks["done_after_step"])
            ],
            default=float("nan"),
        ),
        **summarise(trainer, handler, marks),
    }
    if not report["rounds_finished"]:
        print("WARNING: a background round had not finished before it was due: raise --epoch-length or --lead-steps.")
    stages = ("embed", "pca", "tsne", "kmeans", "match", "means", "wait")
    print(f"\n## A clustering round's cost to AIVA training: {len(source)} + {len(target)} slices; {report['machine']}")
    print(
        f"torch threads {args.threads}, openTSNE threads {args.tsne_jobs}, embedding pass {report['precision']}, "
        f"{args.epoch_length} steps per epoch, overlap_lead_steps {args.lead_steps}\n"
    )
    print("| round | epoch it is used from | " + " | ".join(f"{s} s" for s in stages) + " |")
    print("|---" * (2 + len(stages)) + "|")
    for number, row in enumerate([report["synchronous_round_stages"], *report["background_round_stages"]]):
        cells = " | ".join(f"{row.get('time_' + s, float('nan')):.1f}" for s in stages)
        kind = "synchronous" if number == 0 else "background"
        used = row["epoch"] if number == 0 or args.lead_steps else row["epoch"] + 1
        print(f"| {kind} | {used} | {cells} |")
    print(
        f"\ntraining waited {report['waited_epoch_1_synchronous_round']:.2f} s at epoch 1 (the synchronous round), "
        f"{report['waited_epoch_2']:.2f} s at epoch 2, {report['waited_epoch_3']:.2f} s at epoch 3"
    )
    print(
        f"seconds per AIVA step: {report['seconds_per_step_plain']:.3f} without a round in the background, "
        f"{report['seconds_per_step_beside_background_round']:.3f} beside one "
        f"({report['steps_beside_background_rounds']} steps, {report['background_rounds']} background rounds)"
    )
    print(f"\n| a round every {PAPER_STEPS} steps | clustering's share of AIVA's wall time |\n|---|---|")
    print(f"| synchronous (the bundle's default) | {100 * report['share_synchronous']:.1f} % |")
    print(f"| overlapped, embedding in the background | {100 * report['share_overlapped']:.1f} % |")
    print(
        f"\nlongest silence in the log: {report['longest_log_silence_synchronous_round']:.1f} s during the synchronous "
        f"round, {report['longest_log_silence_background_rounds']:.1f} s during a background one; "
        f"run {report['wall_seconds']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
