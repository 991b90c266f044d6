"""The experiment matrix of the AIVA paper (issue 5): every method on every (source, target) pair, one
resumable command, and the report that turns its results file into the paper's tables and figures.

```
python -m aiva_monai.experiments run --preset ixi-sim --output results/ixi_sim --steps 300
python -m aiva_monai.experiments run --preset cc359 --dataset_dir /data/CC359 --output results/cc359 --paper-subset
python -m aiva_monai.experiments run --preset prostate --dataset_dir /data/prostate --output results/prostate
python -m aiva_monai.experiments report results/ixi_sim
python -m aiva_monai.experiments compare sync='results/sync_seed*' ahead='results/ahead_seed*'   # settings side by side
python -m aiva_monai.experiments grid --preset cc359 --paper-subset      # list the cells, run nothing
```

A *cell* is (dataset, source site(s), target site, method, seed, k, steps). Each cell runs through
``monai.bundle`` in a subprocess: the method overlay ``configs/methods/<method>.json`` on the bundle's
``train.json`` (``aiva`` is ``train.json`` itself), then ``evaluate.json`` on the same run folder. Every
method starts from the same source checkpoint and uses the same data, network, step budget and evaluation;
model selection of the unsupervised methods is on source validation data only (the overlays say so, and
``method.json`` in each run folder records the rule).

Resumability: the results file ``<output>/results.jsonl`` is append-only, one JSON object per finished cell,
each written with a single ``write`` on a file opened for appending (a line is either there whole or not at
all; a torn last line from a crash is ignored and repaired on the next append). A cell whose id is already
recorded is skipped. A killed cell restarts in the same run folder: the training configs resume from their
latest checkpoint (``train.json``'s ``resume_from``), the checkpoint-free methods (``source``, ``adabn``)
and the evaluation simply run again (their outputs are written atomically). Subprocesses die with the
runner (Linux), and ``<output>/.lock`` keeps a second runner off the same folder.

The package, one idea a module: ``grid`` (methods, presets, cells), ``store`` (the results file, the folder
lock, reading records), ``runner`` (one cell through ``monai.bundle`` subprocesses), ``matrix`` (every cell,
resumable), ``report`` (tables), ``compare`` (conditions side by side), ``figures``, ``cli`` (the command line).
"""

from aiva_monai.experiments.cli import main, subset_datalist
from aiva_monai.experiments.compare import (
    candidate_table,
    compare_table,
    load_conditions,
    setting_differences,
    write_comparison,
)
from aiva_monai.experiments.figures import k_figure, qualitative_figure
from aiva_monai.experiments.grid import (
    AIVA_METHODS,
    DEFAULT_K,
    K_ABLATION_PAIRS,
    K_VALUES,
    METHOD_ORDER,
    PRESETS,
    Cell,
    Preset,
    cc359_pairs,
    grid,
)
from aiva_monai.experiments.matrix import run_matrix
from aiva_monai.experiments.report import per_seed_table, render_report, report_table, selection_table, write_report
from aiva_monai.experiments.runner import BundleCellRunner, git_commit, run_bundle
from aiva_monai.experiments.store import RESULTS_NAME, ResultsFile

__all__ = [
    "AIVA_METHODS",
    "DEFAULT_K",
    "K_ABLATION_PAIRS",
    "K_VALUES",
    "METHOD_ORDER",
    "PRESETS",
    "RESULTS_NAME",
    "BundleCellRunner",
    "Cell",
    "Preset",
    "ResultsFile",
    "candidate_table",
    "cc359_pairs",
    "compare_table",
    "git_commit",
    "grid",
    "k_figure",
    "load_conditions",
    "main",
    "per_seed_table",
    "qualitative_figure",
    "render_report",
    "report_table",
    "run_bundle",
    "run_matrix",
    "selection_table",
    "setting_differences",
    "subset_datalist",
    "write_comparison",
    "write_report",
]
