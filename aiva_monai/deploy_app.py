"""A MONAI Deploy application (monai-deploy-app-sdk): a DICOM study in, the bundle's DICOM SEG out, the way
clinical teams package MONAI models.

    python -m aiva_monai.deploy_app -i /path/to/study -o /path/to/output --bundle bundles/aiva_brain

Operators: the SDK's ``DICOMDataLoaderOperator`` (reads every DICOM file under the input folder into studies
and series) and ``DICOMSeriesSelectorOperator`` (picks the series to segment by rules on their DICOM
attributes: MR, series description matching T1 for the brain bundle, T2 for the prostate bundle), then
``BundleSegOperator``, which writes each selected series to a folder of its own and runs the bundle's
``inference.json`` on them: the same checks, guard and outputs as the command line (NIfTI mask, overlay,
DICOM SEG referencing the series, ``summary.csv``). A selected series that fails ends the app with an error
naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from monai.bundle import ConfigWorkflow
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator

from aiva_monai.inference.evaluator import ExitCode

__all__ = ["BundleSegOperator", "AIVASegApp", "series_rules"]

logger = logging.getLogger(__name__)

# the series each bundle segments, by its metadata name
SERIES_DESCRIPTIONS = {"aiva_brain": r"(?i).*\bt1", "aiva_prostate": r"(?i).*\bt2"}


def series_rules(bundle_name: str, description: str | None = None) -> str:
    """Selection rules (the SDK's JSON) for MR series whose SeriesDescription matches ``description`` (default:
    T1 for aiva_brain, T2 for aiva_prostate)."""
    pattern = description or SERIES_DESCRIPTIONS.get(bundle_name)
    if pattern is None:
        raise ValueError(f"no series description for bundle {bundle_name!r}: pass one (a regular expression).")
    return json.dumps(
        {"selections": [{"name": bundle_name, "conditions": {"Modality": "(?i)MR", "SeriesDescription": pattern}}]}
    )


class BundleSegOperator(Operator):
    """Runs a bundle's inference config on the selected series (input ``study_selected_series_list``); emits
    ``seg_paths`` (the DICOM SEG files written, one per series).

    Args:
        bundle_path: the bundle folder (this repository's or a zoo export with ``scripts/``).
        output_folder: where the masks, overlays, DICOM SEGs and ``summary.csv`` go.
        overrides: more config overrides (e.g. ``{"checkpoint": ...}``).
    """

    def __init__(
        self, fragment: Fragment, *args, bundle_path, output_folder, overrides: dict | None = None, **kwargs
    ) -> None:
        self.bundle_path = Path(bundle_path).resolve()
        self.output_folder = Path(output_folder)
        self.overrides = dict(overrides or {})
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("seg_paths").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive("study_selected_series_list") or []
        series = [item.series for study in selected for item in study.selected_series]
        if not series:
            raise ValueError("no series of the study matches the selection rules: nothing to segment.")
        with tempfile.TemporaryDirectory(prefix="aiva_deploy_") as folder:
            for one in series:
                target = Path(folder) / one.SeriesInstanceUID  # the case (and output) name is the series UID
                target.mkdir()
                for number, instance in enumerate(one.get_sop_instances()):
                    instance.get_native_sop_instance().save_as(str(target / f"{number:05d}.dcm"))
            rows = self._run_bundle(folder)
        failed = {case: row["message"] for case, row in rows.items() if row["status"] != "ok"}
        if failed:
            raise RuntimeError(f"segmentation failed for series {failed}")
        op_output.emit([rows[one.SeriesInstanceUID]["dicom_seg"] for one in series], "seg_paths")

    def _run_bundle(self, dataset_dir: str) -> dict[str, dict]:
        if (self.bundle_path / "scripts").is_dir() and str(self.bundle_path) not in sys.path:
            sys.path.insert(0, str(self.bundle_path))  # a zoo export's own code
        workflow = ConfigWorkflow(
            config_file=str(self.bundle_path / "configs" / "inference.json"),
            workflow_type="infer",
            logging_file=False,
            dataset_dir=dataset_dir,
            output_dir=str(self.output_folder),
            bundle_root=str(self.bundle_path),
            exit_on_failure=False,
            progress=False,
            **self.overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        evaluator = workflow.parser.get_parsed_content("evaluator")
        logger.info(f"bundle {self.bundle_path.name}: exit code {ExitCode(evaluator.exit_code).name}")
        return evaluator.rows


class AIVASegApp(Application):
    """DICOM study -> series selection -> the bundle's inference -> DICOM SEG.

    Args:
        input_folder, output_folder: the study's folder and the output folder (default: the SDK's ``-i`` /
            ``-o`` arguments or environment).
        bundle_path: the bundle folder.
        description: a regular expression for the SeriesDescription to segment (default by bundle).
        overrides: more config overrides for the bundle.
    """

    def __init__(
        self,
        *args,
        bundle_path,
        input_folder=None,
        output_folder=None,
        description: str | None = None,
        overrides: dict | None = None,
        **kwargs,
    ) -> None:
        self.bundle_path = Path(bundle_path)
        self.input_folder, self.output_folder = input_folder, output_folder
        name = json.loads((self.bundle_path / "configs" / "metadata.json").read_text(encoding="utf-8"))["name"]
        self.rules = series_rules(name, description)
        self.overrides = overrides
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        input_folder = Path(self.input_folder or self.context.input_path)
        output_folder = Path(self.output_folder or self.context.output_path)
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=self.rules, name="series_selector")
        segmenter = BundleSegOperator(
            self, bundle_path=self.bundle_path, output_folder=output_folder, overrides=self.overrides, name="bundle_seg"
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, segmenter, {("study_selected_series_list", "study_selected_series_list")})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiva_monai.deploy_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", required=True, help="the DICOM study folder")
    parser.add_argument("-o", "--output", required=True, help="the output folder")
    parser.add_argument("--bundle", required=True, help="the bundle folder, e.g. bundles/aiva_brain")
    parser.add_argument("--description", help="regular expression for the SeriesDescription to segment")
    parser.add_argument("--checkpoint", help="model weights (default: the bundle's models/model.pt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {"checkpoint": args.checkpoint} if args.checkpoint else None
    AIVASegApp(
        bundle_path=args.bundle,
        input_folder=args.input,
        output_folder=args.output,
        description=args.description,
        overrides=overrides,
    ).run()


if __name__ == "__main__":
    main()
