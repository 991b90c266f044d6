"""The longest silences of a run's log: how long a person watching it waited for the next line.

    python benchmarks/log_silences.py RUN/train.log [more logs] [--top 5] [--over 30]

Reads the timestamps of the records of a MONAI bundle log (``2026-12-03 04:16:50,570 - ...``, also where one
follows a progress bar's text on the same line), and prints
per log: lines, span, the longest silence, how many silences exceed ``--over`` seconds, and the ``--top`` longest
with the line before each (what the run was doing while it said nothing). Text without a timestamp (warnings,
tracebacks, progress bars) is skipped. Exit code 1 when a log has no timestamped line.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

# a record may follow a progress bar's text on the same line (tqdm ends its updates with \r, not \n)
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) - ")


def timestamped_lines(path: Path) -> list[tuple[datetime.datetime, str]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        for match in STAMP.finditer(line):
            when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
            found.append((when + datetime.timedelta(milliseconds=int(match.group(2))), line[match.start() :]))
    found.sort(key=lambda item: item[0])  # several handlers may write the same file
    return found


def silences(lines: list[tuple[datetime.datetime, str]]) -> list[tuple[float, str]]:
    """(seconds, the line before) for every pair of consecutive lines."""
    return [((b[0] - a[0]).total_seconds(), a[1]) for a, b in zip(lines, lines[1:])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--over", type=float, default=30.0)
    args = parser.parse_args(argv)
    failed = False
    print(f"| log | lines | span | longest silence s | silences over {args.over:g} s |")
    print("|---|---|---|---|---|")
    details = []
    for path in args.logs:
        lines = timestamped_lines(path)
        if not lines:
            print(f"| {path} | 0 | | | |")
            failed = True
            continue
        gaps = silences(lines)
        span = (lines[-1][0] - lines[0][0]).total_seconds()
        longest = max((g for g, _ in gaps), default=0.0)
        over = sum(g > args.over for g, _ in gaps)
        print(f"| {path} | {len(lines)} | {span / 60:.1f} min | {longest:.1f} | {over} |")
        top = sorted(gaps, key=lambda item: -item[0])[: args.top]
        details.append((path, top))
    for path, top in details:
        print(f"\n{path}: the {len(top)} longest silences, after")
        for seconds, before in top:
            print(f"  {seconds:7.1f} s  {before[:160]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
