"""Tools: domains (clustering, automatic K, refinement, morphology fusion) and their biology.

Conserved markers and pathway activity per domain; expression predicted from the H&E image.
"""

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
from ._markers import conserved_markers, top_markers
from ._pathways import domain_pathways, pathway_activity, pathway_matrix, read_network
from ._predict import (
    ExpressionPredictor,
    correlation_summary,
    expression_correlation,
    fit_expression_predictor,
    predict_expression,
)
from ._refine import refine, refine_labels

__all__ = [
    "ExpressionPredictor",
    "canonical_labels",
    "choose_k",
    "cluster",
    "conserved_markers",
    "correlation_summary",
    "domain_pathways",
    "explained_share",
    "expression_correlation",
    "fit_expression_predictor",
    "fuse_embeddings",
    "fuse_morphology",
    "gmm_labels",
    "kmeans_labels",
    "knn_graph",
    "leiden_labels",
    "pathway_activity",
    "pathway_matrix",
    "predict_expression",
    "read_network",
    "refine",
    "refine_labels",
    "top_markers",
]
