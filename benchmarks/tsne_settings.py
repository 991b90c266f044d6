"""The clustering round's t-SNE settings on IXI-HH features: neighbour search and FFT grid, speed and agreement.

One embedding pass with the brain bundle's CPU settings (80 source + 15 target subjects, 2 mm, 128 x 128 sagittal
slices: ``clustering_round.datasets``), then, on the same sketches, the clustering (PCA, t-SNE, k-means,
matching) with

- ``annoy``: openTSNE's defaults, the rounds before commit ff86f3a (``tsne_neighbors="auto"``: Annoy from 1,000
  points, ``tsne_fft_cell=1``);
- ``exact``: exact neighbours, grid cell 1;
- ``exact, cell 2``: exact neighbours, grid cell 2 (the default since ff86f3a);

each with seeds 0 .. N-1, 250 + 250 iterations. Prints the t-SNE seconds and the agreement (adjusted Rand index of
the target and of the source clusters, matched pairs that correspond) of every (settings, seed) with ``annoy``
seed 0 and with the same settings' seed 0: how close a change comes to the round's agreement with itself under
another seed. Then the affinity step alone (openTSNE's ``PerplexityBasedNN``, perplexity 30) with Annoy and with
the exact search, on these PCA scores repeated with 5 % noise up to 25,000 and 50,000 points.

    OMP_NUM_THREADS=1 python benchmarks/tsne_settings.py --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {
    "annoy": dict(tsne_neighbors="auto", tsne_fft_cell=1.0),
    "exact": dict(tsne_neighbors="exact", tsne_fft_cell=1.0),
    "exact, cell 2": dict(tsne_neighbors="exact", tsne_fft_cell=2.0),
}


def affinity_seconds(points, sizes, jobs: int) -> list[tuple[int, str, float]]:
    """(n, method, seconds) of openTSNE's affinity step on ``points`` repeated with 5 % noise to each size."""
    import numpy as np
    from openTSNE import affinity

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        copies = [points] + [
            points + 0.05 * points.std(0) * rng.normal(size=points.shape) for _ in range(-(-n // len(points)) - 1)
        ]
        data = np.concatenate(copies)[:n]
        for method in ("annoy", "exact"):
            start = time.perf_counter()
            affinity.PerplexityBasedNN(data, perplexity=30, method=method, n_jobs=jobs, random_state=0)
            rows.append((n, method, time.perf_counter() - start))
            print(f"affinities of {n} points, {method}: {rows[-1][2]:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tsne-jobs", type=int, default=1, help="openTSNE threads")
    parser.add_argument("--affinity-sizes", type=int, nargs="*", default=[8550, 25000, 50000])
    ixi = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi_hh"
    parser.add_argument("--data", default=os.environ.get("AIVA_IXI_ROOT", str(ixi)))
    parser.add_argument("--source-subjects", type=int, default=80)
    parser.add_argument("--target-subjects", type=int, default=15)
    args = parser.parse_args()

    import numpy as np
    import torch
    from clustering_round import REPOSITORY, agreement, datasets
    from sklearn.decomposition import PCA

    from aiva_monai.clustering import ClusteringSettings
    from aiva_monai.embedding import cluster_embedded, embed_sites
    from aiva_monai.network_pass import NetworkPass
    from aiva_monai.networks import BottleneckTap, PreActResUNet

    source, target = datasets(args)
    network = PreActResUNet()
    network.load_state_dict(
        torch.load(REPOSITORY / "bundles" / "aiva_brain" / "models" / "model.pt", map_location="cpu", weights_only=True)
    )
    base = ClusteringSettings(batch_size=8, precision="cpu_bfloat16", n_jobs=args.tsne_jobs)
    start = time.perf_counter()
    with BottleneckTap(network) as tap:
        embedded = embed_sites(network, tap, source, target, base, NetworkPass(device="cpu"))
    print(f"embedded {len(source)} + {len(target)} slices in {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    try:
        for seed in range(args.seeds):
            for name, changes in SETTINGS.items():
                results[name, seed] = cluster_embedded(embedded, 12, base.replace(seed=seed, **changes))
                print(f"{name}, seed {seed}: t-SNE {results[name, seed].timings['tsne']:.1f} s", flush=True)
        points = PCA(20, random_state=0).fit_transform(
            np.concatenate([np.asarray(embedded.source_sketch), np.asarray(embedded.target_sketch)])
        )
    finally:
        embedded.close()
    affinities = affinity_seconds(points, args.affinity_sizes, args.tsne_jobs)

    print(
        f"\n## IXI-HH, {len(source)} + {len(target)} slices; 1 torch thread, openTSNE n_jobs {args.tsne_jobs}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| t-SNE | seed | t-SNE s | vs annoy seed 0: ARI target | ARI source | matches "
        "| vs same settings seed 0: ARI target | ARI source | matches |\n|---|---|---|---|---|---|---|---|---|"
    )
    for (name, seed), result in results.items():
        cells = [f"{result.timings['tsne']:.1f}"]
        for reference in (results["annoy", 0], results[name, 0]):
            a = agreement(result, reference)
            cells += [f"{a['ari_target']:.3f}", f"{a['ari_source']:.3f}", f"{a['matches_agreeing']}/12"]
        print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    print("\n| points | Annoy s | exact s |\n|---|---|---|")
    for n in args.affinity_sizes:
        seconds = {method: s for size, method, s in affinities if size == n}
        print(f"| {n:,} | {seconds['annoy']:.1f} | {seconds['exact']:.1f} |")


if __name__ == "__main__":
    main()
