"""Morphology: spot-centred H&E patches, stain normalisation, feature extractors, embedding.

Nothing here imports torch, torchvision or timm until a network extractor is built.
"""

from ._api import morphology_embedding, morphology_features, standardized_pca
from ._extractors import (
    Extractor,
    ExtractorSpec,
    HandcraftedExtractor,
    TorchExtractor,
    get_extractor,
    list_extractors,
    read_state_dict,
    register_extractor,
)
from ._patches import (
    OpenImage,
    SlideImage,
    SpotPatches,
    gather_windows,
    resize_patches,
    slide_images,
    window_starts,
)
from ._stain import (
    STAIN_METHODS,
    StainNormalizer,
    background_colour,
    fit_stain_normalizer,
    tissue_mask,
)

__all__ = [
    "STAIN_METHODS",
    "Extractor",
    "ExtractorSpec",
    "HandcraftedExtractor",
    "OpenImage",
    "SlideImage",
    "SpotPatches",
    "StainNormalizer",
    "TorchExtractor",
    "background_colour",
    "fit_stain_normalizer",
    "gather_windows",
    "get_extractor",
    "list_extractors",
    "morphology_embedding",
    "morphology_features",
    "read_state_dict",
    "register_extractor",
    "resize_patches",
    "slide_images",
    "standardized_pca",
    "tissue_mask",
    "window_starts",
]
