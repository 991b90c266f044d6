"""AIVA adaptation vs plain source-only fine-tuning, side by side in one process on the same data.

Builds random 2D slices in memory (source: with labels; target: images only), the reference network
(PreActResUNet 16/32/64/128, BatchNorm) and Adam, then times, alternately and from the same initial
weights:

- ``plain``: MONAI ``SupervisedTrainer`` on the source stream (batch ``--batch``), cross-entropy, i.e. the
  source-only fine-tuning step loop;
- ``aiva``: ``AIVATrainer`` + ``AIVAClusteringHandler`` (batch ``--batch`` source + ``--batch`` target,
  one clustering round per ``--iterations`` steps, openTSNE FFT on all cores), one adaptation epoch.

It prints steps/s of both loops (AIVA with and without its clustering round), the ratio, and the share of
AIVA's wall time spent in the per-epoch clustering with each stage (embedding pass over every source
and target slice, PCA, t-SNE, k-means, matching, source-means pass).

CC359 scale (the paper's setting) is ``--size 256 --slices 11000 --iterations 1000 --batch 8``; the
default is a reduced scale with the same number of slices per site per iteration (11), which finishes in
a few minutes on 2 CPU cores:

    python benchmarks/adaptation_overhead.py                                    # reduced scale, CPU
    python benchmarks/adaptation_overhead.py --device cuda --amp --size 256 --slices 11000 --iterations 1000
"""

from __future__ import annotations

import argparse
import copy
import os
import time


def slices(n: int, size: int, seed: int, labels: bool):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.normal(size=(n, 1, size, size)).astype(np.float32))
    masks = (images > 0.5).float() if labels else None
    return [{"image": images[i], **({"label": masks[i]} if labels else {}), "index": i} for i in range(n)]


def loader(dataset, batch: int, workers: int, seed: int):
    from monai.data import DataLoader

    from aiva_monai.data import SeededEndlessSampler

    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=SeededEndlessSampler(dataset, seed=seed),
        num_workers=workers,
        pin_memory=False,
        persistent_workers=workers > 0,
    )


def plain_run(network, source, args, device) -> float:
    import torch
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    network = copy.deepcopy(network).to(device)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        epoch_length=args.iterations,
        train_data_loader=loader(source, args.batch, args.workers, 0),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-4),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0),
        amp=args.amp,
        decollate=False,
    )
    sync(device)
    start = time.perf_counter()
    trainer.run()
    sync(device)
    return time.perf_counter() - start


def aiva_run(network, source, target, args, device):
    import torch

    from aiva_monai.engines import AIVATrainer
    from aiva_monai.handlers import AIVAClusteringHandler
    from aiva_monai.losses import AIVALoss

    network = copy.deepcopy(network).to(device)
    trainer = AIVATrainer(
        device=device,
        max_epochs=1,
        epoch_length=args.iterations,
        train_data_loader=loader(source, args.batch, args.workers, 0),
        target_data_loader=loader(target, args.batch, args.workers, 1),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-4),
        loss_function=AIVALoss(calibration_iterations=10),
        amp=args.amp,
        decollate=False,
    )
    handler = AIVAClusteringHandler(
        source,
        target,
        n_clusters=12,
        settings={"batch_size": args.embed_batch, "tsne_method": args.tsne_method},
        network_pass={"num_workers": args.workers},  # device and AMP: the trainer's
        progress=False,
        group_key=None,
    )
    handler.attach(trainer)
    sync(device)
    start = time.perf_counter()
    trainer.run()
    sync(device)
    wall = time.perf_counter() - start
    return wall, {k[5:]: v for k, v in handler.history[0].items() if k.startswith("time_")}


def write_json(args, device: str, name: str, iterations: int, rows) -> None:
    import json

    runs = []
    for round_, plain, aiva, stages in rows:
        clustering = sum(stages.values())
        runs.append(
            {
                "round": round_,
                "plain_wall_s": plain,
                "aiva_wall_s": aiva,
                "clustering_s": clustering,
                "stages_s": stages,
                "plain_steps_per_s": iterations / plain,
                "aiva_steps_per_s_training_only": iterations / (aiva - clustering),
                "aiva_steps_per_s": iterations / aiva,
                "aiva_over_plain": plain / aiva,
                "aiva_over_plain_training_only": (aiva - clustering) and plain / (aiva - clustering),
                "clustering_share": clustering / aiva,
            }
        )
    settings = {k: getattr(args, k) for k in ("size", "slices", "batch", "workers", "amp", "embed_batch")}
    record = {"device": device, "device_name": name, "iterations": iterations, **settings, "runs": runs}
    with open(args.json, "w") as handle:
        json.dump(record, handle, indent=1)


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="slice side in pixels (CC359: 256)")
    parser.add_argument(
        "--slices", type=int, default=None, help="slices per site (default 11 x iterations; CC359: ~11000)"
    )
    parser.add_argument("--iterations", type=int, default=60, help="steps per clustering epoch (CC359 setting: 1000)")
    parser.add_argument("--batch", type=int, default=8, help="source batch (and target batch for AIVA)")
    parser.add_argument(
        "--embed-batch", type=int, default=None, help="batch of the embedding pass (default 64 on GPU, 16 on CPU)"
    )
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--rounds", type=int, default=1, help="plain/AIVA pairs, alternated")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    parser.add_argument("--tsne-method", default="opentsne", choices=["opentsne", "sklearn"], help="(tests: sklearn)")
    parser.add_argument("--json", default=None, help="also write every number here (for benchmarks/gpu/summary.py)")
    args = parser.parse_args()

    import torch

    from aiva_monai.networks import PreActResUNet

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.amp = args.amp and device.type == "cuda"
    args.slices = args.slices or 11 * args.iterations
    args.embed_batch = args.embed_batch or (64 if device.type == "cuda" else 16)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
    )
    source = slices(args.slices, args.size, 0, labels=True)
    target = slices(args.slices, args.size, 1, labels=False)
    torch.manual_seed(0)
    network = PreActResUNet()

    iterations = args.iterations
    args.iterations = args.warmup  # warm-up: kernels, allocator, thread pools (the clustering on a tiny subset)
    plain_run(network, source, args, device)
    small = max(12 * 4, 64)
    aiva_run(network, source[:small], target[:small], args, device)
    args.iterations = iterations

    rows = []
    for round_ in range(args.rounds):
        plain = plain_run(network, source, args, device)
        aiva, stages = aiva_run(network, source, target, args, device)
        rows.append((round_ + 1, plain, aiva, stages))

    print(
        f"\ndevice: {device} ({name}); amp {args.amp}; slices {args.size}x{args.size}, "
        f"{args.slices} source + {args.slices} target;"
        f" {args.iterations} iterations per clustering epoch; batch {args.batch} (+{args.batch} target for AIVA);"
        f" workers {args.workers}\n"
    )
    print(
        "| round | plain steps/s | AIVA steps/s, training only | AIVA/plain, training only "
        "| AIVA steps/s incl. clustering | AIVA/plain incl. clustering | clustering share of AIVA wall |"
    )
    print("|---|---|---|---|---|---|---|")
    for round_, plain, aiva, stages in rows:
        clustering = sum(stages.values())
        plain_rate, aiva_train = iterations / plain, iterations / (aiva - clustering)
        print(
            f"| {round_} | {plain_rate:.3f} | {aiva_train:.3f} | {aiva_train / plain_rate:.2f} | "
            f"{iterations / aiva:.3f} | "
            f"{plain / aiva:.2f} | {100 * clustering / aiva:.1f}% |"
        )
    print(
        "\n| round | "
        + " | ".join(f"{stage} s" for stage in rows[0][3])
        + " | clustering total s | AIVA wall s | plain wall s |"
    )
    print("|---|" + "---|" * (len(rows[0][3]) + 3))
    for round_, plain, aiva, stages in rows:
        print(
            f"| {round_} | "
            + " | ".join(f"{v:.2f}" for v in stages.values())
            + f" | {sum(stages.values()):.2f} | {aiva:.1f} | {plain:.1f} |"
        )
    print(
        "\nslices/s (training, source + target forward): "
        f"plain {rows[-1][1] and args.batch * iterations / rows[-1][1]:.1f},"
        f" AIVA {2 * args.batch * iterations / (rows[-1][2] - sum(rows[-1][3].values())):.1f}"
    )
    if args.json:
        write_json(args, str(device), name, iterations, rows)
    if device.type == "cuda":
        try:
            print(
                f"GPU utilisation at the end (torch.cuda.utilization, needs pynvml): {torch.cuda.utilization(device)}%"
            )
        except Exception as error:  # noqa: BLE001
            print(f"GPU utilisation not available ({error}); watch `nvidia-smi dmon -s u` while it runs")


if __name__ == "__main__":
    main()
