"""Preprocessing: expression (HVG, normalisation, PCA), morphology and horizontal integration."""

from ._embedding_input import read_embedding, use_expression_embedding, use_morphology_features
from ._expression import PCAResult, preprocess_expression, scaled_pca
from ._integrate import (
    IntegrationMethod,
    get_integration,
    integrate,
    list_integrations,
    register_integration,
)
from ._neighbourhoods import (
    build_neighbourhoods,
    detect_layout,
    gather_windows,
    neighbourhood_table,
    window_offsets,
)
from ._spatial_expression import (
    augment_expression,
    neighbourhood_weights,
    normalise_counts,
    spatial_embedding,
    spatial_expression,
)
from ._streaming import preprocess_streaming
from .morphology import (
    fit_stain_normalizer,
    get_extractor,
    list_extractors,
    morphology_embedding,
    morphology_features,
    register_extractor,
)

__all__ = [
    "IntegrationMethod",
    "PCAResult",
    "augment_expression",
    "build_neighbourhoods",
    "detect_layout",
    "fit_stain_normalizer",
    "gather_windows",
    "get_extractor",
    "get_integration",
    "integrate",
    "list_extractors",
    "list_integrations",
    "morphology_embedding",
    "morphology_features",
    "neighbourhood_table",
    "neighbourhood_weights",
    "normalise_counts",
    "preprocess_expression",
    "preprocess_streaming",
    "read_embedding",
    "register_extractor",
    "register_integration",
    "scaled_pca",
    "spatial_embedding",
    "spatial_expression",
    "use_expression_embedding",
    "use_morphology_features",
    "window_offsets",
]
