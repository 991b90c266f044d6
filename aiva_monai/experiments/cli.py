"""The command line: ``python -m aiva_monai.experiments run | grid | report | compare``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from aiva_monai.data.simulate import PRESETS as SCANNERS
from aiva_monai.experiments.compare import write_comparison
from aiva_monai.experiments.grid import DEFAULT_K, METHOD_ORDER, PRESETS, grid
from aiva_monai.experiments.matrix import run_matrix
from aiva_monai.experiments.report import write_report
from aiva_monai.experiments.runner import BundleCellRunner
from aiva_monai.experiments.store import RESULTS_NAME
from aiva_monai.selection import SELECTION_RULES


def subset_datalist(datalist: str | Path, counts: Sequence[int], path: Path) -> Path:
    """The first ``counts`` = (source train, val, test, target train, val, test) subjects of each split of a
    two-site datalist (default source / target sites), written to ``path`` (same relative paths)."""
    from aiva_monai.io import write_json_atomic

    content = json.loads(Path(datalist).read_text())
    source, target = content["default_source_site"], content["default_target_site"]
    if len(counts) != 6:
        raise ValueError("--subset needs 6 numbers: source train,val,test and target train,val,test subjects.")
    out = {k: v for k, v in content.items() if k not in ("training", "validation", "test")}
    for index, split in enumerate(("training", "validation", "test")):
        out[split] = [e for e in content[split] if e["site"] == source][: counts[index]] + [
            e for e in content[split] if e["site"] == target
        ][: counts[3 + index]]
    out["description"] = (
        f"subset {list(counts)} (source train/val/test, target train/val/test) of {Path(datalist).name}: "
        + content.get("description", "")
    )
    write_json_atomic(path, out)
    return path


def _write_ixi_sim_datalist(dataset_dir: str, scanner: str, output: Path) -> Path:
    from aiva_monai.data import ixi_sim_datalist
    from aiva_monai.io import write_json_atomic

    path = output.resolve() / f"datalist_ixi_sim_{scanner}.json"
    write_json_atomic(path, ixi_sim_datalist(dataset_dir, target_change=scanner))
    return path


def datalist_pair(datalist: str | Path) -> tuple[tuple[str], str] | None:
    """((source site,), target site) of a two-site datalist: its default sites (None when it names none)."""
    content = json.loads(Path(datalist).read_text())
    if "default_source_site" not in content or "default_target_site" not in content:
        return None
    return (content["default_source_site"],), content["default_target_site"]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def bundle_overrides(items: Sequence[str]) -> dict:
    """``run --set`` items ("KEY=VALUE", the value read as JSON when it parses) as {KEY: value}."""
    overrides, seen = {}, {}
    for item in items:
        key, equals, value = item.partition("=")  # the value may hold "=" itself
        key = key.strip()
        if not key or not equals or not value:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. lambda_multiplier=0.")
        same = key.replace("::", "#")  # monai.bundle reads "a::b" as "a#b"
        if same in seen:
            raise SystemExit(f"--set {key} is given twice ({seen[same]!r} and {item!r}): give it once.")
        seen[same] = item
        overrides[key] = _parse_value(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aiva_monai.experiments",
        description="The experiment matrix of the AIVA paper: run a preset's cells, list them, or report.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "grid"):
        sub = commands.add_parser(name, help="run the matrix" if name == "run" else "list the cells of a preset")
        sub.add_argument("--preset", required=True, choices=sorted(PRESETS))
        sub.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=list(METHOD_ORDER))
        sub.add_argument("--seeds", nargs="+", type=int, default=[0])
        sub.add_argument(
            "--k",
            nargs="+",
            type=int,
            default=[DEFAULT_K],
            help="AIVA's numbers of clusters (paper Fig. 5: 3 6 9 12 15 18)",
        )
        sub.add_argument(
            "--steps", type=int, default=None, help="adaptation steps of every method (default: the paper's)"
        )
        sub.add_argument(
            "--paper-subset", action="store_true", help="cc359: the paper's 25 table pairs + 5 k-ablation pairs"
        )
        sub.add_argument("--targets", nargs="+", default=None, help="only these target sites")
    run = commands.choices["run"]
    run.add_argument("--output", required=True, help="matrix folder: results.jsonl, runs/, pretrain/")
    run.add_argument("--dataset_dir", default=None)
    run.add_argument(
        "--datalist", default=None, help="a datalist JSON (ixi-sim: default the shipped datalist_ixi_hh.json)"
    )
    run.add_argument(
        "--subset",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help=(
            "two-site datalists: use the first N subjects per split, "
            "'src_train,src_val,src_test,tgt_train,tgt_val,tgt_test'"
        ),
    )
    run.add_argument(
        "--scanner",
        default=None,
        choices=sorted(SCANNERS),
        help="ixi-sim: the simulated target scanner (aiva_monai.data.simulate.PRESETS); the same subjects as the "
        "shipped datalist (scanner 'strong'), written to <output>/datalist_ixi_sim_<scanner>.json",
    )
    run.add_argument("--epoch_length", type=int, default=None, help="steps between validations / checkpoints")
    run.add_argument("--cluster_every", type=int, default=None, help="AIVA: steps between clustering rounds")
    run.add_argument("--pretrain_steps", type=int, default=None)
    run.add_argument("--source_checkpoint", default=None)
    run.add_argument(
        "--selection",
        default=None,
        choices=sorted(SELECTION_RULES),
        help="the label-free rule whose pick is each trained method's model (default: train.json's); every "
        "rule's pick is evaluated and reported anyway",
    )
    run.add_argument(
        "--set",
        nargs="+",
        action="extend",  # `--set a=1 --set b=2` keeps both (a plain store kept only the last --set)
        default=[],
        metavar="KEY=VALUE",
        help="extra monai.bundle overrides (JSON values); may be repeated",
    )
    run.add_argument(
        "--bundles",
        default=None,
        help="the folder holding the bundles (aiva_brain/, aiva_prostate/); default: the repository's bundles/ "
        "when this package is a checkout, else ./bundles",
    )
    run.add_argument("--stop-on-error", action="store_true")
    report = commands.add_parser("report", help="tables and figures from a results file")
    report.add_argument("results", help="the matrix folder or its results.jsonl")
    report.add_argument("--out", default=None, help="report folder (default <results folder>/report)")
    report.add_argument("--no-figures", action="store_true")
    compare = commands.add_parser(
        "compare", help="the same cells under different settings, one results folder (or glob of them) per condition"
    )
    compare.add_argument(
        "conditions",
        nargs="+",
        metavar="NAME=PATTERN",
        help="e.g. sync='results/sync_seed*'; the first is the reference",
    )
    compare.add_argument("--metrics", nargs="+", default=["surface_dice_1mm", "dice"])
    compare.add_argument("--method", default="aiva", choices=list(METHOD_ORDER))
    compare.add_argument(
        "--rules",
        nargs="+",
        default=["target_agreement", "last"],
        choices=list(SELECTION_RULES),
        help="label-free selection rules whose picks are compared; the first also gives the margin over AdaBN",
    )
    compare.add_argument(
        "--baselines", nargs="+", default=[], metavar="PATTERN", help="more folders with source / adabn / oracle cells"
    )
    compare.add_argument("--out", default=None, help="also write compare.md and compare_<metric>.csv here")
    args = parser.parse_args(argv)

    if args.command == "report":
        write_report(args.results, args.out, figures=not args.no_figures)
        return 0
    if args.command == "compare":
        print(
            write_comparison(
                args.conditions, args.metrics, args.method, args.rules, out=args.out, baselines=args.baselines
            ),
            end="",
        )
        return 0
    preset = PRESETS[args.preset]
    if args.command == "run":
        overrides = bundle_overrides(args.set)  # checked before anything is written
        if args.scanner:
            if args.preset != "ixi-sim" or args.datalist or not args.dataset_dir:
                raise SystemExit("--scanner needs --preset ixi-sim and --dataset_dir, and no --datalist.")
            args.datalist = str(_write_ixi_sim_datalist(args.dataset_dir, args.scanner, Path(args.output)))
        if args.datalist and preset.shipped_datalist:  # a two-site preset: the pair is the given datalist's
            pair = datalist_pair(args.datalist)
            if pair is not None:
                preset = dataclasses.replace(preset, pairs=(pair,))
    cells = grid(preset, args.methods, args.seeds, args.k, args.steps, args.paper_subset)
    if args.targets:
        cells = [c for c in cells if c.target in args.targets]
    if args.command == "grid":
        for cell in cells:
            print(cell.id)
        print(f"{len(cells)} cells")
        return 0
    if preset.shipped_datalist and not args.dataset_dir:
        raise SystemExit(
            f"--preset {args.preset} needs --dataset_dir (the data the datalist's relative paths point into)."
        )
    runner = BundleCellRunner(
        preset,
        Path(args.output),
        dataset_dir=args.dataset_dir,
        datalist=args.datalist,
        epoch_length=args.epoch_length,
        cluster_every=args.cluster_every,
        pretrain_steps=args.pretrain_steps,
        source_checkpoint=args.source_checkpoint,
        overrides=overrides,
        selection=args.selection,
        **({"bundles": args.bundles} if args.bundles else {}),
    )
    output = runner.output  # absolute
    if args.subset:
        base = runner.data_overrides().get("datalist")  # --datalist, else the preset's shipped one
        if base is None:
            raise SystemExit("--subset needs --datalist (or a preset with a shipped datalist).")
        runner.datalist = str(subset_datalist(base, args.subset, output / "datalist_subset.json"))
    print(f"{len(cells)} cells ({preset.description}); results: {output / RESULTS_NAME}", flush=True)
    summary = run_matrix(cells, output, runner, keep_going=not args.stop_on_error)
    print(
        f"ran {len(summary['ran'])}, skipped {len(summary['skipped'])} (already recorded), "
        f"failed {len(summary['failed'])}"
    )
    for cell_id, message in summary["failed"]:
        print(f"  FAILED {cell_id}: {message.splitlines()[0] if message else ''}")
    return 1 if summary["failed"] else 0
