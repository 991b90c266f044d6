"""AIVATrainer on real IXI-HH slices: source = 2 subjects, target = 2 other subjects
with a simulated contrast change.
"""

import pytest
import torch
from ignite.engine import Events
from monai.transforms import AdjustContrastd, Compose
from monai.utils import set_determinism

from aiva_monai.data import SliceDataset, ixi_datalist, volume_transforms
from tests.helpers import GuardedLoader, make_trainer


@pytest.fixture(scope="module")
def ixi_sites(ixi_root):
    datalist = ixi_datalist(ixi_root)
    preprocessing = volume_transforms(pixdim=None, in_plane_size=(128, 128), slice_axis=0)
    source = SliceDataset(datalist[:2], preprocessing, progress=False)
    simulated = Compose([preprocessing, AdjustContrastd("image", gamma=2.5)])
    target_with_labels = SliceDataset(datalist[2:4], simulated, progress=False)
    target_without_labels = SliceDataset(datalist[2:4], simulated, keys=("image",), progress=False)
    return source, target_with_labels, target_without_labels


def run(source, target, guard=False):
    set_determinism(0)
    trainer, handler = make_trainer(
        source, target, max_epochs=2, epoch_length=8, n_clusters=4, channels=(8, 16, 32, 64), tsne_method="opentsne"
    )
    if guard:
        trainer.target_data_loader = GuardedLoader(trainer.target_data_loader)
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: outputs.append(
            {
                k: float(torch.as_tensor(e.state.output[k]).detach())
                for k in ("loss", "seg_loss", "align_loss", "lambda")
            }
        ),
    )
    trainer.run()
    set_determinism(None)
    return outputs, trainer.network.state_dict(), handler


def test_short_run_lowers_the_loss_and_never_reads_target_labels(ixi_sites):
    source, target_with_labels, target_without_labels = ixi_sites
    outputs, weights, handler = run(source, target_with_labels)
    assert [h["epoch"] for h in handler.history] == [1, 2]
    assert [o["lambda"] for o in outputs[:2]] == [0.0, 0.0] and outputs[2]["lambda"] > 0
    weighted = outputs[2:]  # after the 2 calibration iterations the objective is fixed
    first, last = weighted[:3], weighted[-3:]
    assert sum(o["loss"] for o in last) < 0.8 * sum(o["loss"] for o in first)
    assert sum(o["seg_loss"] for o in last) < sum(o["seg_loss"] for o in first)

    garbage = [{**sample, "label": torch.rand_like(sample["label"]) * 7} for sample in target_with_labels]
    for target, guard in ((target_without_labels, False), (garbage, False), (target_with_labels, True)):
        other_outputs, other_weights, _ = run(source, target, guard=guard)
        assert other_outputs == outputs
        for name, value in weights.items():
            assert torch.equal(value, other_weights[name]), name
