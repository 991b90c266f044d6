"""One AIVA clustering round at the brain bundle's real geometry on IXI-HH: today's round vs the new one.

Side by side in one process, on the same slices and the same network (the shipped IXI-HH source model,
``bundles/aiva_brain/models/model.pt``), with the bundle's preprocessing (2 mm, 128 x 128 sagittal slices):

1. embedding speed: the full forward (what the round ran before issue 14) vs the encoder only
   (``networks.encode``), plain, channels-last, with BatchNorm folded (``fold_batchnorm``) and that in bfloat16,
   interleaved on the same batches; ms per slice;
2. one round each way (``embed_and_cluster``), seconds per stage, peak extra memory, and the longest
   silence between two log lines:
   - "today": full network, source means by a second pass, openTSNE's defaults (250 + 500 iterations,
     Annoy neighbours, FFT grid cell 1) = ``TODAY`` below;
   - "new": the brain bundle's CPU settings: ``ClusteringSettings``'s defaults (encoder only, channels-last,
     one pass with a float16 feature store, 250 + 250 t-SNE iterations, exact neighbours, FFT grid cell 2),
     batch 8 and ``precision="cpu_bfloat16"``
     (``--batch``, ``--precision``; ``--compare-precision float32`` adds the new round in float32 beside it);
   and how well they agree: adjusted Rand index of the target clusters and of the source clusters, and
   whether matched clusters correspond (each new cluster mapped to the today cluster holding most of its
   slices);
3. planted structure (12 modes, a shifted and rescaled target; ``--planted-seeds``, default 0 1 2): the clusters
   and mode-to-mode matches of both rounds' clustering (and of a warm-started round on moved features; the new
   round's clusters also matched in the PCA space, ``match_space="pca"``);
4. warm start on IXI features (``--warm-steps`` > 0): the network is moved by that many AIVA steps, then
   the new round's t-SNE from scratch vs warm-started from the first round's embedding, same sketches;
5. seed stability (``--stability-seeds N`` > 1): one encoder-only pass, then the clustering (t-SNE + k-means +
   matching) of today's schedule and of the new one, each with seeds 0 .. N-1 on the same sketches: how well
   today's round agrees with itself under another seed is the ceiling any new round can reach against it;
6. training steps (``--rate-steps`` > 0): plain source fine-tuning (MONAI ``SupervisedTrainer``, batch 8) vs
   AIVA (``AIVATrainer``, batch 8 + 8, the first round's clusters), both with ``train.json``'s trainable
   parameters (``frozen_modules``) and Adam, alternated twice from the same weights, mean seconds per step after
   warm-up steps; then the clustering share of AIVA's wall time at the paper's schedule (a round every
   1,000 steps) = round / (round + 1,000 x AIVA step), for today's round and the new one;
7. a thinned source (``--compare-source-stride N ...``): the new round clustering every N-th source slice
   (``source_stride``; the whole target), its stages and its agreement with the full rounds on the source
   slices it clustered, and on planted structure (every N-th source row).

    OMP_NUM_THREADS=1 python benchmarks/clustering_round.py                  # 80 + 15 subjects, 1 thread
    python benchmarks/clustering_round.py --source-subjects 20 --target-subjects 5 --warm-steps 0   # quick
    python benchmarks/clustering_round.py --device cuda --threads 16 --tsne-jobs 16                # a GPU
    OMP_NUM_THREADS=1 python benchmarks/clustering_round.py --warm-steps 0 --compare-source-stride 2 4   # thinned

Prints markdown tables; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

# the round before issue 14, with the brain bundle's CPU embedding batch of then
TODAY = dict(
    encoder_only=False,
    channels_last=False,
    source_means="second_pass",
    tsne_iter=500,
    batch_size=16,
    tsne_neighbors="auto",
    tsne_fft_cell=1.0,
)


class Silences(logging.Handler):
    """Records when each log line was written; ``longest(since)`` is the longest gap between lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times = []

    def emit(self, record):
        self.times.append(time.perf_counter())

    def longest(self, start: float, end: float) -> float:
        marks = [start] + [t for t in self.times if start <= t <= end] + [end]
        return max(b - a for a, b in zip(marks, marks[1:]))


class PeakMemory:
    """Peak resident memory (MB) above the level at entry, sampled every 50 ms."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra_mb = self.peak - self.base


def configure_run(threads: int, log_format: str = "%(asctime)s %(message)s") -> Silences:
    """torch threads, log lines to stdout (library INFO, MONAI / ignite warnings only); returns the recorder of the
    library's log times."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=log_format, stream=sys.stdout)
    for noisy in ("monai", "ignite", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silences = Silences()
    logging.getLogger("aiva_monai").addHandler(silences)
    return silences


def shipped_source_model(device):
    """The brain bundle's shipped IXI-HH source model (``models/model.pt``) on ``device``."""
    import torch

    from aiva_monai.networks import PreActResUNet

    network = PreActResUNet()
    network.load_state_dict(
        torch.load(REPOSITORY / "bundles" / "aiva_brain" / "models" / "model.pt", map_location="cpu", weights_only=True)
    )
    return network.to(device)


def datasets(args):
    from aiva_monai.bundle import entries
    from aiva_monai.data import SliceDataset, volume_transforms

    datalist = REPOSITORY / "bundles" / "aiva_brain" / "configs" / "datalist_ixi_hh.json"
    preprocessing = volume_transforms(pixdim=[2.0, 2.0, 2.0], in_plane_size=[128, 128], slice_axis=0)
    source = SliceDataset(
        entries(datalist, "training", "ixi_hh", args.data)[: args.source_subjects],
        preprocessing,
        slice_axis=0,
        progress=False,
    )
    target = SliceDataset(
        entries(datalist, "training", "ixi_hh_simulated_strong", args.data, labels=False)[: args.target_subjects],
        preprocessing,
        keys=("image",),
        slice_axis=0,
        progress=False,
    )
    return source, target


def embedding_speed(network, source, device, batch: int, slices: int, repeats: int) -> dict:
    import torch

    from aiva_monai.folding import fold_batchnorm
    from aiva_monai.networks import BottleneckTap, encode

    images = torch.stack([source[i]["image"] for i in range(min(slices, len(source)))]).to(device)
    tap = BottleneckTap(network)
    folded = fold_batchnorm(network)

    def bfloat16(x):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return encode(folded, x, channels_last=True)

    ways = {
        "full forward (today)": lambda x: (network(x), tap.features)[1],
        "encoder only": lambda x: encode(network, x),
        "encoder only, channels-last": lambda x: encode(network, x, channels_last=True),
        "encoder only, channels-last, BatchNorm folded": lambda x: encode(folded, x, channels_last=True),
        "the same in bfloat16 autocast": bfloat16,
    }
    times = {name: [] for name in ways}
    network.eval()
    with torch.no_grad():
        for name, way in ways.items():  # warm-up
            way(images[:batch])
        for _ in range(repeats):
            for name, way in ways.items():  # interleaved: the same load on all of them
                sync(device)
                start = time.perf_counter()
                for begin in range(0, len(images), batch):
                    way(images[begin : begin + batch])
                sync(device)
                times[name].append((time.perf_counter() - start) / len(images))
    tap.remove()
    return {name: 1000 * sorted(values)[len(values) // 2] for name, values in times.items()}


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def one_round(name, network, source, target, settings, device, silences, amp):
    from aiva_monai.embedding import embed_and_cluster
    from aiva_monai.network_pass import NetworkPass
    from aiva_monai.networks import BottleneckTap
    from aiva_monai.progress import RoundProgress

    print(f"\n-- round: {name} --", flush=True)
    with BottleneckTap(network) as tap, PeakMemory() as memory:
        start = time.perf_counter()
        result = embed_and_cluster(
            network,
            tap,
            source,
            target,
            12,
            settings,
            NetworkPass(device=device, amp=amp),
            report=RoundProgress(logging.getLogger("aiva_monai.embedding"), f"AIVA [{name}] ", settings.log_every_s),
        )
        end = time.perf_counter()
    return result, {"wall": end - start, "extra_mb": memory.extra_mb, "longest_silence": silences.longest(start, end)}


def correspondence(new_labels, old_labels, k):
    import numpy as np

    return np.array(
        [
            np.bincount(old_labels[new_labels == c], minlength=k).argmax() if (new_labels == c).any() else -1
            for c in range(k)
        ]
    )


def agreement(new, old, k=12) -> dict:
    from sklearn.metrics import adjusted_rand_score

    # a round with a thinned source (source_stride) is compared on the source slices it clustered
    assert old.source_rows is None, "the reference round must cluster every source slice"
    old_source = old.source_labels if new.source_rows is None else old.source_labels[new.source_rows]
    target_map = correspondence(new.target_labels, old.target_labels, k)
    source_map = correspondence(new.source_labels, old_source, k)
    same = sum(int(old.match[target_map[i]] == source_map[new.match[i]]) for i in range(k))
    return {
        "ari_target": adjusted_rand_score(old.target_labels, new.target_labels),
        "ari_source": adjusted_rand_score(old_source, new.source_labels),
        "matches_agreeing": same,
    }


def planted_features(seed: int, k: int = 12, per_mode: int = 100, n_features: int = 4096):
    """(source (k * per_mode, n_features), target (same), source_modes, target_modes, rng): k planted modes per
    site, the target scaled by 1.3 and shifted (a scanner change); ``rng`` continues the same random stream."""
    import numpy as np

    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(k, n_features))
    source_modes = np.repeat(np.arange(k), per_mode)
    target_modes = rng.permutation(source_modes)
    source = (modes[source_modes] + rng.normal(size=(k * per_mode, n_features))).astype(np.float32)
    target = (
        1.3 * (modes[target_modes] + rng.normal(size=(k * per_mode, n_features))) + 0.3 * rng.normal(size=n_features)
    ).astype(np.float32)
    return source, target, source_modes, target_modes, rng


def planted(settings_today, settings_new, seed: int = 0, strides=()) -> list[dict]:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from aiva_monai.clustering import cluster_sites

    k = 12
    source, target, source_modes, target_modes, rng = planted_features(seed, k)
    rows = []
    results = {}

    def mode_matches(result, match=None):
        source_of = correspondence(result.source_labels, source_modes, k)
        target_of = correspondence(result.target_labels, target_modes, k)
        match = result.match if match is None else match
        return {int(target_of[i]): int(source_of[match[i]]) for i in range(k)}

    for name, settings, features in (("today", settings_today, source), ("new", settings_new, source)):
        start = time.perf_counter()
        results[name] = cluster_sites(features, target, k, settings)
        rows.append(
            {
                "round": name,
                "seconds": time.perf_counter() - start,
                "ari_source_vs_truth": adjusted_rand_score(source_modes, results[name].source_labels),
                "ari_target_vs_truth": adjusted_rand_score(target_modes, results[name].target_labels),
                "mode_matches": mode_matches(results[name]),
            }
        )
    new = results["new"]
    rows.append(  # the same clusters, matched by their member means in the PCA space (match_space="pca")
        {
            **rows[-1],
            "round": "new, matched in the PCA space",
            "seconds": 0.0,
            "mode_matches": mode_matches(new, new.matches["pca"]),
        }
    )
    for stride in strides:  # a thinned source: every stride-th source row (what source_stride embeds)
        start = time.perf_counter()
        thinned = cluster_sites(source[::stride], target, k, settings_new)
        thinned_modes = source_modes[::stride]
        source_of = correspondence(thinned.source_labels, thinned_modes, k)
        target_of = correspondence(thinned.target_labels, target_modes, k)
        rows.append(
            {
                "round": f"new, 1 in {stride} source rows",
                "seconds": time.perf_counter() - start,
                "ari_source_vs_truth": adjusted_rand_score(thinned_modes, thinned.source_labels),
                "ari_target_vs_truth": adjusted_rand_score(target_modes, thinned.target_labels),
                "mode_matches": {int(target_of[i]): int(source_of[thinned.match[i]]) for i in range(k)},
            }
        )
    moved = source + 0.3 * rng.normal(size=source.shape).astype(np.float32)  # the features after some training
    start = time.perf_counter()
    import torch

    from aiva_monai.clustering import FeatureProjector, cluster_sketches

    projector = FeatureProjector(source.shape[1], settings_new.sketch_dim, settings_new.seed)
    sketch = lambda x: projector(torch.from_numpy(x)).numpy()  # noqa: E731
    warm = cluster_sketches(
        sketch(moved),
        sketch(target),
        k,
        settings_new.replace(tsne_warm_start=True),
        init_embedding=results["new"].embedding,
    )
    rows.append(
        {
            "round": "new, warm-started on moved features",
            "seconds": time.perf_counter() - start,
            "ari_source_vs_truth": adjusted_rand_score(source_modes, warm.source_labels),
            "ari_target_vs_truth": adjusted_rand_score(target_modes, warm.target_labels),
            "mode_matches": mode_matches(warm),
        }
    )
    for row in rows:
        row["identical_matches"] = row["mode_matches"] == rows[0]["mode_matches"] == {m: m for m in range(k)}
    return rows


def aiva_trainer(network, source, target, result, epoch_length: int, optimizer, calibration: int, device):
    """An ``AIVATrainer`` (batch 8 + 8, seeded order) that trains with ``result``'s clusters and source means."""
    import torch
    from ignite.engine import Events
    from monai.data import DataLoader

    from aiva_monai.data import SeededEndlessSampler
    from aiva_monai.engines import AIVATrainer, ClusterAssignment
    from aiva_monai.losses import AIVALoss

    trainer = AIVATrainer(
        device=device,
        max_epochs=1,
        epoch_length=epoch_length,
        network=network,
        train_data_loader=DataLoader(source, batch_size=8, sampler=SeededEndlessSampler(source, seed=0)),
        target_data_loader=DataLoader(target, batch_size=8, sampler=SeededEndlessSampler(target, seed=1)),
        optimizer=optimizer,
        loss_function=AIVALoss(calibration_iterations=calibration),
        decollate=False,
    )
    assignment = ClusterAssignment(
        torch.as_tensor(result.target_labels), result.source_means.to(device), torch.as_tensor(result.match), 1
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(e.state, "aiva_assignment", assignment))
    return trainer


def move_network(network, source, target, result, steps: int, device):
    """``steps`` AIVA steps (batch 8 + 8, Adam 1e-4, the bundle's defaults) with ``result``'s clusters."""
    import torch

    trainer = aiva_trainer(
        network, source, target, result, steps, torch.optim.Adam(network.parameters(), 1e-4), 10, device
    )
    start = time.perf_counter()
    trainer.run()
    trainer.bottleneck_tap.remove()
    return time.perf_counter() - start


def step_rates(network, source, target, result, steps: int, warmup: int, device, repeats: int = 2) -> dict:
    """Seconds per training step (mean over ``repeats`` alternated runs; each run's first ``warmup`` steps
    untimed) of plain fine-tuning and of AIVA, from copies of ``network`` with ``train.json``'s frozen modules."""
    import copy

    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    from aiva_monai.data import SeededEndlessSampler
    from aiva_monai.engines import default_seg_loss
    from aiva_monai.optim import trainable_parameters

    train_config = REPOSITORY / "bundles" / "aiva_brain" / "configs" / "train.json"
    frozen = ConfigParser.load_config_file(train_config)["frozen_modules"]

    def build(kind):
        net = copy.deepcopy(network).to(device)
        optimizer = torch.optim.Adam(trainable_parameters(net, frozen), 1e-4)
        if kind == "aiva":
            return aiva_trainer(net, source, target, result, warmup + steps, optimizer, warmup, device)
        return SupervisedTrainer(
            device=device,
            max_epochs=1,
            epoch_length=warmup + steps,
            train_data_loader=DataLoader(source, batch_size=8, sampler=SeededEndlessSampler(source, seed=0)),
            network=net,
            optimizer=optimizer,
            decollate=False,
            loss_function=default_seg_loss(),
        )

    seconds = {"plain": [], "aiva": []}
    for _ in range(repeats):
        for kind in seconds:
            trainer = build(kind)
            marks = []
            trainer.add_event_handler(
                Events.ITERATION_COMPLETED, lambda e: (sync(device), marks.append(time.perf_counter()))
            )
            trainer.run()
            if kind == "aiva":
                trainer.bottleneck_tap.remove()
            seconds[kind].append((marks[-1] - marks[warmup - 1]) / steps)
            print(f"{kind}: {seconds[kind][-1]:.3f} s per step", flush=True)
    return {kind: sum(values) / len(values) for kind, values in seconds.items()}


def warm_start(network, source, target, first, settings, device) -> list[dict]:
    from aiva_monai.embedding import cluster_embedded, embed_sites
    from aiva_monai.network_pass import NetworkPass
    from aiva_monai.networks import BottleneckTap

    with BottleneckTap(network) as tap:
        embedded = embed_sites(network, tap, source, target, settings, NetworkPass(device=device))
    rows, results = [], {}
    try:
        for name, init in (("from scratch", None), ("warm-started", first.embedding)):
            start = time.perf_counter()
            results[name] = cluster_embedded(
                embedded, 12, settings.replace(tsne_warm_start=init is not None), init_embedding=init
            )
            rows.append(
                {
                    "t-SNE": name,
                    "seconds": time.perf_counter() - start,
                    **{f"{k}_s": v for k, v in results[name].timings.items()},
                }
            )
    finally:
        embedded.close()
    rows[1].update(agreement(results["warm-started"], results["from scratch"]))
    return rows


def stability(network, source, target, schedules: dict, seeds: int, device) -> list[dict]:
    """Agreement of each schedule's clustering with itself and with the other schedule across seeds, on one
    pass's sketches (the embedding of the last schedule's settings, the encoder-only pass: its features equal
    the full forward's): ARI and matches of every (schedule, seed) against (the first schedule, seed 0) and
    against (the same schedule, seed 0)."""
    from aiva_monai.embedding import cluster_embedded, embed_sites
    from aiva_monai.network_pass import NetworkPass
    from aiva_monai.networks import BottleneckTap

    embedding_settings = list(schedules.values())[-1]
    print("\n-- seed stability: one pass, then every schedule x seed --", flush=True)
    with BottleneckTap(network) as tap:
        embedded = embed_sites(network, tap, source, target, embedding_settings, NetworkPass(device=device))
    results = {}
    try:
        for name, settings in schedules.items():
            for seed in range(seeds):
                start = time.perf_counter()
                results[name, seed] = cluster_embedded(embedded, 12, settings.replace(seed=seed))
                print(f"{name}, seed {seed}: clustered in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        embedded.close()
    reference = next(iter(results))
    rows = []
    for (name, seed), result in results.items():
        rows.append(
            {
                "schedule": name,
                "seed": seed,
                "vs_same_schedule_seed0": agreement(result, results[name, 0]),
                "vs_first_schedule_seed0": agreement(result, results[reference]),
            }
        )
    return rows


def print_stability(rows: list[dict]) -> None:
    print(
        "\nseed stability (one pass; t-SNE + k-means + matching with each seed on the same sketches):\n\n"
        "| schedule | seed | ARI target vs same schedule seed 0 | ARI source | matches | ARI target vs today "
        "seed 0 | ARI source | matches |\n|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        same, first = row["vs_same_schedule_seed0"], row["vs_first_schedule_seed0"]
        print(
            f"| {row['schedule']} | {row['seed']} | {same['ari_target']:.3f} | {same['ari_source']:.3f} | "
            f"{same['matches_agreeing']}/12 | {first['ari_target']:.3f} | {first['ari_source']:.3f} | "
            f"{first['matches_agreeing']}/12 |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=os.environ.get("AIVA_IXI_ROOT", str(REPOSITORY.parent / "shared" / "data" / "ixi_hh"))
    )
    parser.add_argument("--source-subjects", type=int, default=80)
    parser.add_argument("--target-subjects", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="CUDA mixed precision for the embedding pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the issue's setting: 1)")
    parser.add_argument("--tsne-jobs", type=int, default=1, help="openTSNE threads (n_jobs)")
    parser.add_argument(
        "--precision",
        default="cpu_bfloat16",
        choices=["auto", "cpu_bfloat16", "float32", "bfloat16", "float16"],
        help="the new round's embedding-pass precision (ClusteringSettings.precision; default: the brain "
        "bundle's, bfloat16 on a CPU with bfloat16 instructions)",
    )
    parser.add_argument("--batch", type=int, default=8, help="the new round's embedding batch (the bundle's CPU one)")
    parser.add_argument("--speed-slices", type=int, default=512)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--skip-today", action="store_true", help="only the new round (no comparison)")
    parser.add_argument(
        "--compare-precision",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="also run the new round in this autocast precision and compare it with the new round",
    )
    parser.add_argument(
        "--planted-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of the planted structure (12 modes; benchmarks/planted_matching.py's seeds)",
    )
    parser.add_argument(
        "--compare-source-stride",
        type=int,
        nargs="*",
        default=[],
        help="also run the new round clustering every N-th source slice (source_stride) and compare it",
    )
    parser.add_argument(
        "--warm-steps", type=int, default=50, help="AIVA steps before the warm-start comparison (0: skip)"
    )
    parser.add_argument(
        "--rate-steps", type=int, default=20, help="timed training steps per loop for steps/s (0: skip)"
    )
    parser.add_argument("--rate-warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--stability-seeds", type=int, default=0, help="seeds of the stability section (0: skip; >= 2 to run it)"
    )
    parser.add_argument("--only-stability", action="store_true", help="run the stability section alone")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()

    silences = configure_run(args.threads)

    from aiva_monai.clustering import ClusteringSettings
    from aiva_monai.network_pass import pass_dtype

    load = os.getloadavg()
    start = time.perf_counter()
    source, target = datasets(args)
    print(
        f"data: {len(source)} source slices ({args.source_subjects} subjects) + {len(target)} target slices "
        f"({args.target_subjects} subjects, simulated scanner 'strong'), 128 x 128, "
        f"cached in {time.perf_counter() - start:.0f} s"
    )
    network = shipped_source_model(args.device)
    new = ClusteringSettings(batch_size=args.batch, n_jobs=args.tsne_jobs, precision=args.precision)
    today = new.replace(**TODAY, precision="auto")
    report = {
        "machine": f"{os.cpu_count()} CPUs, load average at start {load[0]:.1f}",
        "threads": args.threads,
        "tsne_jobs": args.tsne_jobs,
        "precision": f"{args.precision} ({pass_dtype(args.device, args.precision, args.amp)})",
        "device": args.device,
        "n_source": len(source),
        "n_target": len(target),
    }

    if args.only_stability:
        report["stability"] = stability(
            network, source, target, {"today": today, "new": new}, max(2, args.stability_seeds), args.device
        )
        print(f"\n## IXI-HH, bundle geometry: {len(source)} + {len(target)} slices; {report['machine']}")
        print_stability(report["stability"])
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        return
    speed = embedding_speed(network, source, args.device, args.batch, args.speed_slices, args.speed_repeats)
    report["embedding_ms_per_slice"] = speed

    rounds = {"new": one_round("new", network, source, target, new, args.device, silences, args.amp)}
    if not args.skip_today:
        rounds["today"] = one_round("today", network, source, target, today, args.device, silences, args.amp)
    report["rounds"] = {
        name: {**{k: float(v) for k, v in r.timings.items()}, **info} for name, (r, info) in rounds.items()
    }
    if args.compare_precision:
        name = f"new, {args.compare_precision}"
        rounds[name] = one_round(
            name,
            network,
            source,
            target,
            new.replace(precision=args.compare_precision),
            args.device,
            silences,
            args.amp,
        )
        report["rounds"][name] = {**{k: float(v) for k, v in rounds[name][0].timings.items()}, **rounds[name][1]}
        report["precision_agreement"] = agreement(rounds[name][0], rounds["new"][0])
        if "today" in rounds:
            report["precision_vs_today"] = agreement(rounds[name][0], rounds["today"][0])
    for stride in args.compare_source_stride:
        name = f"new, 1 in {stride} source slices"
        rounds[name] = one_round(
            name, network, source, target, new.replace(source_stride=stride), args.device, silences, args.amp
        )
        report["rounds"][name] = {**{k: float(v) for k, v in rounds[name][0].timings.items()}, **rounds[name][1]}
        report.setdefault("stride_agreement", {})[name] = {
            f"vs {other}": agreement(rounds[name][0], rounds[other][0]) for other in ("new", "today") if other in rounds
        }
    if "today" in rounds:
        report["agreement"] = agreement(rounds["new"][0], rounds["today"][0])
    report["planted"] = [
        {"seed": seed, **row}
        for seed in args.planted_seeds
        for row in planted(today, new, seed=seed, strides=args.compare_source_stride)
    ]
    if args.stability_seeds > 1:
        report["stability"] = stability(
            network, source, target, {"today": today, "new": new}, args.stability_seeds, args.device
        )
    if args.rate_steps:
        report["seconds_per_step"] = step_rates(
            network, source, target, rounds["new"][0], args.rate_steps, args.rate_warmup, args.device
        )
    if args.warm_steps:
        report["moved_by_steps"] = args.warm_steps
        report["move_seconds"] = move_network(network, source, target, rounds["new"][0], args.warm_steps, args.device)
        report["warm_start"] = warm_start(network, source, target, rounds["new"][0], new, args.device)
    report["load_average_end"] = os.getloadavg()[0]

    print(
        f"\n## IXI-HH, bundle geometry: {len(source)} + {len(target)} slices of 128 x 128; device {args.device}; "
        f"{args.threads} torch thread(s), openTSNE n_jobs {args.tsne_jobs}; "
        f"new round's precision {report['precision']}, batch {args.batch}; "
        f"{report['machine']}, "
        f"at the end {report['load_average_end']:.1f}\n"
    )
    full = speed["full forward (today)"]
    print("| embedding pass | ms per slice | speed-up vs full forward |\n|---|---|---|")
    for name, ms in speed.items():
        print(f"| {name} | {ms:.1f} | {full / ms:.2f} x |")
    stages = ["embed", "pca", "tsne", "kmeans", "match", "means"]
    print(
        "\n| round | "
        + " | ".join(f"{s} s" for s in stages)
        + " | total s | peak extra memory MB | longest log silence s |"
    )
    print("|---|" + "---|" * (len(stages) + 3))
    for name, row in report["rounds"].items():
        print(
            f"| {name} | "
            + " | ".join(f"{row.get(s, 0.0):.1f}" for s in stages)
            + f" | {row['wall']:.1f} | {row['extra_mb']:.0f} | {row['longest_silence']:.1f} |"
        )
    if "today" in report["rounds"]:
        a = report["agreement"]
        print(
            f"\nnew vs today: {report['rounds']['today']['wall'] / report['rounds']['new']['wall']:.1f} x "
            "faster end to end; "
            f"ARI target clusters {a['ari_target']:.3f}, source clusters {a['ari_source']:.3f}; "
            f"matched pairs that correspond: {a['matches_agreeing']}/12"
        )
    if args.compare_precision:
        a, name = report["precision_agreement"], f"new, {args.compare_precision}"
        ratio = report["rounds"]["new"]["wall"] / report["rounds"][name]["wall"]
        print(
            f"\n{name} vs new ({new.precision}): {ratio:.1f} x faster end to end; "
            f"ARI target clusters {a['ari_target']:.3f}, source clusters {a['ari_source']:.3f}; "
            f"matched pairs that correspond: {a['matches_agreeing']}/12"
        )
        if "precision_vs_today" in report:
            a = report["precision_vs_today"]
            print(
                f"\n{name} vs today: ARI target clusters {a['ari_target']:.3f}, source clusters "
                f"{a['ari_source']:.3f}; matched pairs that correspond: {a['matches_agreeing']}/12"
            )
    for name, comparisons in report.get("stride_agreement", {}).items():
        for other, a in comparisons.items():
            ratio = report["rounds"][other.removeprefix("vs ")]["wall"] / report["rounds"][name]["wall"]
            print(
                f"\n{name} {other}: {ratio:.1f} x faster end to end; ARI target clusters {a['ari_target']:.3f}, "
                f"source clusters (on the slices clustered) {a['ari_source']:.3f}; "
                f"matched pairs that correspond: {a['matches_agreeing']}/12"
            )
    print(
        "\n| planted modes (12 x 100 per site, 4,096 features) | seed | seconds | ARI source vs truth "
        "| ARI target vs truth | matches = true mode pairs |\n|---|---|---|---|---|---|"
    )
    for row in report["planted"]:
        right = sum(int(t == s) for t, s in row["mode_matches"].items())
        print(
            f"| {row['round']} | {row['seed']} | {row['seconds']:.1f} | {row['ari_source_vs_truth']:.3f} | "
            f"{row['ari_target_vs_truth']:.3f} | {right}/12 |"
        )
    if args.stability_seeds > 1:
        print_stability(report["stability"])
    if args.rate_steps:
        per_step = report["seconds_per_step"]
        print(
            f"\ntraining steps (batch 8, AIVA 8 + 8; train.json's trainable parameters; mean of 2 alternated runs of "
            f"{args.rate_steps} timed steps): plain fine-tuning {1 / per_step['plain']:.3f} steps/s, "
            f"AIVA {1 / per_step['aiva']:.3f} "
            f"steps/s, AIVA / plain {per_step['plain'] / per_step['aiva']:.2f}\n"
        )
        print(
            "| round | round s | 1,000 AIVA steps s "
            "| clustering share of AIVA wall time (a round every 1,000 steps) |\n|---|---|---|---|"
        )
        for name, row in report["rounds"].items():
            training = 1000 * per_step["aiva"]
            report["rounds"][name]["share_at_1000_steps"] = row["wall"] / (row["wall"] + training)
            print(
                f"| {name} | {row['wall']:.1f} | {training:.0f} | "
                f"{100 * row['wall'] / (row['wall'] + training):.1f} % |"
            )
    if args.warm_steps:
        print(f"\nwarm start after {args.warm_steps} AIVA steps ({report['move_seconds']:.0f} s), same sketches:\n")
        print(
            "| t-SNE | clustering s (pca + tsne + kmeans + match) | tsne s | ARI target vs from scratch | ARI source "
            "| matched pairs that correspond |\n|---|---|---|---|---|---|"
        )
        for row in report["warm_start"]:
            print(
                f"| {row['t-SNE']} | {row['seconds']:.1f} | {row['tsne_s']:.1f} | {row.get('ari_target', 1.0):.3f} | "
                f"{row.get('ari_source', 1.0):.3f} | {row.get('matches_agreeing', 12)}/12 |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
