"""The experiment matrix (issue 5): the grids of the presets, skip-finished and kill/restart behaviour of the
runner, the report rendered from a known results file, and every method overlay run for a few iterations
through monai.bundle on the tiny SYNTHETIC prostate release (oracle the only reader of target labels)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, run

from aiva_monai.batchnorm import batchnorm_layers
from aiva_monai.data.cc359 import CC359_SITES
from aiva_monai.data.prostate import make_prostate_demo
from aiva_monai.experiments import (
    AIVA_METHODS,
    K_ABLATION_PAIRS,
    K_VALUES,
    METHOD_ORDER,
    PRESETS,
    BundleCellRunner,
    Cell,
    ResultsFile,
    grid,
    main,
    per_seed_table,
    render_report,
    report_table,
    run_matrix,
)

REPOSITORY = Path(__file__).resolve().parents[1]
METHODS_WITH_OVERLAY = ("source", "adabn", "adaptsegnet", "segjdot", "aiva_v1", "aiva+adabn", "oracle")


# -- grids ------------------------------------------------------------------------------------------------------


def test_cc359_grid_is_the_30_ordered_pairs_times_every_method():
    cells = grid("cc359")
    pairs = {(c.sources, c.target) for c in cells}
    assert len(pairs) == 30 and all(len(s) == 1 and s[0] != t for s, t in pairs)
    assert {s[0] for s, _ in pairs} == set(CC359_SITES) == {t for _, t in pairs}
    assert len(cells) == 30 * len(METHOD_ORDER) and {c.method for c in cells} == set(METHOD_ORDER)
    assert all(c.k == 12 if c.method in AIVA_METHODS else c.k is None for c in cells)
    assert all(c.steps == 6500 for c in cells) and len({c.id for c in cells}) == len(cells)


def test_cc359_paper_subset_is_25_table_pairs_and_5_k_ablation_pairs():
    cells = grid("cc359", paper_subset=True, seeds=(0, 1))
    ablation = {(c.sources[0], c.target) for c in cells if c.method == "aiva" and c.k != 12}
    table = {(c.sources[0], c.target) for c in cells if c.method == "source"}
    assert len(table) == 25 and len(ablation) == 5 and not table & ablation and ablation == set(K_ABLATION_PAIRS)
    for pair in ablation:  # the ablation pairs: aiva at every k, no other method
        assert {c.k for c in cells if (c.sources[0], c.target) == pair} == set(K_VALUES)
        assert {c.method for c in cells if (c.sources[0], c.target) == pair} == {"aiva"}
    assert len(cells) == 2 * (25 * len(METHOD_ORDER) + 5 * len(K_VALUES))


def test_prostate_grid_is_six_leave_one_site_out_targets():
    cells = grid("prostate", methods=("source", "aiva"), k_values=(3, 12), steps=50)
    targets = sorted({c.target for c in cells})
    assert targets == list("ABCDEF")
    for cell in cells:
        assert len(cell.sources) == 5 and cell.target not in cell.sources and cell.steps == 50
    assert len(cells) == 6 * (1 + 2)  # source once, aiva per k


def test_ixi_sim_grid_and_cli_listing(capsys):
    cells = grid("ixi-sim", steps=300)
    assert [c.method for c in cells] == list(METHOD_ORDER)
    assert {(c.sources, c.target) for c in cells} == {(("ixi_hh",), "ixi_hh_simulated_strong")}
    assert (REPOSITORY / "bundles" / "aiva_brain" / PRESETS["ixi-sim"].shipped_source_model).is_file()
    assert main(["grid", "--preset", "prostate", "--methods", "aiva", "--k", "3", "6"]) == 0
    assert capsys.readouterr().out.strip().endswith("12 cells")
    with pytest.raises(ValueError, match="unknown methods"):
        grid("ixi-sim", methods=("aiva", "dann"))


# -- runner: skip finished, restart after a kill ------------------------------------------------------------------


def fake_runner(log):
    def runner(cell, run_dir, progress):
        progress("training")
        log.append(cell.id)
        return {"selection_rule": "fake", "volumes": [{"subject": "s0", "set": "target test", "dice": 0.5}]}

    return runner


def test_finished_cells_are_skipped_and_failures_retried(tmp_path):
    cells = grid("ixi-sim", methods=("source", "adabn", "aiva"), seeds=(0, 1), steps=10)
    log = []
    summary = run_matrix(cells, tmp_path, fake_runner(log), commit="abc")
    assert len(summary["ran"]) == 6 and log == [c.id for c in cells]
    records = ResultsFile(tmp_path / "results.jsonl").records()
    assert [r["cell"] for r in records] == [c.id for c in cells]
    first = records[0]
    for key in (
        "method",
        "dataset",
        "sources",
        "target",
        "seed",
        "k",
        "steps",
        "volumes",
        "selection_rule",
        "reads_target_labels",
        "git_commit",
        "run_dir",
    ):
        assert key in first, key
    assert first["git_commit"] == "abc" and first["reads_target_labels"] is False

    # everything recorded: nothing runs again; a new seed runs only its cells
    log.clear()
    more = grid("ixi-sim", methods=("source", "adabn", "aiva"), seeds=(0, 1, 2), steps=10)
    summary = run_matrix(more, tmp_path, fake_runner(log), commit="abc")
    assert len(summary["skipped"]) == 6 and log == [c.id for c in more if c.seed == 2]

    # a failing cell is not recorded and is retried on the next run
    def flaky(cell, run_dir, progress):
        if cell.method == "adabn":
            raise RuntimeError("boom")
        return fake_runner([])(cell, run_dir, progress)

    cells = grid("ixi-sim", methods=("source", "adabn"), seeds=(7,), steps=10)
    summary = run_matrix(cells, tmp_path, flaky, commit="abc")
    assert [c for c, _ in summary["failed"]] == [cells[1].id] and summary["ran"] == [cells[0].id]
    assert run_matrix(cells, tmp_path, fake_runner(log), commit="abc")["ran"] == [cells[1].id]


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append({"cell": "a", "status": "ok"})
    with open(results.path, "a") as handle:
        handle.write('{"cell": "b", "sta')  # a crash in the middle of a write
    assert results.finished() == {"a"}
    results.append({"cell": "c", "status": "ok"})
    assert results.finished() == {"a", "c"}
    assert results.path.read_text().splitlines()[-1] == '{"cell": "c", "status": "ok"}'


def test_matrix_killed_with_sigkill_resumes_where_it_stopped(tmp_path):
    """A runner process killed (SIGKILL) during a cell: the restarted matrix skips the recorded cells and
    runs the interrupted one again (in the same run folder)."""
    script = tmp_path / "matrix.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from aiva_monai.experiments import grid, run_matrix
        def runner(cell, run_dir, progress):
            progress("training")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "started").write_text("1")
            if cell.method == "adabn" and sys.argv[1] == "slow":
                time.sleep(60)  # killed here
            return {{"selection_rule": "fake", "volumes": []}}
        cells = grid("ixi-sim", methods=("source", "adabn", "aiva"), steps=10)
        run_matrix(cells, Path({str(tmp_path / "out")!r}), runner, commit="abc")
    """)
    )
    process = subprocess.Popen(
        [sys.executable, str(script), "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "[2/3] adabn" in line:
            break
    deadline = time.time() + 30
    while not list((tmp_path / "out" / "runs").glob("*adabn*/started")) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    results = ResultsFile(tmp_path / "out" / "results.jsonl")
    assert [r["method"] for r in results.records()] == ["source"], lines
    restarted = subprocess.run(
        [sys.executable, str(script), "fast"], capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    assert restarted.returncode == 0, restarted.stderr
    assert "[1/3] source      ixi_hh -> ixi_hh_simulated_strong, seed 0: already recorded, skipped" in restarted.stdout
    assert [r["method"] for r in results.records()] == ["source", "adabn", "aiva"]


# -- report ---------------------------------------------------------------------------------------------------------


def _record(method, target, seed, values, k=None, sources=("A", "B")):
    return {
        "cell": f"x/{method}/{target}/{seed}/{k}",
        "status": "ok",
        "method": method,
        "dataset": "prostate",
        "sources": list(sources),
        "target": target,
        "seed": seed,
        "k": k,
        "steps": 100,
        "reads_target_labels": method == "oracle",
        "selection_rule": "oracle rule" if method == "oracle" else "source validation",
        "volumes": [{"subject": f"s{i}", "set": "target test", "dice": v} for i, v in enumerate(values)]
        + [{"subject": "src", "set": "source test", "dice": 0.0}],
        "git_commit": "abc",
        "run_dir": "/nowhere",
    }


KNOWN_RESULTS = [
    _record("oracle", "C", 0, [0.9, 0.8]),
    _record("oracle", "C", 1, [0.8, 0.9]),
    _record("source", "C", 0, [0.5, 0.7]),
    _record("source", "C", 1, [0.4, 0.6]),
    _record("aiva", "C", 0, [0.7, 0.7], k=12),
    _record("aiva", "C", 1, [0.8, 0.8], k=12),
    _record("aiva", "C", 0, [0.1, 0.1], k=3),  # another k: not in the k = 12 table
    _record("source", "D", 0, [0.3]),
    _record("source", "D", 1, [0.5]),
    _record("aiva", "D", 0, [0.6], k=12),
    {"cell": "torn", "status": "failed", "method": "aiva"},
]


def test_report_renders_a_known_results_file_to_a_known_table(tmp_path):
    markdown, rows = report_table(KNOWN_RESULTS, "dice", k=12)
    assert markdown == textwrap.dedent("""\
        | target | oracle* | source | aiva |
        |---|---|---|---|
        | C | 85.00 +/- 0.00 | 55.00 +/- 7.07 | 75.00 +/- 7.07 |
        | D | - | 40.00 +/- 14.14 | 60.00 |
        | average | 85.00 +/- 0.00 | 47.50 +/- 3.54 | 72.50 +/- 10.61 |""")
    # average row: per seed the mean over the rows that have it (aiva seed 0: (70 + 60) / 2, seed 1: 80)
    assert rows[-1]["aiva_mean"] == 72.5 and rows[-1]["aiva_seeds"] == 2 and rows[1]["aiva_std"] == ""

    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in KNOWN_RESULTS))
    assert main(["report", str(tmp_path), "--no-figures"]) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| C | 85.00 +/- 0.00 | 55.00 +/- 7.07 | 75.00 +/- 7.07 |" in text and "AIVA k = 12" in text
    assert "\\* reads target labels" in text and "oracle: oracle rule" in text
    csv_lines = (tmp_path / "report" / "table_dice.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "target,oracle_mean,oracle_std,oracle_seeds,source_mean,source_std,source_seeds,aiva_mean,aiva_std,aiva_seeds"
    )
    assert csv_lines[1] == "C,85.0,0.0,2,55.0,7.07,2,75.0,7.07,2"


def test_report_k_figure_when_several_k(tmp_path):
    from aiva_monai.experiments import k_figure

    assert k_figure(KNOWN_RESULTS, "dice", tmp_path / "k.png").is_file()
    assert k_figure([r for r in KNOWN_RESULTS if r.get("k") != 3], "dice", tmp_path / "none.png") is None
    markdown, _ = render_report(KNOWN_RESULTS, metrics=("dice",))
    assert markdown.startswith("# Results: prostate")


# -- every method overlay through monai.bundle on tiny data --------------------------------------------------------

CONFIGS = REPOSITORY / "bundles" / "aiva_prostate" / "configs"
SMALL = {
    "network_def#channels": [8, 16, 32, 64],
    "network_def#blocks_per_level": 1,
    "pixdim": [2.0, 2.0, 0.0],
    "in_plane_size": [48, 48],
    "max_steps": 4,
    "epoch_length": 2,
    "batch_size": 4,
    "log_every": 1,
    "target_site": "F",
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def prostate_source(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("experiments_prostate")
    make_prostate_demo(folder / "demo", cases_per_site=4, shape=(48, 48, 10))
    common = {"dataset_dir": str(folder / "demo" / "SYNTHETIC_prostate"), "work_dir": str(folder), **SMALL}
    run(config_file=str(CONFIGS / "pretrain.json"), logging_file=False, **common)
    return folder, common


def _overlay(method):
    return [str(CONFIGS / "train.json")] + ([] if method == "aiva" else [str(CONFIGS / "methods" / f"{method}.json")])


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_every_bundle_has_every_method_overlay_with_its_citation(bundle):
    folder = REPOSITORY / "bundles" / bundle / "configs" / "methods"
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(METHODS_WITH_OVERLAY)
    for method in METHODS_WITH_OVERLAY:
        content = json.loads((folder / f"{method}.json").read_text())
        assert content["method"] == method
        if method in AIVA_METHODS:  # AIVA variants keep train.json's card: no target labels, its label-free selection
            assert "reads_target_labels" not in content and "selection_rule" not in content
        else:
            assert content["reads_target_labels"] is (method == "oracle") and content["selection_rule"]
    cited = {m: json.loads((folder / f"{m}.json").read_text())["_desc_"] for m in ("adabn", "adaptsegnet", "segjdot")}
    assert (
        "Li et al. 2016" in cited["adabn"]
        and "Tsai et al." in cited["adaptsegnet"]
        and "CVPR 2018" in cited["adaptsegnet"]
    )
    assert "DeepJDOT" in cited["segjdot"] and "ot.emd" in cited["segjdot"]


def test_method_overlays_run_and_only_oracle_reads_target_labels(prostate_source):
    folder, common = prostate_source
    source_state = torch.load(folder / "pretrain_target_F" / "model.pt", weights_only=True)
    cards, states = {}, {}
    for method in ("source", "adabn", "adaptsegnet", "segjdot", "oracle"):
        output = folder / method
        run(config_file=_overlay(method), output_dir=str(output), logging_file=False, **common)
        cards[method] = json.loads((output / "method.json").read_text())
        states[method] = torch.load(output / "model.pt", weights_only=True)
    assert [m for m, card in cards.items() if card["reads_target_labels"]] == ["oracle"]
    assert (
        "TARGET validation" in cards["oracle"]["selection_rule"]
        and "unlabelled target slices" in cards["segjdot"]["selection_rule"]
    )
    assert (
        cards["adaptsegnet"]["settings"]["lambda_adv"] == 0.001 and cards["segjdot"]["settings"]["jdot_alpha"] == 0.001
    )

    # source: the source model itself; adabn: only the BatchNorm running statistics differ from it
    for key, value in source_state.items():
        assert torch.equal(states["source"][key], value), key
    network = ConfigWorkflow(
        config_file=_overlay("adabn"),
        workflow_type="train",
        logging_file=False,
        output_dir=str(folder / "parse"),
        **common,
    ).parser.get_parsed_content("network_def")
    buffers = {
        f"{name}.{b}"
        for name, _ in batchnorm_layers(network)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    changed = {key for key, value in source_state.items() if not torch.equal(states["adabn"][key], value)}
    assert changed and changed <= buffers
    # the trained methods changed the weights; the discriminator and its optimiser are in the checkpoint
    for method in ("adaptsegnet", "segjdot", "oracle"):
        assert any(not torch.equal(states[method][k], v) for k, v in source_state.items() if k.endswith("weight")), (
            method
        )
    (checkpoint,) = (folder / "adaptsegnet" / "checkpoints").glob("checkpoint*.pt")
    saved = torch.load(checkpoint, weights_only=False)
    assert {
        "discriminator",
        "discriminator_optimizer",
        "discriminator_lr_scheduler",
        "model",
        "optimizer",
        "trainer",
    } <= set(saved)
    assert "clustering" not in saved


@pytest.mark.parametrize("method", ["adaptsegnet", "segjdot", "oracle", "aiva"])
def test_method_overlays_train_on_the_data_they_claim(prostate_source, method):
    folder, common = prostate_source
    workflow = ConfigWorkflow(
        config_file=_overlay(method),
        workflow_type="train",
        logging_file=False,
        output_dir=str(folder / f"parse_{method}"),
        **common,
    )
    parser = workflow.parser
    labelled = {e["site"] for e in parser.get_parsed_content("train#dataset").data}
    validation = {e["site"] for e in parser.get_parsed_content("validate#dataset").data}
    trainer = parser.get_parsed_content("train#trainer")
    if method == "oracle":
        assert labelled == validation == {"F"} and trainer.state.reads_target_labels
    else:
        assert labelled == validation == set("ABCDE")
        target = parser.get_parsed_content("train#target_dataset").data
        assert {e["site"] for e in target} == {"F"} and all("label" not in e for e in target)
        assert not getattr(trainer.state, "reads_target_labels", False)
    assert (
        type(trainer).__name__
        == {
            "adaptsegnet": "AdaptSegNetTrainer",
            "segjdot": "SegJDOTTrainer",
            "oracle": "OracleTrainer",
            "aiva": "AIVATrainer",
        }[method]
    )


def test_adaptsegnet_resumes_from_its_checkpoint_with_the_discriminator(prostate_source):
    """A finished 2-step run restarted with a larger budget resumes (discriminator included) instead of restarting."""
    folder, common = prostate_source
    output = folder / "resume"
    run(config_file=_overlay("adaptsegnet"), output_dir=str(output), logging_file=False, **{**common, "max_steps": 2})
    first = torch.load(next((output / "checkpoints").glob("checkpoint*.pt")), weights_only=False)
    run(config_file=_overlay("adaptsegnet"), output_dir=str(output), logging_file=False, **{**common, "max_steps": 4})
    (last,) = (output / "checkpoints").glob("checkpoint*.pt")
    resumed = torch.load(last, weights_only=False)
    assert first["trainer"]["iteration"] == 2 and resumed["trainer"]["iteration"] == 4
    assert resumed["discriminator_lr_scheduler"]["last_epoch"] == 4  # stepped 2 + 2 times: restored, not restarted


def test_bundle_cell_runner_builds_the_commands(tmp_path):
    preset = PRESETS["prostate"]
    runner = BundleCellRunner(
        preset,
        tmp_path,
        dataset_dir="/data",
        source_checkpoint="/models/src.pt",
        epoch_length=50,
        cluster_every=100,
        overrides={"batch_size": 4},
    )
    cell = Cell("prostate", tuple("ABCDE"), "F", "aiva", 0, 9, 200)
    overrides = runner.train_overrides(cell, tmp_path / "run")
    assert (
        overrides["n_clusters"] == 9 and overrides["cluster_every"] == 100 and overrides["source_site"] == "A,B,C,D,E"
    )
    assert (
        overrides["source_checkpoint"] == "/models/src.pt"
        and overrides["max_steps"] == 200
        and overrides["batch_size"] == 4
    )
    assert [p.name for p in runner.method_configs("aiva")] == ["train.json"]
    assert [p.name for p in runner.method_configs("oracle")] == ["train.json", "oracle.json"]
    ixi = BundleCellRunner(PRESETS["ixi-sim"], tmp_path, dataset_dir="/data")
    cell = grid("ixi-sim", methods=("segjdot",), steps=300)[0]
    overrides = ixi.train_overrides(cell, tmp_path / "run")
    assert overrides["source_site"] == "ixi_hh" and overrides["target_site"] == "ixi_hh_simulated_strong"
    assert overrides["source_checkpoint"].endswith("bundles/aiva_brain/models/model.pt") and overrides[
        "datalist"
    ].endswith("datalist_ixi_hh.json")
    assert "n_clusters" not in overrides


def test_bundle_cell_runner_takes_the_bundles_from_any_folder(tmp_path, monkeypatch):
    """``--bundles DIR``: a copy of the bundles outside the checkout gives the configs, shipped model and datalist
    of that copy (nothing from the repository); a folder without the bundle fails naming ``--bundles``."""
    import shutil

    copy = tmp_path / "elsewhere" / "my_bundles"
    shutil.copytree(REPOSITORY / "bundles" / "aiva_brain", copy / "aiva_brain", ignore=shutil.ignore_patterns("*.pt"))
    (copy / "aiva_brain" / "models" / "model.pt").write_bytes(b"")
    runner = BundleCellRunner(PRESETS["ixi-sim"], tmp_path / "out", dataset_dir="/data", bundles=copy)
    overrides = runner.train_overrides(grid("ixi-sim", methods=("source",), steps=10)[0], tmp_path / "run")
    assert overrides["source_checkpoint"] == str(copy / "aiva_brain" / "models" / "model.pt")
    assert overrides["datalist"] == str(copy / "aiva_brain" / "configs" / "datalist_ixi_hh.json")
    assert all(str(p).startswith(str(copy)) for p in runner.method_configs("oracle"))
    with pytest.raises(FileNotFoundError, match="--bundles"):
        BundleCellRunner(PRESETS["prostate"], tmp_path / "out", bundles=copy)
    # relative paths are made absolute: the bundle subprocesses run in the bundles' parent folder
    monkeypatch.chdir(tmp_path)
    relative = BundleCellRunner(PRESETS["ixi-sim"], Path("out"), dataset_dir="data", datalist="d.json", bundles=copy)
    overrides = relative.train_overrides(grid("ixi-sim", methods=("source",), steps=10)[0], relative.output / "run")
    assert relative.output == tmp_path / "out"
    assert overrides["dataset_dir"] == str(tmp_path / "data") and overrides["datalist"] == str(tmp_path / "d.json")


def test_bundle_cell_runner_records_the_source_statistics_model_on_the_source_test_set(tmp_path):
    """An AIVA cell whose run wrote model_source_statistics.pt: the evaluation gets it (source test only) and the
    result keeps its per-volume scores apart from the target-site model's. The bundle runs are replaced by a fake
    that writes what train.json and evaluate.json would."""
    runner = BundleCellRunner(PRESETS["ixi-sim"], tmp_path / "out", dataset_dir="/data", source_checkpoint="/s.pt")
    cell = grid("ixi-sim", methods=("aiva",), steps=10)[0]
    run_dir = tmp_path / "out" / "runs" / "cell"
    evaluated = {}

    def fake_bundle(configs, overrides, log_file):
        run_dir.mkdir(parents=True, exist_ok=True)
        if configs[-1].name != "evaluate.json":  # training
            (run_dir / "method.json").write_text(
                json.dumps({"selection_rule": "label-free", "reads_target_labels": False, "selection": "last"})
            )
            picks = {"last": {"file": "selection/epoch_0002.pt"}, "target_im": {"file": "selection/epoch_0001.pt"}}
            (run_dir / "selection.json").write_text(json.dumps({"rule": "last", "picks": picks}))
            (run_dir / "selection.csv").write_text("epoch,file\n1,selection/epoch_0001.pt\n")
            (run_dir / "model_source_statistics.pt").write_bytes(b"weights")
            return
        evaluated.update(overrides["eval_checkpoints"])
        rows = ["model,set,subject,dice"]
        for name, entry in overrides["eval_checkpoints"].items():
            sets = entry["sets"] if isinstance(entry, dict) else ["target test", "source test"]
            rows += [f"{name},{s},{s[0]}1,{0.5 if 'statistics' in name else 0.9}" for s in sets]
        (run_dir / "evaluation").mkdir(exist_ok=True)
        (run_dir / "evaluation" / "evaluation.csv").write_text("\n".join(rows) + "\n")

    runner._run_bundle = fake_bundle
    result = runner(cell, run_dir, progress=lambda message: None)
    assert evaluated["aiva (last) with source statistics"] == {
        "file": str(run_dir / "model_source_statistics.pt"),
        "sets": ["source test"],
    }
    assert result["source_statistics_volumes"] == [{"subject": "s1", "set": "source test", "site": "", "dice": 0.5}]
    assert {v["set"] for v in result["volumes"]} == {"target test", "source test"}
    assert all(v["dice"] == 0.9 for v in result["volumes"])


def test_per_seed_table_shows_every_seed_and_the_margin_over_adabn():
    records = [
        _record("source", "C", 0, [0.5, 0.7]),
        _record("source", "C", 1, [0.4, 0.6]),
        _record("adabn", "C", 0, [0.6, 0.6]),
        _record("adabn", "C", 1, [0.7, 0.7]),
        _record("aiva", "C", 0, [0.7, 0.7], k=12),
        _record("aiva", "C", 1, [0.6, 0.7], k=12),
        _record("aiva", "C", 1, [0.0, 0.0], k=3),  # another k: left out
        _record("oracle", "C", 0, [0.9, 0.9]),  # reads target labels: no margin column
    ]
    markdown, rows = per_seed_table(records, "dice", k=12)
    assert markdown == textwrap.dedent("""\
        | seed | oracle* | source | adabn | aiva | aiva - adabn |
        |---|---|---|---|---|---|
        | 0 | 90.00 | 60.00 | 60.00 | 70.00 | +10.00 |
        | 1 | - | 50.00 | 70.00 | 65.00 | -5.00 |""")
    assert rows[1] == {"seed": 1, "source": 50.0, "adabn": 70.0, "aiva": 65.0, "aiva_minus_adabn": -5.0}
    assert per_seed_table([r for r in records if r["method"] != "adabn"], "dice") == ("", [])
