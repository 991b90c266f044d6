"""Per-stage time and peak host memory of AIVA's clustering round at CC359 scale.

Simulates the embedding pass with random bottleneck features (12 planted modes + noise) streamed in
batches, exactly as AIVAClusteringHandler streams them out of the network: projection of each batch,
joint PCA, joint t-SNE, per-site k-means, Hungarian matching, and the second pass that averages the
full-dimensional source features per cluster. Each size runs in its own process so that its peak
resident memory (ru_maxrss) is its own; "extra MB" is that peak minus the process's resident memory
just before the pass (after imports), i.e. what the pass itself needs.

    python benchmarks/clustering_scale.py                      # n = 1k, 5k, 25k slices, 128 x 32 x 32
    python benchmarks/clustering_scale.py --sizes 1000 --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("generate", "project", "pca", "tsne", "kmeans", "match", "means")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def single(
    n: int, shape: tuple, batch_size: int, n_clusters: int, tsne_method: str, seed: int, pca_device=None
) -> dict:
    import numpy as np
    import psutil
    import torch

    from aiva_monai.clustering import ClusterMeanAccumulator, FeatureProjector, cluster_sketches

    n_features = int(np.prod(shape))
    n_source, n_target = n // 2, n - n // 2
    modes = torch.randn(n_clusters, n_features, generator=torch.Generator().manual_seed(seed)) * 0.5
    baseline = psutil.Process().memory_info().rss / 2**20
    timings = dict.fromkeys(STAGES, 0.0)

    def batches(site: int, count: int):
        """Random (B, *shape) features, reproducible per (site, batch) so the means pass sees the same data."""
        for number, begin in enumerate(range(0, count, batch_size)):
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + site * 10_007 + number)
            size = min(batch_size, count - begin)
            which = torch.randint(0, n_clusters, (size,), generator=generator)
            features = modes[which] + torch.randn(size, n_features, generator=generator)
            timings["generate"] += time.perf_counter() - start
            yield features.reshape(size, *shape)

    start = time.perf_counter()
    projector = FeatureProjector(n_features, sketch_dim=1024, seed=seed)
    timings["project"] += time.perf_counter() - start
    sketches = []
    for site, count in ((0, n_source), (1, n_target)):
        rows = []
        for features in batches(site, count):
            start = time.perf_counter()
            rows.append(projector(features))
            timings["project"] += time.perf_counter() - start
        sketches.append(torch.cat(rows).numpy())

    result = cluster_sketches(
        sketches[0], sketches[1], n_clusters, tsne_method=tsne_method, seed=seed, pca_device=pca_device
    )
    timings.update({stage: result.timings[stage] for stage in ("pca", "tsne", "kmeans", "match")})

    accumulator = ClusterMeanAccumulator(n_clusters, n_features)
    position = 0
    for features in batches(0, n_source):
        start = time.perf_counter()
        accumulator.update(features, result.source_labels[position : position + len(features)])
        timings["means"] += time.perf_counter() - start
        position += len(features)
    accumulator.means()

    return {
        "n": n,
        "n_features": n_features,
        **{stage: round(seconds, 2) for stage, seconds in timings.items()},
        "total_without_generate": round(sum(v for k, v in timings.items() if k != "generate"), 2),
        "extra_mb": round(peak_rss_mb() - baseline, 1),
        "full_float32_mb": round(n * n_features * 4 / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 25000], help="slices (source + target)")
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 32, 32], help="bottleneck (C, H, W)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=12)
    parser.add_argument("--tsne-method", default="opentsne", choices=["opentsne", "sklearn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pca-device", default=None, help="e.g. cuda: the PCA with torch on that device (default: scikit-learn on CPU)"
    )
    parser.add_argument("--csv", help="also write the table to this CSV file")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single is not None:
        row = single(
            args.single, tuple(args.shape), args.batch_size, args.clusters, args.tsne_method, args.seed, args.pca_device
        )
        print(json.dumps(row))
        return

    rows = []
    columns = ["n", *STAGES, "total_without_generate", "extra_mb", "full_float32_mb"]
    print(
        f"AIVA clustering round, bottleneck {'x'.join(map(str, args.shape))}, k={args.clusters}, "
        f"t-SNE {args.tsne_method}, {os.cpu_count()} CPUs; seconds per stage, host memory in MB"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for n in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--single",
            str(n),
            "--shape",
            *map(str, args.shape),
            "--batch-size",
            str(args.batch_size),
            "--clusters",
            str(args.clusters),
            "--tsne-method",
            args.tsne_method,
            "--seed",
            str(args.seed),
        ] + (["--pca-device", args.pca_device] if args.pca_device else [])
        completed = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", check=True)
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append(row)
        print("| " + " | ".join(str(row[c]) for c in columns) + " |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
