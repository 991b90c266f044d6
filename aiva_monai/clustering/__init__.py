"""Joint embedding and per-site clustering of bottleneck features (paper, Algorithm 1, steps 2-5).

Pipeline, once per adaptation epoch (every setting in one frozen ``ClusteringSettings``):

1. ``FeatureProjector``: each flattened bottleneck vector (D values, 131,072 for a 128 x 32 x 32 map)
   is reduced on the fly to ``sketch_dim`` values by a seeded, very sparse random projection
   (Li, Hastie & Church 2006; scikit-learn's ``SparseRandomProjection``). Distances and inner
   products are preserved up to a small relative error (Johnson-Lindenstrauss), so the joint PCA
   that follows sees the same geometry, while the embedding pass never holds the full (n, D)
   matrix in float32: 25,000 slices need 100 MB instead of 13 GB. When D <= sketch_dim the
   projection is the identity and the PCA is exact.
2. Joint PCA (scikit-learn) of source + target sketches, optionally each slice's normalised position
   in its volume as one more weighted column (``slice_position``), then one joint 2D t-SNE (openTSNE's
   FFT method by default, scikit-learn's Barnes-Hut as an option; optionally warm-started from the
   previous round's embedding).
3. k-means separately on the source and on the target points of the 2D embedding (the target's
   optionally initialised from the source centres, ``target_init_from_source``).
4. Hungarian matching of target centres to source centres: in the 2D map (the paper) or, with
   ``match_space="pca"``, the same clusters' member means in the joint PCA space.
5. ``source_means``: mean *full-dimensional* source feature of each source cluster. The embedding
   pass keeps every source slice's full feature in a ``FeatureStore`` (float16 in memory up to a
   budget, the rest in a temporary file), so the means need no second pass through the network
   (``source_means="second_pass"`` keeps the old way). ``ClusterMeanAccumulator`` sums them.

``cluster_sites`` runs all five steps on arrays held in memory; the Ignite handler streams steps 1
and 5 through the network (``aiva_monai.embedding``) and calls ``cluster_sketches`` for steps 2-4.

The package: ``settings`` (``ClusteringSettings``, ``SiteClustering``), ``features`` (sketch, feature store,
cluster sums, slice positions), ``sites`` (PCA, t-SNE, k-means, matching).
"""

from aiva_monai.clustering.features import ClusterMeanAccumulator, FeatureProjector, FeatureStore, slice_positions
from aiva_monai.clustering.settings import (
    MATCH_SPACES,
    PRECISIONS,
    SOURCE_MEANS,
    STORE_DTYPES,
    TSNE_METHODS,
    TSNE_NEIGHBORS,
    ClusteringSettings,
    SiteClustering,
)
from aiva_monai.clustering.sites import cluster_sites, cluster_sketches, kmeans_sites, torch_pca, tsne_input

__all__ = [
    "ClusteringSettings",
    "SiteClustering",
    "FeatureStore",
    "slice_positions",
    "FeatureProjector",
    "ClusterMeanAccumulator",
    "cluster_sketches",
    "cluster_sites",
    "TSNE_METHODS",
    "TSNE_NEIGHBORS",
    "SOURCE_MEANS",
    "STORE_DTYPES",
    "PRECISIONS",
    "MATCH_SPACES",
    "torch_pca",
    "tsne_input",
    "kmeans_sites",
]
