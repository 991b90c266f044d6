"""Issue 6's GPU targets against what benchmarks/gpu/run.sh measured: reads the JSON files that run.sh's
benchmarks wrote into one folder and prints one table (and writes it as summary.md beside them).

    python benchmarks/gpu/summary.py benchmarks/gpu/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def target_rows(adaptation: dict | None, inference: dict | None) -> list[tuple[str, str, str]]:
    """(target, measured, met) for each of issue 6's targets; "not measured" where its benchmark did not finish."""
    rows = []
    if adaptation:
        last = adaptation["runs"][-1]  # the last alternated round: warm kernels, allocator and thread pools
        share, ratio = last["clustering_share"], last["aiva_over_plain"]
        rows.append(("clustering <= 2 % of AIVA's wall time", f"{100 * share:.1f} %", "yes" if share <= 0.02 else "no"))
        rows.append(("AIVA >= 0.95 x plain fine-tuning steps/s", f"{ratio:.2f} x", "yes" if ratio >= 0.95 else "no"))
        rows.append(
            (
                "(AIVA training steps alone vs plain)",
                f"{last['aiva_over_plain_training_only']:.2f} x",
                "",
            )
        )
    else:
        rows += [("clustering <= 2 % of AIVA's wall time", "not measured", "?"), ("AIVA >= 0.95 x plain", "-", "?")]
    if inference:
        warm = [run["case_s"] for run in inference["runs"][1:]] or [inference["runs"][0]["case_s"]]
        best = min(warm)
        shape = "x".join(str(s) for s in inference["shape"])
        rows.append((f"one {shape} volume < 1 s (warm, case time)", f"{best:.2f} s", "yes" if best < 1 else "no"))
    else:
        rows.append(("one volume < 1 s", "not measured", "?"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    adaptation = _load(args.folder, "adaptation_overhead.json")
    inference = _load(args.folder, "inference_volume.json")
    device = (adaptation or inference or {}).get("device_name", "?")
    lines = [f"device: {device}", "", "| target (issue 6) | measured | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {met} |" for target, measured, met in target_rows(adaptation, inference)]
    if adaptation:
        last, a = adaptation["runs"][-1], adaptation
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in last["stages_s"].items())
        lines += [
            "",
            f"AIVA round ({a['slices']} + {a['slices']} slices of {a['size']}^2): {stages}; "
            f"plain {last['plain_steps_per_s']:.2f} steps/s, AIVA {last['aiva_steps_per_s']:.2f} steps/s "
            f"({a['iterations']} steps, batch {a['batch']} + {a['batch']}, amp {a['amp']})",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.folder / "summary.md").write_text(text)


if __name__ == "__main__":
    main()
