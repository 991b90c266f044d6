"""Records what a bundle run computes, for tests/test_distributed.py: per-iteration loss parts, every
clustering round (labels, match, source means) and the final weights, one file per rank."""

import numpy as np
import torch
from ignite.engine import Events


def attach(trainer, clustering_handler, folder):
    """Attach after the clustering handler (so EPOCH_STARTED sees the new clustering); writes
    ``folder/probe_rank<r>.pt`` when the run completes."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    record = {"iterations": [], "clusterings": []}

    @trainer.on(Events.EPOCH_STARTED)
    def _clustering(engine):
        result = clustering_handler.clustering
        record["clusterings"].append(
            {
                "epoch": engine.state.epoch,
                "source_labels": np.asarray(result.source_labels).copy(),
                "target_labels": np.asarray(result.target_labels).copy(),
                "match": np.asarray(result.match).copy(),
                "source_means": result.source_means.detach().cpu().clone(),
            }
        )

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iteration(engine):
        output = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        record["iterations"].append({key: float(output[key]) for key in ("loss", "seg_loss", "align_loss", "lambda")})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _weights(engine):
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        record.setdefault("weights_by_epoch", {})[engine.state.epoch] = {
            k: v.detach().cpu().clone() for k, v in network.state_dict().items()
        }

    @trainer.on(Events.COMPLETED)
    def _save(engine):
        network = engine.network.module if hasattr(engine.network, "module") else engine.network
        record["weights"] = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        torch.save(record, f"{folder}/probe_rank{rank}.pt")

    return record
