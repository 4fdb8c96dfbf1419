"""Preprocessing: expression (HVG, normalisation, PCA)."""

from ._expression import PCAResult, preprocess_expression, scaled_pca

__all__ = ["PCAResult", "preprocess_expression", "scaled_pca"]
