"""The embedding pass's encoder run without a break: ms per slice in every 5-second window.

The speed table of ``clustering_round.py`` times short interleaved bursts; a clustering round runs the encoder for
a minute or more. This runs the brain bundle's CPU pass (the shipped IXI-HH model, BatchNorm folded, channels-last,
batch 8, 128 x 128) on one fixed batch for ``--seconds`` and prints each window, to show whether the machine keeps
the burst speed (a CPU lowering its clock under sustained AMX work, or a busy host, does not).

    OMP_NUM_THREADS=1 python benchmarks/sustained_encoder.py --precision bfloat16 --seconds 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per printed window")
    args = parser.parse_args()

    import torch

    from aiva_monai.folding import fold_batchnorm
    from aiva_monai.network_pass import _autocast
    from aiva_monai.networks import BottleneckTap, PreActResUNet, encode

    torch.set_num_threads(1)
    network = PreActResUNet()
    network.load_state_dict(
        torch.load(REPOSITORY / "bundles" / "aiva_brain" / "models" / "model.pt", map_location="cpu", weights_only=True)
    )
    network.eval()
    images = torch.randn(args.batch, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    print(f"| seconds since start | ms per slice ({args.precision}, batch {args.batch}) |\n|---|---|")
    with BottleneckTap(network) as tap, torch.no_grad():
        folded = fold_batchnorm(network, tap.module_name)
        start = window_start = time.perf_counter()
        slices = 0
        while time.perf_counter() - start < args.seconds:
            with _autocast("cpu", args.precision, False, None):
                encode(folded, images, tap.module_name, channels_last=True)
            slices += args.batch
            now = time.perf_counter()
            if now - window_start >= args.window:
                print(f"| {now - start:.0f} | {(now - window_start) / slices * 1000:.2f} |", flush=True)
                window_start, slices = now, 0


if __name__ == "__main__":
    main()
