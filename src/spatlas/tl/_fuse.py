"""Morphology joins the domain calling only as far as the image sees the expression's domains.

An H&E embedding can sharpen domains (the olfactory bulb's layers are visible in the tissue) or
blur them (a 600 px overview image where a spot is four pixels across carries colour, not
structure). The weight is chosen per cohort without labels: cluster the expression embedding
alone, measure which share ``R²`` of the morphology embedding's within-sample variance those
expression domains explain, and give the image the weight ``R² / 2`` in a joint embedding in
which both modalities have unit total variance. An image that does not see the expression's
domains (``R² ≈ 0``) gets no weight; one that follows them completely counts half as much as
the expression, which stays the primary modality.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger


def _unit_block(X: np.ndarray) -> np.ndarray:
    """Centred ``X`` scaled to total variance 1."""
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(axis=0)
    scale = np.sqrt((X**2).sum() / max(X.shape[0] - 1, 1))
    return X / (scale if scale > 0 else 1.0)


def explained_share(X: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Share of ``X``'s within-group variance explained by ``labels`` within each group (R²)."""
    X = np.asarray(X, dtype=np.float64)
    between = total = 0.0
    for g in np.unique(groups):
        rows = groups == g
        Xg = X[rows] - X[rows].mean(axis=0)
        total += float((Xg**2).sum())
        lab = labels[rows]
        for c in np.unique(lab):
            m = lab == c
            between += m.sum() * float((Xg[m].mean(axis=0) ** 2).sum())
    return between / total if total > 0 else 0.0


def fuse_embeddings(expression: np.ndarray, morphology: np.ndarray, weight: float) -> np.ndarray:
    """``[unit(expression), sqrt(weight) * unit(morphology)]`` (float32; expression at weight 0)."""
    if weight < 0:
        raise SpatlasInputError(f"the morphology weight must be >= 0; got {weight}")
    if weight == 0:
        return np.asarray(expression, dtype=np.float32)
    return np.hstack([_unit_block(expression), _unit_block(morphology) * np.sqrt(weight)]).astype(
        np.float32
    )


def fuse_morphology(
    adata: ad.AnnData,
    *,
    expression_key: str,
    morphology_key: str = K.MORPH_HARMONY,
    weight: float | str = "auto",
    labels: np.ndarray | None = None,
    sample_key: str = K.SAMPLE,
    key_added: str = K.FUSED,
) -> float:
    """Join the morphology embedding to the expression embedding -> ``obsm[key_added]``.

    Parameters
    ----------
    adata
        Cohort with ``obsm[expression_key]``, ``obsm[morphology_key]`` and ``obs[sample_key]``.
    expression_key, morphology_key
        The two embeddings (rows = spots).
    weight
        The image's weight, or ``auto``: ``R² / 2`` with ``R²`` the share of the morphology
        embedding's within-sample variance explained by ``labels`` (see module docstring).
    labels
        Expression-only domains (needed for ``auto``).
    sample_key
        obs column of the samples.
    key_added
        obsm key of the joint embedding.

    Returns
    -------
    The weight used. ``uns['spatlas']['fusion']`` records it (and ``R²``).
    """
    for key in (expression_key, morphology_key):
        if key not in adata.obsm:
            raise SpatlasInputError(f"fuse_morphology: no obsm['{key}']")
    morphology = np.asarray(adata.obsm[morphology_key])
    if not np.isfinite(morphology).all():
        raise SpatlasInputError(f"obsm['{morphology_key}'] holds NaN or infinite values")
    r2 = None
    if weight == "auto":
        if labels is None:
            raise SpatlasInputError("fuse_morphology: weight 'auto' needs expression-only labels")
        groups = adata.obs[sample_key].to_numpy()
        r2 = explained_share(_unit_block(morphology), np.asarray(labels), groups)
        weight = r2 / 2
    elif isinstance(weight, str):
        raise SpatlasInputError(f"the morphology weight must be a number or 'auto'; got {weight!r}")
    weight = float(weight)
    adata.obsm[key_added] = fuse_embeddings(adata.obsm[expression_key], morphology, weight)
    logger.info(
        "morphology joins the domains at weight %.3f%s -> obsm['%s']",
        weight,
        "" if r2 is None else f" (the expression domains explain {r2:.1%} of its variance)",
        key_added,
    )
    adata.uns.setdefault(K.UNS, {})["fusion"] = {
        "expression_key": expression_key,
        "morphology_key": morphology_key,
        "weight": weight,
        "r2": r2,
    }
    return weight
