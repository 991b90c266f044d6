"""Does AIVA's cluster matching find the true pairs on planted structure, and does it depend on openTSNE's threads?

Plants 12 modes (``clustering_round.planted_features``: 100 slices each per site, 4,096 features, the target
scaled by 1.3 and shifted), runs ``cluster_sites`` with the t-SNE of before commit ff86f3a ("annoy": openTSNE's
default Annoy neighbours, FFT grid cell 1) and of now ("exact": exact neighbours, grid cell 2), each with each
``n_jobs``, and counts the matched pairs that are true mode pairs two ways on the *same* clusters:

- ``t-SNE map``: what AIVA does (the paper's step 4): Hungarian matching of the k-means centres in the 2D t-SNE map;
- ``PCA space``: Hungarian matching of the same clusters' member means in the joint 20-component PCA space
  (``match_space="pca"``; ``SiteClustering.matches`` holds both).

    OMP_NUM_THREADS=1 python benchmarks/planted_matching.py --seeds 0 1 --jobs 1 2 --tsne annoy exact
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


# the t-SNE of the rounds before commit ff86f3a and its default since
TSNE = {
    "annoy": dict(tsne_neighbors="auto", tsne_fft_cell=1.0),
    "exact": dict(tsne_neighbors="exact", tsne_fft_cell=2.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="openTSNE threads (n_jobs)")
    parser.add_argument("--tsne", nargs="+", default=["annoy", "exact"], choices=sorted(TSNE), help="t-SNE settings")
    args = parser.parse_args()

    from clustering_round import correspondence, planted_features
    from sklearn.metrics import adjusted_rand_score

    from aiva_monai.clustering import ClusteringSettings, cluster_sites

    k = 12
    print("| planted seed | t-SNE | openTSNE threads | ARI source / target vs truth |", end="")
    print(" right pairs, t-SNE map (AIVA) |", end="")
    print(" right pairs, PCA space (same clusters) | seconds |\n|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        source, target, source_modes, target_modes, _ = planted_features(seed, k)
        for tsne, jobs in [(tsne, jobs) for tsne in args.tsne for jobs in args.jobs]:
            start = time.perf_counter()
            result = cluster_sites(source, target, k, ClusteringSettings(n_jobs=jobs, **TSNE[tsne]))
            seconds = time.perf_counter() - start
            source_of = correspondence(result.source_labels, source_modes, k)
            target_of = correspondence(result.target_labels, target_modes, k)
            pca_match = result.matches["pca"]
            right_tsne = sum(int(target_of[i]) == int(source_of[result.match[i]]) for i in range(k))
            right_pca = sum(int(target_of[i]) == int(source_of[pca_match[i]]) for i in range(k))
            ari = (
                adjusted_rand_score(source_modes, result.source_labels),
                adjusted_rand_score(target_modes, result.target_labels),
            )
            row = [seed, tsne, jobs, f"{ari[0]:.3f} / {ari[1]:.3f}", f"{right_tsne}/{k}", f"{right_pca}/{k}"]
            row.append(round(seconds))
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
