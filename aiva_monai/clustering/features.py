"""Bottleneck features on their way to the clustering: the random-projection sketch, the per-slice feature
store, per-cluster sums, and each slice's position in its volume."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from sklearn.random_projection import SparseRandomProjection

from aiva_monai.clustering.settings import STORE_DTYPES

logger = logging.getLogger(__name__)


class FeatureProjector:
    """Seeded very sparse random projection of flattened features to ``sketch_dim`` values.

    Args:
        n_features: D, the flattened size of one feature map.
        sketch_dim: output size m. When ``n_features <= sketch_dim`` the projector is the identity.
        seed: seed of the projection matrix; the same seed gives the same matrix everywhere.

    Calling it on a (B, ...) tensor returns a (B, m) float32 tensor on the input's device.
    """

    def __init__(self, n_features: int, sketch_dim: int = 1024, seed: int = 0) -> None:
        if n_features < 1 or sketch_dim < 1:
            raise ValueError(f"n_features ({n_features}) and sketch_dim ({sketch_dim}) must be positive.")
        self.n_features = int(n_features)
        self.output_dim = min(self.n_features, int(sketch_dim))
        self._matrix: torch.Tensor | None = None
        self._by_device: dict[str, torch.Tensor] = {}
        if self.n_features > sketch_dim:
            shape_only = scipy.sparse.csr_matrix((1, self.n_features), dtype=np.float32)
            projection = SparseRandomProjection(n_components=int(sketch_dim), density="auto", random_state=seed)
            components = projection.fit(shape_only).components_.tocsr().astype(np.float32)  # (m, D)
            with warnings.catch_warnings():  # torch flags sparse CSR as beta; mm with it is stable
                warnings.simplefilter("ignore", UserWarning)
                self._matrix = torch.sparse_csr_tensor(
                    torch.from_numpy(components.indptr.astype(np.int64)),
                    torch.from_numpy(components.indices.astype(np.int64)),
                    torch.from_numpy(components.data),
                    size=components.shape,
                )

    @property
    def is_identity(self) -> bool:
        return self._matrix is None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(features.shape[0], -1).float()
        if flat.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per sample, got {flat.shape[1]}.")
        if self._matrix is None:
            return flat
        key = str(flat.device)
        if key not in self._by_device:
            self._by_device[key] = self._matrix.to(flat.device)
        return torch.sparse.mm(self._by_device[key], flat.t()).t()


class ClusterMeanAccumulator:
    """Streaming per-cluster mean of full-dimensional features.

    Args:
        n_clusters: k.
        n_features: D, flattened size of one feature map.
        device: where the (k, D) float64 sums live (the network's device in the handler).
    """

    def __init__(self, n_clusters: int, n_features: int, device: str | torch.device = "cpu") -> None:
        self.sums = torch.zeros(n_clusters, n_features, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_clusters, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor, labels) -> None:
        """Add a (B, ...) batch whose samples belong to clusters ``labels`` (B,)."""
        flat = features.reshape(features.shape[0], -1).to(self.sums.device, torch.float64)
        index = torch.as_tensor(np.asarray(labels), device=self.sums.device).long()
        self.sums.index_add_(0, index, flat)
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def means(self) -> torch.Tensor:
        """(k, D) float32 means. Raises ValueError when a cluster received no sample."""
        empty = torch.nonzero(self.counts == 0).reshape(-1).tolist()
        if empty:
            raise ValueError(f"source clusters {empty} received no sample: cannot compute their mean feature.")
        return (self.sums / self.counts[:, None]).float()


class FeatureStore:
    """Full-dimensional features of ``n_rows`` slices, written during the embedding pass and summed per
    cluster once the clusters are known, so the source means need no second pass through the network.

    Rows are kept in host memory up to ``memory_mb``; the rest go to an anonymous temporary file
    (written and read with ``pwrite``/``pread``: file pages live in the OS page cache, not in this
    process's memory). With ``dtype="float16"`` each row is divided by its largest absolute value (kept
    in float32) before rounding, so no value overflows and each keeps ~11 significant bits (relative
    error <= 2^-11, unbiased round-to-nearest); ``"float32"`` stores the values exactly.

    Args:
        n_rows: number of slices (rows are addressed by dataset position).
        n_features: D, flattened feature size.
        dtype: "float16" (default) or "float32".
        memory_mb: host memory for rows; 0 puts every row in the file.
        directory: folder of the temporary file (default: the system's temporary folder).

    Under ``torch.distributed`` each rank writes its own rows; ``cluster_sums`` sums only the rows
    written here, so all-reducing the sums and counts gives the means over all ranks.
    """

    def __init__(
        self, n_rows: int, n_features: int, dtype: str = "float16", memory_mb: float = 1024.0, directory=None
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {dtype!r}; choose one of {STORE_DTYPES}.")
        self.n_rows, self.n_features = int(n_rows), int(n_features)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.n_features * self.dtype.itemsize
        self.rows_in_memory = min(self.n_rows, int(float(memory_mb) * 2**20) // self.row_bytes)
        # np.empty maps untouched pages lazily: memory grows with the rows actually written
        self._memory = np.empty((self.rows_in_memory, self.n_features), self.dtype)
        self._scales = np.ones(self.n_rows, np.float32)
        self._written = np.zeros(self.n_rows, bool)
        self._file = tempfile.TemporaryFile(dir=directory) if self.rows_in_memory < self.n_rows else None

    @property
    def rows_on_disk(self) -> int:
        return self.n_rows - self.rows_in_memory

    def write(self, position: int, features) -> None:
        """Store a (B, ...) batch of features as rows ``position .. position + B - 1``."""
        flat = torch.as_tensor(features).detach().reshape(len(features), -1).float().cpu()
        if flat.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got {flat.shape[1]}.")
        end = position + len(flat)
        if position < 0 or end > self.n_rows:
            raise IndexError(f"rows {position}..{end - 1} outside the store's {self.n_rows} rows.")
        # torch, not numpy: the same IEEE float32 division and round-to-nearest-even cast (bit-identical
        # rows), 10 x faster on a CPU, where numpy's float16 cast is not vectorised
        if self.dtype == np.float16:
            scales = flat.abs().amax(dim=1)
            scales[scales == 0] = 1.0
            self._scales[position:end] = scales.numpy()
            values = (flat / scales[:, None]).to(torch.float16).numpy()
        else:
            values = flat.numpy()
        split = min(max(self.rows_in_memory - position, 0), len(values))
        if split:
            self._memory[position : position + split] = values[:split]
        if split < len(values):
            offset = (position + split - self.rows_in_memory) * self.row_bytes
            os.pwrite(self._file.fileno(), np.ascontiguousarray(values[split:]).tobytes(), offset)
        self._written[position:end] = True

    def read(self, begin: int, end: int) -> np.ndarray:
        """Rows ``begin .. end - 1`` as a float32 (rows, D) array (every row must have been written)."""
        if not self._written[begin:end].all():
            raise ValueError(f"rows {begin}..{end - 1} were not all written.")
        parts = []
        if begin < self.rows_in_memory:
            parts.append(self._memory[begin : min(end, self.rows_in_memory)])
        if end > self.rows_in_memory:
            first = max(begin, self.rows_in_memory)
            raw = os.pread(
                self._file.fileno(), (end - first) * self.row_bytes, (first - self.rows_in_memory) * self.row_bytes
            )
            parts.append(np.frombuffer(raw, self.dtype).reshape(end - first, self.n_features))
        rows = np.concatenate(parts).astype(np.float32)
        if self.dtype == np.float16:
            rows *= self._scales[begin:end, None]
        return rows

    def cluster_sums(
        self,
        labels,
        n_clusters: int,
        device="cpu",
        chunk_rows: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> ClusterMeanAccumulator:
        """A ``ClusterMeanAccumulator`` holding the per-cluster sums and counts of the written rows
        (``labels``: (n_rows,) cluster ids). ``progress(rows done)`` is called after every chunk."""
        labels = np.asarray(labels)
        if labels.shape != (self.n_rows,):
            raise ValueError(f"labels must be ({self.n_rows},), got {labels.shape}.")
        accumulator = ClusterMeanAccumulator(n_clusters, self.n_features, device)
        written = np.flatnonzero(self._written)
        # contiguous runs of written rows (a rank writes whole batches), read in chunks
        runs = np.split(written, np.flatnonzero(np.diff(written) != 1) + 1) if len(written) else []
        done = 0
        for run in runs:
            for begin in range(int(run[0]), int(run[-1]) + 1, chunk_rows):
                end = min(begin + chunk_rows, int(run[-1]) + 1)
                accumulator.update(torch.from_numpy(self.read(begin, end)), labels[begin:end])
                done += end - begin
                if progress is not None:
                    progress(done)
        return accumulator

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = np.empty((0, self.n_features), self.dtype)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slice_positions(dataset) -> np.ndarray:
    """(n,) float64 normalised position of every slice of a ``SliceDataset`` in its volume: 0 for the
    first slice along the slicing axis, 1 for the last (0 for a one-slice volume).

    Raises:
        ValueError: for a dataset without ``slice_counts``.
    """
    counts = getattr(dataset, "slice_counts", None)
    if counts is None:
        raise ValueError(
            f"slice_position needs each slice's position in its volume: a dataset with slice_counts "
            f"(aiva_monai.data.SliceDataset), got {type(dataset).__name__}."
        )
    counts = np.asarray(counts, dtype=np.int64)
    positions = [np.arange(count) / max(count - 1, 1) for count in counts]
    return np.concatenate(positions) if positions else np.zeros(0)
