"""Comparing conditions: the same cells run with different settings (one results folder per condition), side
by side per seed, under each label-free selection rule, with the paired differences and the margin over AdaBN."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aiva_monai.experiments.store import METRIC_TITLES, RESULTS_NAME, ResultsFile, row_label, target_mean, write_csv
from aiva_monai.methods import reads_target_labels

__all__ = ["load_conditions", "compare_table", "candidate_table", "setting_differences", "write_comparison"]


def _results_files(pattern: str) -> list[Path]:
    # a matched folder means its results.jsonl; a matched file counts only as a .jsonl (a glob like
    # results/run_seed* also matches the run_seed0.log beside the folder)
    matches = sorted(Path(p) for p in glob.glob(pattern)) or [Path(pattern)]
    files = [p / RESULTS_NAME if p.is_dir() else p for p in matches if p.is_dir() or p.suffix == ".jsonl"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"no results file at {', '.join(missing) or pattern} (pattern {pattern!r}).")
    return files


def load_conditions(specs: Sequence[str]) -> dict[str, list[dict]]:
    """``["NAME=PATTERN", ...]`` -> {NAME: the finished records of every results file the glob PATTERN matches
    (a matrix folder or its results.jsonl)}, in the order given; the first condition is the reference."""
    conditions: dict[str, list[dict]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"a condition is NAME=PATTERN (e.g. sync='results/sync_seed*'), got {spec!r}.")
        if name in conditions:
            raise ValueError(f"condition {name!r} given twice.")
        records = [r for f in _results_files(pattern) for r in ResultsFile(f).records()]
        conditions[name] = [r for r in records if r.get("status", "ok") == "ok"]
    return conditions


def _value(record: dict, metric: str, rule: str | None) -> float | None:
    if rule is None or rule == record.get("selection"):
        return target_mean(record, metric)
    volumes = record.get("rule_volumes", {}).get(rule)
    return None if volumes is None else target_mean({"volumes": volumes}, metric)


def _by_cell(records: list[dict], method: str, k: int | None) -> dict[tuple[str, int], dict]:
    out: dict[tuple[str, int], dict] = {}
    for record in records:
        if record.get("method") != method or (k is not None and record.get("k") not in (None, k)):
            continue
        key = (row_label(record), int(record["seed"]))
        if key in out:
            raise ValueError(f"two {method} records for {key[0]}, seed {key[1]} in one condition ({record['cell']}).")
        out[key] = record
    return out


def _shared_value(pools: list[dict[tuple[str, int], dict]], method: str, key, metric: str) -> float | None:
    # a baseline (source, AdaBN, oracle) may be in any condition's folder or a baselines folder (``pools``: its
    # cells in each); where it is in several it must agree
    values = {
        round(v, 6)
        for cells in pools
        if (record := cells.get(key)) is not None and (v := target_mean(record, metric)) is not None
    }
    if len(values) > 1:
        raise ValueError(f"{method} differs between the conditions for {key[0]}, seed {key[1]}: {sorted(values)}.")
    return values.pop() if values else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cell(value, signed: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def _percent(row: dict) -> dict:
    # fractions -> percent, 2 decimals (+ 0.0: no -0.0 in the tables)
    return {c: (round(100 * v, 2) + 0.0 if isinstance(v, float) else v) for c, v in row.items()}


def _markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" +/- {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):+.2f}{sd}"


def compare_table(
    conditions: dict[str, list[dict]],
    metric: str,
    method: str = "aiva",
    rules: Sequence[str] = ("target_agreement", "last"),
    bar: str = "adabn",
    k: int | None = None,
    baselines: Sequence[dict] = (),
) -> tuple[str, list[dict]]:
    """``metric`` (mean over the target test volumes, %) of ``method``'s pick under each rule, one row per
    (target, seed) that every condition has: the source model, ``bar`` and the oracle (marked ``*``: it reads
    target labels) where a condition's records or ``baselines`` (more records) have them, each condition's value
    per rule, each later condition minus the first (paired, per rule) and each condition minus ``bar`` under
    ``rules[0]``; a last row gives mean +/- sd over rows of the differences.

    Returns (markdown, csv rows); raises ValueError when the conditions share no cell."""
    names = list(conditions)
    cells = {name: _by_cell(records, method, k) for name, records in conditions.items()}
    keys = sorted(set.intersection(*(set(c) for c in cells.values())))
    if not keys:
        raise ValueError(f"the conditions {names} have no {method} cell (target, seed) in common.")
    pools = [*conditions.values(), list(baselines)]
    baseline_cells = {b: [_by_cell(records, b, None) for records in pools] for b in ("source", bar, "oracle")}
    shown = ["source", bar] + (["oracle"] if any(baseline_cells["oracle"]) else [])
    labels = {b: f"{b}*" if reads_target_labels(b) else b for b in shown}
    header = ["target", "seed", *labels.values()]
    header += [f"{name}, {rule}" for rule in rules for name in names]
    header += [f"{name} - {names[0]}, {rule}" for rule in rules for name in names[1:]]
    header += [f"{name} - {bar}, {rules[0]}" for name in names]
    rows = []
    for key in keys:
        shared = {b: _shared_value(baseline_cells[b], b, key, metric) for b in shown}
        values = {(n, r): _value(cells[n][key], metric, r) for n in names for r in rules}
        row = {"target": key[0], "seed": key[1], **{labels[b]: v for b, v in shared.items()}}
        row.update({f"{n}, {r}": values[(n, r)] for r in rules for n in names})
        row.update(
            {f"{n} - {names[0]}, {r}": _minus(values[(n, r)], values[(names[0], r)]) for r in rules for n in names[1:]}
        )
        row.update({f"{n} - {bar}, {rules[0]}": _minus(values[(n, rules[0])], shared[bar]) for n in names})
        rows.append(_percent(row))
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    for row in rows:
        lines.append(_markdown_row(_cell(row[c], signed=" - " in c) for c in header))
    summary = ["mean +/- sd", ""]
    for column in header[2:]:
        values = [row[column] for row in rows if row[column] is not None]
        if " - " in column:
            summary.append(_mean_sd(values))
        else:
            summary.append(f"{np.mean(values):.2f}" if values else "-")
    lines.append(_markdown_row(summary))
    return "\n".join(lines), rows


def _candidates(record: dict, metric: str) -> dict[int, float]:
    """{training step: ``metric`` on the target test volumes} of every candidate checkpoint of ``record`` that was
    evaluated, i.e. that some label-free rule picked (the selection handler deletes the others)."""
    values = {}
    for row in record.get("selection_table", []):
        rules = str(row.get("picked_by") or "").split()
        scored = [v for rule in rules if (v := _value(record, metric, rule)) is not None]
        if scored:
            values[int(row["iteration"])] = scored[0]
    return values


def candidate_table(
    conditions: dict[str, list[dict]],
    metric: str,
    method: str = "aiva",
    bar: str = "adabn",
    k: int | None = None,
    baselines: Sequence[dict] = (),
) -> tuple[str, list[dict]]:
    """Each evaluated candidate checkpoint of ``method`` by training step: ``metric`` (%) minus ``bar``'s on the
    same target and seed, one row per (condition, target, seed), then per condition a row of mean +/- sd and how
    many seeds are above ``bar``. Shows where in a run the gain is made or lost, which the rules' picks hide.
    A candidate no rule picked was not evaluated ("-"). Returns (markdown, csv rows)."""
    pools = [*conditions.values(), list(baselines)]
    bar_cells = [_by_cell(records, bar, None) for records in pools]
    runs = []
    for name, records in conditions.items():
        for key, record in sorted(_by_cell(records, method, k).items()):
            runs.append((name, key, _shared_value(bar_cells, bar, key, metric), _candidates(record, metric)))
    steps = sorted({step for *_, values in runs for step in values})
    if not steps:
        raise ValueError(f"no {method} record holds an evaluated candidate (selection_table with its picks).")
    header = ["condition", "target", "seed", bar, *(f"step {s} - {bar}" for s in steps)]
    rows = []
    for name, key, bar_value, values in runs:
        row = {"condition": name, "target": key[0], "seed": key[1], bar: bar_value}
        row.update({f"step {s} - {bar}": _minus(values.get(s), bar_value) for s in steps})
        rows.append(_percent(row))
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    for name in conditions:
        mine = [row for row in rows if row["condition"] == name]
        lines += [_markdown_row(_cell(row[c], signed=" - " in c) for c in header) for row in mine]
        summary = [name, "mean +/- sd (seeds above)", "", ""]
        for column in header[4:]:
            values = [row[column] for row in mine if row[column] is not None]
            above = f" ({sum(v > 0 for v in values)}/{len(values)})" if values else ""
            summary.append(_mean_sd(values) + above)
        lines.append(_markdown_row(summary))
    return "\n".join(lines), rows


def setting_differences(conditions: dict[str, list[dict]]) -> dict[str, dict[str, str]]:
    """{override key: {condition: value}} for the bundle overrides (and the code commit) that differ between the
    conditions; paths (values with a "/") are left out, as every folder has its own."""
    seen: dict[str, dict[str, set]] = {}
    for name, records in conditions.items():
        for record in records:
            settings = dict(record.get("config", {}).get("overrides", {}), code=record.get("git_commit", "?"))
            for key, value in settings.items():
                if key in ("seed",) or (isinstance(value, str) and "/" in value):
                    continue
                seen.setdefault(key, {}).setdefault(name, set()).add(json.dumps(value))
    differ = {}
    for key, per in seen.items():
        shown = {name: " or ".join(sorted(per.get(name, {"(default)"}))) for name in conditions}
        if len(set(shown.values())) > 1:
            differ[key] = shown
    return differ


def write_comparison(
    specs: Sequence[str],
    metrics: Sequence[str],
    method: str = "aiva",
    rules: Sequence[str] = ("target_agreement", "last"),
    bar: str = "adabn",
    out: str | Path | None = None,
    baselines: Sequence[str] = (),
) -> str:
    """The comparison of the conditions ``specs`` (``load_conditions``) as markdown: what differs between them
    (``setting_differences``), then one ``compare_table`` per metric, the baselines also read from the results
    files the glob patterns ``baselines`` match. With ``out``: also ``<out>/compare.md`` and
    ``<out>/compare_<metric>.csv``, written atomically. Returns the markdown."""
    from aiva_monai.io import write_text_atomic

    conditions = load_conditions(specs)
    extra = [r for pattern in baselines for f in _results_files(pattern) for r in ResultsFile(f).records()]
    extra = [r for r in extra if r.get("status", "ok") == "ok"]
    parts = [f"# {method}: {' vs '.join(conditions)}", "", "Conditions:", ""]
    parts += [f"- {spec}: {len(conditions[spec.partition('=')[0]])} finished cells" for spec in specs]
    parts += [f"- baselines from {pattern}" for pattern in baselines]
    differences = setting_differences(conditions)
    parts += ["", "Settings that differ:" if differences else "No setting differs (same code, same overrides).", ""]
    parts += [f"- `{key}`: " + "; ".join(f"{n} {v}" for n, v in per.items()) for key, per in differences.items()]
    candidates = [r for records in conditions.values() for r in records if r.get("method") == method]
    has_candidates = any(r.get("selection_table") for r in candidates)
    tables = {}
    for metric in metrics:
        markdown, tables[metric] = compare_table(conditions, metric, method, rules, bar, baselines=extra)
        title = METRIC_TITLES.get(metric, metric)
        parts += ["", f"## {title}, target test volumes (%); picks of the label-free rules {', '.join(rules)}", ""]
        parts.append(markdown)
        if any("oracle*" in row for row in tables[metric]):
            parts += ["", "\\* reads target labels (target-supervised upper bound)."]
        if has_candidates:
            markdown, tables[f"steps_{metric}"] = candidate_table(conditions, metric, method, bar, baselines=extra)
            parts += ["", f"### {title}: each evaluated candidate minus {bar}, by training step", "", markdown]
    text = "\n".join(parts) + "\n"
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "compare.md", text)
        for metric, rows in tables.items():
            write_csv(out / f"compare_{metric}.csv", rows)
    return text
