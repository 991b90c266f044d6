"""The benchmarks that benchmarks/gpu/run.sh runs on a GPU still run (at toy sizes, on the CPU): a GPU is lent
rarely and for minutes, so a script that broke with a library change must be found here, not there. Only that
they run and what they report is checked; their timings are not."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_gpu_script_benchmarks_run_and_summary_reads_them(tmp_path):
    adaptation = _run(
        ["benchmarks/adaptation_overhead.py", "--device", "cpu", "--size", "32", "--slices", "48", "--iterations", "2"]
        + ["--warmup", "1", "--tsne-method", "sklearn", "--json", str(tmp_path / "adaptation_overhead.json")]
    )
    assert adaptation.returncode == 0, adaptation.stderr[-3000:]
    record = json.loads((tmp_path / "adaptation_overhead.json").read_text())
    run = record["runs"][-1]
    assert record["iterations"] == 2 and record["slices"] == 48
    assert set(run["stages_s"]) >= {"embed", "pca", "tsne", "kmeans", "match", "means"}
    assert run["aiva_wall_s"] > run["clustering_s"] > 0
    assert 0 < run["clustering_share"] < 1
    assert abs(run["aiva_over_plain"] - run["plain_wall_s"] / run["aiva_wall_s"]) < 1e-9

    inference = _run(
        ["benchmarks/inference_volume.py", "--device", "cpu", "--shape", "40", "40", "40", "--repeats", "1"]
        + ["--json", str(tmp_path / "inference_volume.json")]
    )
    assert inference.returncode == 0, inference.stderr[-3000:]
    (volume_run,) = json.loads((tmp_path / "inference_volume.json").read_text())["runs"]
    assert volume_run["status"] == "ok" and volume_run["case_s"] > 0

    summary = _run(["benchmarks/gpu/summary.py", str(tmp_path)])
    assert summary.returncode == 0, summary.stderr[-3000:]
    table = (tmp_path / "summary.md").read_text()
    assert f"| clustering <= 2 % of AIVA's wall time | {100 * run['clustering_share']:.1f} % |" in table
    assert "one 40x40x40 volume < 1 s" in table
    assert "not measured" not in table


def test_summary_says_what_was_not_measured(tmp_path):
    summary = _run(["benchmarks/gpu/summary.py", str(tmp_path)])
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert (tmp_path / "summary.md").read_text().count("not measured") == 2


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_are_judged_on_the_last_round_and_the_warm_volume_runs():
    summary = _summary_module()
    first = {"clustering_share": 0.5, "aiva_over_plain": 0.2, "aiva_over_plain_training_only": 0.3}
    last = {"clustering_share": 0.015, "aiva_over_plain": 0.94, "aiva_over_plain_training_only": 0.99}
    volumes = {"shape": [256, 256, 256], "runs": [{"case_s": 9.0}, {"case_s": 0.8}, {"case_s": 0.9}]}
    rows = summary.target_rows({"runs": [first, last]}, volumes)
    assert rows[0] == ("clustering <= 2 % of AIVA's wall time", "1.5 %", "yes")
    assert rows[1] == ("AIVA >= 0.95 x plain fine-tuning steps/s", "0.94 x", "no")
    assert rows[2][1] == "0.99 x"
    assert rows[3] == ("one 256x256x256 volume < 1 s (warm, case time)", "0.80 s", "yes")  # the cold first run left out
    one_run = summary.target_rows(None, {"shape": [8, 8, 8], "runs": [{"case_s": 1.5}]})
    assert one_run[-1] == ("one 8x8x8 volume < 1 s (warm, case time)", "1.50 s", "no")


def test_log_silences_finds_the_longest_wait_and_what_came_before(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-03 04:00:00,000 - INFO - start\n"
        "a warning without a timestamp\n"
        "2026-12-03 04:00:10,500 - INFO - step 1\n"
        "Loading dataset: 95%|#  | 19/20\r2026-12-03 04:01:00,500 - INFO - embedding pass started\n"
        "2026-12-03 04:01:05,000 - INFO - done\n"
    )
    result = _run(["benchmarks/log_silences.py", str(log), "--top", "1"])
    assert result.returncode == 0, result.stderr
    assert f"| {log} | 4 | 1.1 min | 50.0 | 1 |" in result.stdout
    assert "50.0 s  2026-12-03 04:00:10,500 - INFO - step 1" in result.stdout
    empty = tmp_path / "empty.log"
    empty.write_text("no timestamps\n")
    assert _run(["benchmarks/log_silences.py", str(empty)]).returncode == 1


def test_run_share_pairs_each_round_with_the_training_epoch_after_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    header = "epoch,n_source,n_target,time_embed,time_pca,time_tsne,time_kmeans,time_match,time_means\n"
    (run / "clustering_stats.csv").write_text(header + "1,700,100,50,1,30,0,0,9\n" + "2,700,100,60,0,15,0,0,2\n")
    (run / "train.log").write_text(
        "2026-12-03 10:00:00,000 - progress - INFO - training epoch 1/2 started: 250 iterations\n"
        "2026-12-03 10:04:10,000 - progress - INFO - training epoch 1/2: 250/250 iterations, 250 s elapsed, done\n"
        "2026-12-03 10:04:20,000 - aiva_monai.progress - INFO - source validation: 5/5 iterations, 10 s elapsed, done\n"
        "Loading: 50%\r2026-12-03 10:06:00,000 - progress - INFO - training epoch 2/2 started: 250 iterations\n"
        "2026-12-03 10:08:00,000 - progress - INFO - training epoch 2/2: 100/250 iterations, 120 s elapsed\n"
        "2026-12-03 10:11:00,000 - progress - INFO - training epoch 2/2: 250/250 iterations, 300 s elapsed, done\n"
    )
    out = tmp_path / "share.csv"
    result = _run(["benchmarks/run_share.py", str(run), "--csv", str(out)])
    assert result.returncode == 0, result.stderr
    # round 2: 60 + 15 + 2 = 77 s; its epoch: 300 s / 250 steps = 1.2 s per step; 77 / (77 + 1,200) = 6.03 %
    assert "| 1 | 2 | 800 | 60.0 | 15.0 | 2.0 | 77.0 | 300 / 250 | 1.200 | 6.0 % |" in result.stdout
    # round 1: 90 s; 250 s / 250 = 1 s per step; 90 / 1,090 = 8.26 %, marked as the round before any step
    assert (
        "| 1 | 1 (first: before any step) | 800 | 50.0 | 30.0 | 9.0 | 90.0 | 250 / 250 | 1.000 | 8.3 % |"
        in result.stdout
    )
    assert "rounds after the first: 1; share median 6.0 %" in result.stdout
    assert f"runs: 1 = {run}" in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert [row["round"] for row in rows] == ["1", "2"] and rows[1]["run_dir"] == str(run)
    assert abs(float(rows[1]["share"]) - 77 / 1277) < 1e-12
    assert "at a round per 500 steps" in _run(["benchmarks/run_share.py", str(run), "--steps-per-round", "500"]).stdout

    one_epoch = tmp_path / "one_epoch"  # max_epochs 1: the lines say "training", not "training epoch 1/1"
    one_epoch.mkdir()
    (one_epoch / "clustering_stats.csv").write_text(header + "1,700,100,50,1,30,0,0,9\n")
    (one_epoch / "train.log").write_text(
        "2026-12-03 10:00:00,000 - progress - INFO - training started: 100 iterations\n"
        "2026-12-03 10:03:20,000 - progress - INFO - training: 100/100 iterations, 200 s elapsed, done\n"
    )
    single = _run(["benchmarks/run_share.py", str(one_epoch)])  # 90 / (90 + 1,000 x 2) = 4.3 %
    assert single.returncode == 0 and "| 90.0 | 200 / 100 | 2.000 | 4.3 % |" in single.stdout, single.stdout

    (run / "train.log").write_text("2026-12-03 10:00:00,000 - INFO - an old log without progress lines\n")
    old = _run(["benchmarks/run_share.py", str(run)])
    assert old.returncode == 1 and "logs of bundles before 0.2.6" in old.stderr
    missing = _run(["benchmarks/run_share.py", str(tmp_path / "nothing")])
    assert missing.returncode == 1 and "train.log: not found" in missing.stderr
