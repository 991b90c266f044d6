"""The report: the paper's tables (markdown + CSV) from the results records, and the report folder."""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from aiva_monai.experiments.figures import k_figure, qualitative_figure
from aiva_monai.experiments.grid import AIVA_METHODS, DEFAULT_K, METHOD_ORDER, PRESETS
from aiva_monai.experiments.store import METRIC_TITLES, RESULTS_NAME, ResultsFile, row_label, target_mean, write_csv
from aiva_monai.methods import reads_target_labels
from aiva_monai.selection import SELECTION_RULES

logger = logging.getLogger(__name__)


def _cell_text(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} +/- {100 * float(np.std(values, ddof=1)):.2f}"


def _table_values(records: Iterable[dict], metric: str, k: int | None):
    """(record, target mean of ``metric``) of the finished records a table shows (AIVA cells: those with ``k``)."""
    for record in records:
        if record.get("status", "ok") != "ok":
            continue
        if record["method"] in AIVA_METHODS and k is not None and record.get("k") not in (None, k):
            continue
        value = target_mean(record, metric)
        if value is not None:
            yield record, value


def report_table(records: Iterable[dict], metric: str, k: int | None = DEFAULT_K) -> tuple[str, list[dict]]:
    """The paper's table layout for ``metric`` on the target test volumes: one row per target (or
    source -> target pair), the columns of ``METHOD_ORDER``, each cell mean +/- std (sample std) over seeds of
    the per-seed mean over test volumes, in %; an average row (per seed, the mean over rows that have that
    seed; then mean +/- std over seeds). AIVA cells are those with ``k`` (all k if None).

    Returns (markdown, csv rows)."""
    per = defaultdict(dict)  # (row, method) -> {seed: value}
    for record, value in _table_values(records, metric, k):
        per[(row_label(record), record["method"])][record["seed"]] = value
    rows = sorted({row for row, _ in per})
    methods = [m for m in METHOD_ORDER if any((row, m) in per for row in rows)]
    header = ["target"] + [f"{m}*" if reads_target_labels(m) else m for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table_rows = []
    for row in rows:
        cells = [_cell_text(list(per.get((row, m), {}).values())) for m in methods]
        lines.append("| " + " | ".join([row, *cells]) + " |")
        table_rows.append(_csv_row(row, methods, [list(per.get((row, m), {}).values()) for m in methods]))
    average_values = []
    for m in methods:
        seeds = sorted({s for row in rows for s in per.get((row, m), {})})
        average_values.append(
            [float(np.mean([per[(row, m)][s] for row in rows if s in per.get((row, m), {})])) for s in seeds]
        )
    lines.append("| " + " | ".join(["average", *[_cell_text(v) for v in average_values]]) + " |")
    table_rows.append(_csv_row("average", methods, average_values))
    return "\n".join(lines), table_rows


def selection_table(records: Iterable[dict], metric: str) -> tuple[str, list[dict]]:
    """The target ``metric`` of the checkpoint each label-free selection rule picks, for every trained method:
    rows = method, columns = rule, cells = mean +/- std over seeds of the per-seed mean over the table's rows
    (targets) of the mean over target test volumes. The rule each method was run with is marked ``(used)``.

    Returns (markdown, csv rows); empty when no record carries per-rule results."""
    per = defaultdict(lambda: defaultdict(list))  # (method, rule) -> seed -> [row means]
    used = {}
    for record in records:
        if record.get("status", "ok") != "ok" or "rule_volumes" not in record:
            continue
        used[record["method"]] = record.get("selection")
        for rule, volumes in record["rule_volumes"].items():
            value = target_mean({"volumes": volumes}, metric)
            if value is not None:
                per[(record["method"], rule)][record["seed"]].append(value)
    if not per:
        return "", []
    methods = [m for m in METHOD_ORDER if any(key[0] == m for key in per)]
    rules = [r for r in SELECTION_RULES if any(key[1] == r for key in per)]
    lines = ["| method | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    table_rows = []
    for method in methods:
        cells, row = [], {"method": method, "used": used.get(method) or ""}
        for rule in rules:
            values = [float(np.mean(v)) for v in per.get((method, rule), {}).values()]
            cells.append(_cell_text(values) + (" (used)" if used.get(method) == rule else ""))
            row[f"{rule}_mean"] = round(100 * float(np.mean(values)), 2) if values else ""
            row[f"{rule}_std"] = round(100 * float(np.std(values, ddof=1)), 2) if len(values) > 1 else ""
        lines.append("| " + " | ".join([method, *cells]) + " |")
        table_rows.append(row)
    return "\n".join(lines), table_rows


def per_seed_table(
    records: Iterable[dict], metric: str, k: int | None = DEFAULT_K, bar: str = "adabn"
) -> tuple[str, list[dict]]:
    """``metric`` per seed (the mean over the target test volumes of every table row), so a reader sees whether
    a method wins on every seed, not only on average: rows = seed, columns = the methods, then each trained
    unsupervised method minus ``bar`` (AdaBN: the cheap alternative every adaptation must beat), in % points.

    Returns (markdown, csv rows); empty without ``bar`` results."""
    per = defaultdict(lambda: defaultdict(list))  # method -> seed -> [row means]
    for record, value in _table_values(records, metric, k):
        per[record["method"]][record["seed"]].append(value)
    if bar not in per:
        return "", []
    methods = [m for m in METHOD_ORDER if m in per]
    compared = [m for m in methods if m not in ("source", bar) and not reads_target_labels(m)]
    seeds = sorted({s for m in methods for s in per[m]})
    header = ["seed", *[f"{m}*" if reads_target_labels(m) else m for m in methods], *[f"{m} - {bar}" for m in compared]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table_rows = []
    for seed in seeds:
        means = {m: 100 * float(np.mean(per[m][seed])) for m in methods if seed in per[m]}
        row = {"seed": seed, **{m: round(v, 2) for m, v in means.items()}}
        cells = [f"{means[m]:.2f}" if m in means else "-" for m in methods]
        for m in compared:
            if m in means and bar in means:
                row[f"{m}_minus_{bar}"] = round(means[m] - means[bar], 2)
                cells.append(f"{means[m] - means[bar]:+.2f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join([str(seed), *cells]) + " |")
        table_rows.append(row)
    return "\n".join(lines), table_rows


def _csv_row(row: str, methods: Sequence[str], values: Sequence[list[float]]) -> dict:
    out = {"target": row}
    for m, v in zip(methods, values):
        out[f"{m}_mean"] = round(100 * float(np.mean(v)), 2) if v else ""
        out[f"{m}_std"] = round(100 * float(np.std(v, ddof=1)), 2) if len(v) > 1 else ""
        out[f"{m}_seeds"] = len(v)
    return out


def render_report(records: list[dict], metrics: Sequence[str] | None = None) -> tuple[str, dict[str, list[dict]]]:
    """The markdown report (one table per metric, notes on selection and label use) and the CSV rows per metric."""
    records = [r for r in records if r.get("status", "ok") == "ok"]
    if not records:
        raise ValueError("no finished cell in the results file.")
    if metrics is None:
        preset = PRESETS.get(records[0]["dataset"])
        metrics = preset.metrics if preset else ("dice",)
    ks = sorted({r["k"] for r in records if r["method"] in AIVA_METHODS and r.get("k") is not None})
    k = DEFAULT_K if DEFAULT_K in ks or not ks else ks[0]
    parts, tables = [], {}
    datasets = sorted({r["dataset"] for r in records})
    steps = sorted({r["steps"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    parts.append(f"# Results: {', '.join(datasets)}")
    parts.append("")
    for metric in metrics:
        markdown, rows = report_table(records, metric, k if ks else None)
        tables[metric] = rows
        parts += [f"## {METRIC_TITLES.get(metric, metric)} (target test volumes, %)", "", markdown, ""]
    preset = PRESETS.get(records[0]["dataset"])
    primary = preset.metric if preset else metrics[0]
    markdown, rows = per_seed_table(records, primary, k if ks else None)
    if markdown:
        tables[f"per_seed_{primary}"] = rows
        parts += [
            f"## Per seed: target {METRIC_TITLES.get(primary, primary)} (%), and each method minus AdaBN",
            "",
            markdown,
            "",
        ]
    markdown, rows = selection_table(records, primary)
    if markdown:
        tables[f"selection_{primary}"] = rows
        parts += [
            (
                f"## Model selection: target {METRIC_TITLES.get(primary, primary)} of the checkpoint "
                "each label-free rule picks (%)"
            ),
            "",
            markdown,
            "",
            "Rules: " + "; ".join(f"`{name}`: {rule.description}" for name, rule in SELECTION_RULES.items()) + ". "
            "Every rule reads source labels or target images only; the table is computed after the runs, so it shows "
            "how much the choice of rule matters, it was not used to choose the rule.",
            "",
        ]
    rules = sorted(
        {(r["method"], r.get("selection_rule", "")) for r in records},
        key=lambda x: METHOD_ORDER.index(x[0]) if x[0] in METHOD_ORDER else 99,
    )
    parts.append(
        "- cells: mean +/- sample std over seeds of the per-seed mean over the target test volumes "
        "(one seed: the mean alone)"
    )
    parts.append(
        f"- seeds: {', '.join(map(str, seeds))}; adaptation steps: {', '.join(map(str, steps))}"
        + (f"; AIVA k = {k}" if ks else "")
    )
    parts.append(
        "- \\* reads target labels (target-supervised upper bound); every other method never reads a target label"
    )
    parts.append("- model selection: " + "; ".join(f"{m}: {rule}" for m, rule in rules))
    commits = sorted({r.get("git_commit", "") for r in records})
    parts.append(f"- code: {', '.join(commits)}")
    parts.append("")
    return "\n".join(parts), tables


def write_report(output: str | Path, report_dir: str | Path | None = None, figures: bool = True) -> dict:
    """``<report_dir>/results.md`` (+ ``table_<metric>.csv``) from ``<output>/results.jsonl``, and the figures:
    ``clusters_<row>.png`` (copied from the AIVA runs' evaluation), ``k.png`` (several k), ``qualitative.png``."""
    output = Path(output)
    source = output if output.is_file() else output / RESULTS_NAME
    records = ResultsFile(source).records()
    report_dir = Path(report_dir) if report_dir else source.parent / "report"
    from aiva_monai.io import write_text_atomic

    markdown, tables = render_report(records)
    files = {"markdown": write_text_atomic(report_dir / "results.md", markdown)}
    for metric, rows in tables.items():
        path = report_dir / f"table_{metric}.csv"
        write_csv(path, rows)
        files[f"csv_{metric}"] = path
    if figures:
        preset = PRESETS.get(records[0]["dataset"]) if records else None
        metric = preset.metric if preset else "dice"
        extra = []
        for r in records:
            clusters = r.get("figures", {}).get("clusters")
            if r["method"] == "aiva" and clusters and Path(clusters).is_file():
                name = f"clusters_{row_label(r).replace(' -> ', '_to_').replace('/', '_')}_seed{r['seed']}.png"
                if (
                    not (report_dir / name).exists()
                    or Path(clusters).stat().st_mtime > (report_dir / name).stat().st_mtime
                ):
                    report_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(clusters, report_dir / name)
                files.setdefault("clusters", []).append(report_dir / name)
                extra.append(
                    f"![clusters before (source model) and after AIVA, {row_label(r)}, seed {r['seed']}]({name})"
                )
        k_path = k_figure(records, metric, report_dir / "k.png")
        if k_path:
            files["k"] = k_path
            extra.append("![target score against k](k.png)")
        try:
            q_path = qualitative_figure(records, report_dir / "qualitative.png")
        except Exception as error:  # noqa: BLE001 - the tables stand without the picture
            logger.warning(f"qualitative figure skipped: {error}")
            q_path = None
        if q_path:
            files["qualitative"] = q_path
            extra.append("![ground truth and each method's mask on the same target slices](qualitative.png)")
        if extra:
            files["markdown"] = write_text_atomic(
                report_dir / "results.md", markdown + "\n## Figures\n\n" + "\n\n".join(extra) + "\n"
            )
    print((report_dir / "results.md").read_text())
    return {key: value for key, value in files.items()}
