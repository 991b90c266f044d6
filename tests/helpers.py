"""Small synthetic and real data sets for the trainer and handler tests."""

import numpy as np
import torch
from monai.bundle import run
from monai.data import DataLoader

from aiva_monai.engines import AIVATrainer
from aiva_monai.handlers import AIVAClusteringHandler
from aiva_monai.losses import AIVALoss
from aiva_monai.networks import PreActResUNet


class RefusesLabels(dict):
    """A batch that raises on any access to its label: the guard of the target stream in tests."""

    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("a target label was read")
        return super().__getitem__(key)


class GuardedLoader:
    """A loader whose batches raise on any access to their label."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (RefusesLabels(batch) for batch in self.loader)


def synthetic_site(n, size=16, contrast=1.0, seed=0):
    """n slices of a bright square of random size and position; labels = the square."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(n):
        label = np.zeros((1, size, size), np.float32)
        width = int(rng.integers(3, size // 2))
        x, y = rng.integers(0, size - width, 2)
        label[0, x : x + width, y : y + width] = 1
        image = (label * 0.8 + rng.normal(scale=0.1, size=label.shape)) * contrast
        samples.append(
            {"image": torch.from_numpy(image.astype(np.float32)), "label": torch.from_numpy(label), "index": index}
        )
    return samples


def make_trainer(
    source,
    target,
    *,
    max_epochs=2,
    epoch_length=3,
    n_clusters=3,
    seed=0,
    interval=1,
    channels=(4, 8, 16),
    calibration_iterations=2,
    tsne_method="sklearn",
    batch_size=4,
    lr=1e-2,
    network=None,
    handler_options=None,
):
    """An AIVATrainer with its clustering handler, fully seeded."""
    torch.manual_seed(seed)
    network = network or PreActResUNet(channels=channels, blocks_per_level=1)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9)
    trainer = AIVATrainer(
        device="cpu",
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        train_data_loader=DataLoader(
            source, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        ),
        target_data_loader=DataLoader(
            target, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + 1)
        ),
        network=network,
        optimizer=optimizer,
        loss_function=AIVALoss(calibration_iterations=calibration_iterations),
        decollate=False,
    )
    handler = AIVAClusteringHandler(
        source,
        target,
        n_clusters=n_clusters,
        interval=interval,
        progress=False,
        **{
            **(handler_options or {}),
            "settings": {
                "batch_size": 8,
                "tsne_method": tsne_method,
                "seed": seed,
                **(handler_options or {}).get("settings", {}),
            },
        },
    )
    handler.attach(trainer)
    return trainer, handler


def run_tiny_adaptation(configs, common, output, datalist=None, **extra):
    """A bundle's ``train.json`` (``configs``: its configs folder) as a tiny run: a clustering round every 2 steps,
    k = 3, scikit-learn's t-SNE; ``common`` and ``extra`` are further overrides. Returns the overrides it ran with."""
    overrides = {
        **common,
        **extra,
        "cluster_every": 2,
        "n_clusters": 3,
        "cluster_options#tsne_method": "sklearn",
        "output_dir": str(output),
    }
    if datalist:
        overrides["datalist"] = str(datalist)
    run(config_file=str(configs / "train.json"), **overrides)
    return overrides
