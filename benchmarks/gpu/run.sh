#!/usr/bin/env bash
# Issue 6's GPU figures (and issue 14's GPU round) in one prepared run, about 8 minutes on an H100 / H200:
#   1. AIVA vs plain source-only fine-tuning at CC359 scale (11,000 + 11,000 random 256 x 256 slices, 1,000
#      steps of batch 8 + 8, AMP, one clustering round): steps/s, ratio, clustering share, each stage;
#   2. one 256^3 brain volume through inference.json (read, resample, network, write mask + PNG + CSV), 3 runs;
#   3. the clustering round's CPU stages at 25,000 slices with the PCA on the GPU;
#   then benchmarks/gpu/summary.py: issue 6's targets (clustering <= 2 %, AIVA >= 0.95 x plain, < 1 s a volume).
# Every benchmark has its own time limit, writes its output as it goes, and one that fails does not stop the rest.
#
#   bash benchmarks/gpu/fetch_wheels.sh      # here, once: the missing packages as Python 3.12 wheels (.whl/, ~9 MB)
#   bash benchmarks/gpu/run.sh               # there: results in $OUT (the device tool) or benchmarks/gpu/results
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu/run.sh   # a 2-minute dry run of the same steps at toy sizes, on a CPU
#
# With the device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600).
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
out=${OUT:-$root/benchmarks/gpu/results}
mkdir -p "$out"
device=${DEVICE:-cuda}
quick=${QUICK:-0}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the packages this machine lacks (fetch_wheels.sh)
    site=${TMPDIR:-/tmp}/aiva_site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the wheels in .whl failed"; exit 1; }
    export PYTHONPATH=$site
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg

{
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    nproc
    python3 -c "import sys, torch, monai, ignite, nibabel, openTSNE, sklearn, numpy; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'| monai', monai.__version__, '| ignite', ignite.__version__, '| nibabel', nibabel.__version__, \
'| openTSNE', openTSNE.__version__, '| scikit-learn', sklearn.__version__, '| numpy', numpy.__version__)"
} 2>&1 | tee "$out/environment.txt"

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt, record a failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code"
    [ "$code" = 0 ] || failed=1
}

if [ "$quick" = 1 ]; then
    step adaptation_overhead 300 python3 benchmarks/adaptation_overhead.py --device "$device" --amp --size 64 \
        --slices 220 --iterations 20 --batch 8 --json "$out/adaptation_overhead.json"
    step inference_volume 300 python3 benchmarks/inference_volume.py --device "$device" --shape 96 96 96 \
        --repeats 2 --json "$out/inference_volume.json"
    step clustering_scale 300 python3 benchmarks/clustering_scale.py --sizes 1000 --csv "$out/clustering_scale.csv"
else
    step adaptation_overhead 330 python3 benchmarks/adaptation_overhead.py --device "$device" --amp --size 256 \
        --slices 11000 --iterations 1000 --batch 8 --workers 4 --json "$out/adaptation_overhead.json"
    step inference_volume 120 python3 benchmarks/inference_volume.py --device "$device" --repeats 3 \
        --json "$out/inference_volume.json"
    step clustering_scale 90 python3 benchmarks/clustering_scale.py --sizes 25000 --pca-device "$device" \
        --csv "$out/clustering_scale.csv"
fi
echo
python3 benchmarks/gpu/summary.py "$out" || failed=1
exit $failed
