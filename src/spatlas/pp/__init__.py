"""Preprocessing: expression (HVG, normalisation, PCA) and horizontal integration."""

from ._expression import PCAResult, preprocess_expression, scaled_pca
from ._integrate import (
    IntegrationMethod,
    get_integration,
    integrate,
    list_integrations,
    register_integration,
)

__all__ = [
    "IntegrationMethod",
    "PCAResult",
    "get_integration",
    "integrate",
    "list_integrations",
    "preprocess_expression",
    "register_integration",
    "scaled_pca",
]
