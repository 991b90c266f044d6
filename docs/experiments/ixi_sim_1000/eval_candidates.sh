#!/bin/bash
# usage: eval_candidates.sh SEED  -- target-test scores of every candidate checkpoint an (unfinished) AIVA run kept
seed=$1
run=$(ls -d /work/results/ixi_sim_1000_seed$seed/runs/*aiva__seed${seed}_k12*)
out=/work/results/partial_seed$seed
mkdir -p $out
python - "$run" "$out" <<'PY'
import json, sys, pathlib
run, out = map(pathlib.Path, sys.argv[1:])
cands = sorted((run / "selection").glob("epoch_*.pt"))
json.dump({"test_sets": {"target test": {"_target_": "CacheDataset",
    "data": "$aiva_monai.bundle.entries(@datalist_file, 'test', @target, @base_dir)",
    "transform": "@validate#preprocessing", "progress": False}},
    "eval_checkpoints": {c.stem: str(c) for c in cands}}, open(out / "overlay.json", "w"))
PY
cd /work/snap2 && OMP_NUM_THREADS=1 PYTHONPATH=/work/snap2 python -m monai.bundle run \
  --config_file "['bundles/aiva_brain/configs/train.json','bundles/aiva_brain/configs/evaluate.json','$out/overlay.json']" \
  --dataset_dir /work/shared/data/ixi_hh --datalist /work/results/ixi_sim_1000_seed$seed/datalist_subset.json \
  --target_site ixi_hh_simulated_strong --source_site ixi_hh --source_checkpoint /work/snap2/bundles/aiva_brain/models/model.pt \
  --output_dir $out --seed $seed --cluster_figure False --tolerances_mm "[1.0,2.0]" > $out/evaluate.log 2>&1
cp $run/selection.csv $out/ 2>/dev/null
echo done $?
