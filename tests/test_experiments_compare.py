"""``python -m aiva_monai.experiments compare``: conditions side by side, paired, with the margin over AdaBN."""

import json

import pytest

from aiva_monai.experiments import candidate_table, compare_table, load_conditions, main, setting_differences
from tests.test_experiments import _record


def _aiva(seed, picked, last, overrides=None):
    record = _record("aiva", "C", seed, picked, k=12)
    record["selection"] = "target_agreement"
    record["rule_volumes"] = {
        "target_agreement": record["volumes"],
        "last": [{"subject": f"s{i}", "set": "target test", "dice": v} for i, v in enumerate(last)],
    }
    record["config"] = {"overrides": {"output_dir": f"/runs/{seed}", "seed": seed, **(overrides or {})}}
    return record


def _write(folder, records):
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def two_conditions(tmp_path):
    """sync: seeds 0 and 1 with the baselines (source, AdaBN, oracle); ahead: seeds 0, 1 and 2 (2 has no
    synchronous partner), in two folders."""
    baselines = [_record("source", "C", s, [0.5, 0.5]) for s in (0, 1)]
    baselines += [_record("adabn", "C", 0, [0.6, 0.7]), _record("adabn", "C", 1, [0.75, 0.75])]
    baselines += [_record("oracle", "C", s, [0.9, 0.9]) for s in (0, 1)]
    _write(tmp_path / "sync_all", baselines + [_aiva(0, [0.7, 0.7], [0.6, 0.6]), _aiva(1, [0.8, 0.8], [0.5, 0.5])])
    ahead = {"cluster_options#overlap": True}
    _write(tmp_path / "ahead_seed0", [_aiva(0, [0.72, 0.72], [0.66, 0.66], ahead)])
    _write(tmp_path / "ahead_seed1", [_aiva(1, [0.78, 0.78], [0.54, 0.54], ahead), _aiva(2, [0.9], [0.9], ahead)])
    # the run's log beside its folder matches ahead_seed* too; it must not be read as results (it would add a
    # second record of seed 1)
    (tmp_path / "ahead_seed1.log").write_text(json.dumps(_aiva(1, [0.1], [0.1], ahead)) + "\n")
    return tmp_path


def test_compare_pairs_the_seeds_every_condition_has(two_conditions):
    conditions = load_conditions([f"sync={two_conditions}/sync_all", f"ahead={two_conditions}/ahead_seed*"])
    markdown, rows = compare_table(conditions, "dice")
    # hand-computed: ahead - sync = +2, -2 (picked) and +6, +4 (last); minus AdaBN (65, 75): +5, +5 and +7, +3
    header = ["target", "seed", "source", "adabn", "oracle*", "sync, target_agreement", "ahead, target_agreement"]
    header += ["sync, last", "ahead, last", "ahead - sync, target_agreement", "ahead - sync, last"]
    header += ["sync - adabn, target_agreement", "ahead - adabn, target_agreement"]
    assert markdown.splitlines() == [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 13,
        "| C | 0 | 50.00 | 65.00 | 90.00 | 70.00 | 72.00 | 60.00 | 66.00 | +2.00 | +6.00 | +5.00 | +7.00 |",
        "| C | 1 | 50.00 | 75.00 | 90.00 | 80.00 | 78.00 | 50.00 | 54.00 | -2.00 | +4.00 | +5.00 | +3.00 |",
        "| mean +/- sd |  | 50.00 | 70.00 | 90.00 | 75.00 | 75.00 | 55.00 | 60.00 | +0.00 +/- 2.83 | +5.00 +/- 1.41 "
        "| +5.00 +/- 0.00 | +5.00 +/- 2.83 |",
    ]
    assert [row["seed"] for row in rows] == [0, 1]  # seed 2 of "ahead" has no synchronous partner
    assert rows[1]["ahead - sync, last"] == 4.0 and rows[0]["adabn"] == 65.0
    assert setting_differences(conditions) == {"cluster_options#overlap": {"sync": "(default)", "ahead": "true"}}


def test_compare_refuses_what_cannot_be_compared(two_conditions):
    with pytest.raises(ValueError, match="NAME=PATTERN"):
        load_conditions([str(two_conditions / "sync_all")])
    with pytest.raises(FileNotFoundError, match="no results file"):
        load_conditions([f"x={two_conditions}/nothing*"])
    conditions = load_conditions([f"sync={two_conditions}/sync_all", f"ahead={two_conditions}/ahead_seed*"])
    conditions["ahead"] = conditions["ahead"] + [_record("adabn", "C", 0, [0.1, 0.1])]  # AdaBN disagrees
    with pytest.raises(ValueError, match="adabn differs between the conditions for C, seed 0"):
        compare_table(conditions, "dice")
    only_seed2 = {"sync": conditions["sync"], "late": [_aiva(2, [0.9], [0.9])]}
    with pytest.raises(ValueError, match="no aiva cell"):
        compare_table(only_seed2, "dice")


def test_compare_command_writes_the_tables(two_conditions, capsys):
    out = two_conditions / "comparison"
    specs = [f"sync={two_conditions}/sync_all", f"ahead={two_conditions}/ahead_seed*"]
    assert main(["compare", *specs, "--metrics", "dice", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "compare.md").read_text()
    assert "- `cluster_options#overlap`: sync (default); ahead true" in printed
    assert "\\* reads target labels" in printed
    assert (
        "| C | 1 | 50.00 | 75.00 | 90.00 | 80.00 | 78.00 | 50.00 | 54.00 | -2.00 | +4.00 | +5.00 | +3.00 |" in printed
    )
    csv_lines = (out / "compare_dice.csv").read_text().splitlines()
    assert csv_lines[0].startswith('target,seed,source,adabn,oracle*,"sync, target_agreement"')
    assert csv_lines[2].startswith("C,1,50.0,75.0,90.0,80.0,78.0,50.0,54.0,-2.0,4.0,5.0,3.0")


def test_compare_reads_the_baselines_from_their_own_folder(two_conditions, capsys):
    records = [json.loads(line) for line in (two_conditions / "sync_all" / "results.jsonl").read_text().splitlines()]
    _write(two_conditions / "baselines", [r for r in records if r["method"] != "aiva"])
    _write(two_conditions / "sync_only", [r for r in records if r["method"] == "aiva"])
    specs = [f"sync={two_conditions}/sync_only", f"ahead={two_conditions}/ahead_seed*"]
    assert main(["compare", *specs, "--metrics", "dice", "--baselines", str(two_conditions / "baselines")]) == 0
    printed = capsys.readouterr().out
    assert f"- baselines from {two_conditions / 'baselines'}" in printed
    assert "| C | 1 | 50.00 | 75.00 | 90.00 | 80.00 | 78.00 | 50.00 | 54.00 | -2.00 | +4.00 | +5.00 | +3.00 |" in (
        printed
    )
    assert main(["compare", *specs, "--metrics", "dice"]) == 0  # without them: the columns are empty
    assert "| C | 1 | - | - | 80.00 | 78.00 | 50.00 | 54.00 | -2.00 | +4.00 | - | - |" in capsys.readouterr().out


def _with_candidates(seed, by_step, picks):
    """An aiva record whose candidates (step -> target test dice of both volumes) were picked by ``picks``
    (step -> rules); the default rule's volumes are its pick's."""
    vol = lambda v: [{"subject": f"s{i}", "set": "target test", "dice": v} for i in range(2)]  # noqa: E731
    by_rule = {rule: step for step, rules in picks.items() for rule in rules}
    record = _aiva(seed, [by_step[by_rule["target_agreement"]]] * 2, [0.0])
    record["rule_volumes"] = {rule: vol(by_step[step]) for rule, step in by_rule.items()}
    record["selection_table"] = [
        {"epoch": str(i + 1), "iteration": str(step), "picked_by": " ".join(picks.get(step, []))}
        for i, step in enumerate(sorted(by_step))
    ]
    return record


def test_candidate_table_shows_each_evaluated_step_against_adabn(tmp_path):
    adabn = [_record("adabn", "C", 0, [0.6, 0.6]), _record("adabn", "C", 1, [0.7, 0.7])]
    runs = [
        # seed 0: every candidate picked by some rule; seed 1: step 200 picked by none, so never evaluated
        _with_candidates(
            0, {100: 0.65, 200: 0.62, 300: 0.55}, {100: ["target_im"], 200: ["target_agreement"], 300: ["last"]}
        ),
        _with_candidates(1, {100: 0.74, 200: 0.9, 300: 0.68}, {100: ["target_im"], 300: ["target_agreement", "last"]}),
    ]
    markdown, rows = candidate_table({"aiva": runs}, "dice", baselines=adabn)
    # hand-computed, minus AdaBN (60, 70): seed 0 +5, +2, -5; seed 1 +4, -, -2; step 100: mean 4.5, sd 0.71
    assert markdown.splitlines() == [
        "| condition | target | seed | adabn | step 100 - adabn | step 200 - adabn | step 300 - adabn |",
        "|---|---|---|---|---|---|---|",
        "| aiva | C | 0 | 60.00 | +5.00 | +2.00 | -5.00 |",
        "| aiva | C | 1 | 70.00 | +4.00 | - | -2.00 |",
        "| aiva | mean +/- sd (seeds above) |  |  | +4.50 +/- 0.71 (2/2) | +2.00 (1/1) | -3.50 +/- 2.12 (0/2) |",
    ]
    assert rows[1]["step 200 - adabn"] is None and rows[0]["adabn"] == 60.0
    with pytest.raises(ValueError, match="no aiva record holds an evaluated candidate"):
        candidate_table({"aiva": [_aiva(0, [0.7], [0.6])]}, "dice", baselines=adabn)
    # the compare command adds the table (and its CSV) when the records have candidates
    _write(tmp_path / "runs", adabn + runs)
    out = tmp_path / "comparison"
    assert main(["compare", f"aiva={tmp_path / 'runs'}", "--metrics", "dice", "--out", str(out)]) == 0
    assert "### Dice: each evaluated candidate minus adabn, by training step" in (out / "compare.md").read_text()
    assert (out / "compare_steps_dice.csv").read_text().splitlines()[2] == "aiva,C,1,70.0,4.0,,-2.0"
