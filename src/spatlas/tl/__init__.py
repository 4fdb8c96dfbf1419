"""Tools on embeddings: clustering into domains, automatic K, refinement, morphology fusion."""

from ._cluster import (
    canonical_labels,
    choose_k,
    cluster,
    gmm_labels,
    kmeans_labels,
    knn_graph,
    leiden_labels,
)
from ._fuse import explained_share, fuse_embeddings, fuse_morphology
from ._refine import refine, refine_labels

__all__ = [
    "canonical_labels",
    "choose_k",
    "cluster",
    "explained_share",
    "fuse_embeddings",
    "fuse_morphology",
    "gmm_labels",
    "kmeans_labels",
    "knn_graph",
    "leiden_labels",
    "refine",
    "refine_labels",
]
