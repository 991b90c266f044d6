"""Main-job (demo) tables: the default rule (target_agreement) vs AdaBN, Dice and surface Dice @ 1 mm, per seed.

    python make_table.py "now, 2 threads=new_2t_seed{seed}" "before, 1 thread=old_1t_seed{seed}"
    python make_table.py --rule last "..."      # another selection rule's checkpoint (default: target_agreement)

Each argument is LABEL=PATTERN; PATTERN names a folder per seed 0, 1, 2 holding summary.md (the copies here) or
evaluation/summary.md (a run's output folder).
"""

import re
import statistics
import sys
from pathlib import Path

ROW = re.compile(r"\| (.+?) \| target test \| \d+ \| ([\d.]+) \+/- [\d.]+ \| ([\d.]+) \+/-")
HEADER = (
    "| seed | AdaBN Dice | adapted Dice | - AdaBN | AdaBN sDice@1mm | adapted sDice@1mm | - AdaBN |\n"
    "|---|---|---|---|---|---|---|"
)


def target_rows(run: str, rule: str = "target_agreement") -> dict:
    """{"source" | "adabn" | "adapted": (Dice, surface Dice @ 1 mm)} of the target test set."""
    summary = Path(run) / "summary.md"
    if not summary.exists():
        summary = Path(run) / "evaluation" / "summary.md"
    rows = {}
    for line in summary.read_text().splitlines():
        match = ROW.match(line)
        if not match:
            continue
        name = match.group(1)
        rules = name[name.find("(") + 1 : name.rfind(")")].split(", ") if "(" in name else []
        key = name if name in ("source", "adabn") else "adapted" if rule in rules else None
        if key:
            rows[key] = (float(match.group(3)), float(match.group(2)))
    return rows


def main() -> None:
    arguments = sys.argv[1:]
    rule = "target_agreement"
    if arguments[:1] == ["--rule"]:
        rule, arguments = arguments[1], arguments[2:]
    print(f"adapted = the checkpoint of the rule {rule}")
    for label, pattern in (argument.split("=", 1) for argument in arguments):
        print(f"\n{label}\n\n{HEADER}")
        dice, surface = [], []
        for seed in (0, 1, 2):
            rows = target_rows(pattern.format(seed=seed), rule)
            (adabn_d, adabn_s), (adapted_d, adapted_s) = rows["adabn"], rows["adapted"]
            dice.append(adapted_d - adabn_d)
            surface.append(adapted_s - adabn_s)
            print(
                f"| {seed} | {adabn_d:.2f} | {adapted_d:.2f} | {dice[-1]:+.2f} | {adabn_s:.2f} | {adapted_s:.2f} "
                f"| {surface[-1]:+.2f} |"
            )
        print(
            f"| mean +/- sd | | | {statistics.mean(dice):+.2f} +/- {statistics.stdev(dice):.2f} | | | "
            f"{statistics.mean(surface):+.2f} +/- {statistics.stdev(surface):.2f} |"
        )


if __name__ == "__main__":
    main()
