"""The exact script that evaluated this experiment's picks (2026-12-02, with that machine's /work paths): the
runner's own evaluation command for each cell, reduced to the target_agreement pick (and the map runs' last
checkpoint), no cluster figure. Kept as the record of how the table's AIVA numbers were made."""

import glob, json, subprocess, sys, os

jobs = []
for C in ("sync", "pca"):
    for S in (0, 1, 2):
        run = glob.glob(f"/work/results/ixm_{C}_seed{S}/runs/*/")[0]
        picks = json.load(open(run + "selection.json"))["picks"]
        clone = "/work/exp_sync" if C == "sync" else "/work/exp_pca"
        out = f"/work/results/ixm_eval/{C}_seed{S}"
        os.makedirs(out, exist_ok=True)
        ckpts = {
            "aiva [target_agreement]": run + picks["target_agreement"]["file"],
            "aiva [last]": run + picks["last"]["file"],
        }
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            json.dumps(
                [f"{clone}/bundles/aiva_brain/configs/train.json", f"{clone}/bundles/aiva_brain/configs/evaluate.json"]
            ),
            "--dataset_dir",
            "/work/shared/data/ixi_hh",
            "--datalist",
            f"/work/results/ixm_{C}_seed{S}/datalist_subset.json",
            "--target_site",
            "ixi_hh_simulated_strong",
            "--source_site",
            "ixi_hh",
            "--source_checkpoint",
            f"{clone}/bundles/aiva_brain/models/model.pt",
            "--output_dir",
            out,
            "--seed",
            str(S),
            "--eval_checkpoints",
            json.dumps(ckpts),
            "--cluster_figure",
            "False",
            "--tolerances_mm",
            "[1.0, 2.0]",
        ]
        if C == "pca":
            cmd += ["--cluster_options#match_space", "pca"]
        jobs.append((cmd, out, clone))
procs = []
for i, (cmd, out, clone) in enumerate(jobs):
    env = dict(os.environ, PYTHONPATH=clone, OMP_NUM_THREADS="1")
    procs.append(
        subprocess.Popen(cmd, stdout=open(out + "/eval.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=clone)
    )
    if len([p for p in procs if p.poll() is None]) >= 3:
        while len([p for p in procs if p.poll() is None]) >= 3:
            import time

            time.sleep(5)
for p in procs:
    p.wait()
print([p.returncode for p in procs])
