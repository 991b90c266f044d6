#!/usr/bin/env bash
# Downloads (here, where PyPI answers) the Python 3.12 wheels that a GPU machine without aiva-monai's
# dependencies needs to run benchmarks/gpu/run.sh: its image has torch, numpy, scipy, scikit-learn, matplotlib,
# tensorboard, tqdm, psutil and pyyaml, but not MONAI, Ignite, nibabel or openTSNE. POT (SegJDoT),
# SimpleITK (DICOM) and jsonschema (the metadata check) are left out: nothing the script runs imports them
# (tests/test_optional_imports.py), and with the first two the wheels would pass the 64 MiB that travels.
# About 9 MB in all, into <repo>/.whl (git-ignored: .git/info/exclude, see benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/fetch_wheels.sh            # then, on the GPU machine: bash benchmarks/gpu/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-$root/.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
# the versions this repository is tested with (pip list of the development machine)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 openTSNE==1.0.4
ls -l "$dest"
du -sh "$dest"
