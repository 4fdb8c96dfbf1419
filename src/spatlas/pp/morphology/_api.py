"""AnnData layer of the morphology step: features per spot, then a corrected embedding."""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np

from ... import _keys as K
from ..._errors import SpatlasInputError
from ..._logging import logger
from ..._progress import progress
from ._extractors import RANDOM_WEIGHTS, get_extractor
from ._patches import SpotPatches
from ._stain import STAIN_METHODS, fit_stain_normalizer


def morphology_features(
    adata: ad.AnnData,
    *,
    extractor: str = "handcrafted",
    weights: str | Path | None = None,
    extractor_params: dict | None = None,
    image: str = "auto",
    patch_scale: float = 1.0,
    pad: str = "constant",
    stain_norm: str | None = None,
    reference: str | Path | np.ndarray | None = None,
    batch_size: int = 64,
    device: str = "auto",
    sample_key: str = K.SAMPLE,
    seed: int = 0,
    key_added: str = K.MORPH_FEATURES,
) -> str:
    """Morphology features of every spot from a patch of its H&E image (MISSION §2.2).

    Each spot's patch is centred on it, ``patch_scale`` spot diameters
    (``spot_diameter_fullres``) wide, cut from the sample's full-resolution image when
    ``uns['spatial'][sample]['metadata']['fullres_image_path']`` names one, else from its
    hires or lowres image with the matching scalefactor. Patches are extracted in batches
    (each slide opened once), optionally stain-normalised to one reference shared by all
    slides, resampled to the extractor's input size and encoded.

    Parameters
    ----------
    adata
        Cohort with ``obsm['spatial']`` (full-resolution pixels) and ``uns['spatial']``.
    extractor
        ``handcrafted`` (no weights), ``inception_v3``, ``uni2h`` or ``timm:<arch>``;
        see :func:`list_extractors`.
    weights
        Local weights of a network extractor (file or directory), or ``'random'``.
    extractor_params
        Extra options of the extractor (e.g. ``{'size': 64}`` for handcrafted,
        ``{'model_kwargs': {...}}`` for timm ones).
    image
        ``auto`` (full-res, else hires, else lowres), ``fullres``, ``hires`` or ``lowres``.
    patch_scale
        Patch side as a multiple of the spot diameter.
    pad
        Border spots: ``constant`` (white, looks like glass and is masked as background) or
        ``reflect`` (mirrored tissue).
    stain_norm
        ``None``, ``macenko`` or ``reinhard``.
    reference
        Stain reference: ``None`` (tissue pixels pooled equally from all slides of the cohort),
        an image path or an (H, W, 3) array.
    batch_size
        Patches per batch (extraction and inference).
    device
        ``cpu``, ``cuda`` or ``auto``.
    sample_key
        obs column naming each spot's sample.
    seed
        Seed of pixel sampling (stain fit) and of random weights.
    key_added
        obsm key of the features.

    Returns
    -------
    The obsm key written. Writes ``obsm[key_added]`` (float32, n_spots x out_dim) and
    ``uns['spatlas']['morphology'][key_added]``: extractor, weights, stain normalisation (with
    the fitted statistics), feature names (handcrafted), and per sample the image used, its
    scale, the window side and the effective pixels per spot diameter.
    """
    if stain_norm is not None and stain_norm not in STAIN_METHODS:
        raise SpatlasInputError(
            f"stain_norm must be one of {', '.join(STAIN_METHODS)} or None (got {stain_norm!r})"
        )
    start = time.perf_counter()
    encoder = get_extractor(
        extractor,
        weights=weights,
        device=device,
        batch_size=batch_size,
        seed=seed,
        **(extractor_params or {}),
    )
    patches = SpotPatches.from_adata(
        adata, image=image, sample_key=sample_key, patch_scale=patch_scale, pad=pad
    )
    if getattr(encoder, "size_from_patches", False):
        # no point in upsampling beyond the largest native window (lowres images)
        encoder.input_size = int(np.clip(max(patches.sides.values()), *encoder.size_range))
    patches.out_size = encoder.input_size
    normalizer = None
    if stain_norm is not None:
        normalizer = fit_stain_normalizer(
            patches, method=stain_norm, reference=reference, seed=seed
        )
        patches.transform = normalizer.transform
    features = np.empty((adata.n_obs, encoder.out_dim), dtype=np.float32)
    counts = np.unique(patches.samples, return_counts=True)[1]
    n_batches = int(np.ceil(counts / batch_size).sum())
    for idx, batch in progress(
        patches.batches(batch_size), desc=f"morphology ({extractor})", total=n_batches
    ):
        features[idx] = encoder(batch)
    if not np.isfinite(features).all():
        raise SpatlasInputError(
            f"extractor '{extractor}' produced NaN/infinite features; check its weights"
        )
    adata.obsm[key_added] = features
    seconds = time.perf_counter() - start
    per_sample = {
        sample: {
            "image": slide.kind,
            "source": slide.describe(),
            "scale": slide.scale,
            "window_px": int(patches.sides[sample]),
            "pixels_per_spot": float(patches.pixels_per_spot[sample]),
        }
        for sample, slide in patches.images.items()
    }
    meta = {
        "extractor": extractor,
        "weights": "" if weights is None else str(weights),
        "input_size": int(encoder.input_size),
        "out_dim": int(encoder.out_dim),
        "patch_scale": float(patch_scale),
        "pad": pad,
        "stain_norm": stain_norm or "",
        "stain_reference": (
            "cohort"
            if reference is None
            else ("array" if isinstance(reference, np.ndarray) else str(reference))
        ),
        "stain": normalizer.as_dict() if normalizer is not None else {},
        "feature_names": list(encoder.feature_names or []),
        "samples": per_sample,
        "seed": seed,
        "seconds": seconds,
    }
    adata.uns.setdefault(K.UNS, {}).setdefault(K.MORPHOLOGY, {})[key_added] = meta
    logger.info(
        "morphology: %s%s features (%d-d) of %d spots from %d samples%s -> obsm['%s'] in %.1f s "
        "(%.0f patches/s)",
        extractor,
        " (random weights)" if weights == RANDOM_WEIGHTS else "",
        encoder.out_dim,
        adata.n_obs,
        len(patches.images),
        f", {stain_norm} stain normalisation" if stain_norm else "",
        key_added,
        seconds,
        adata.n_obs / max(seconds, 1e-9),
    )
    return key_added


def standardized_pca(
    X: np.ndarray, *, n_comps: int = 20, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the z-scored columns of a dense (n, d) matrix.

    By eigendecomposition of the columns' correlation matrix (d x d, accumulated in chunks:
    memory linear in n, deterministic).

    Constant columns contribute nothing. Signs are fixed so that each component's
    largest-magnitude loading is positive.

    Returns
    -------
    ``(scores (n, k) float32, loadings (d, k), variance_ratio (k,))``.
    """
    X = np.asarray(X)
    n, d = X.shape
    if n < 2:
        raise SpatlasInputError("morphology PCA needs at least 2 spots")
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, ddof=1, dtype=np.float64)
    keep = std > 1e-12 * np.maximum(np.abs(mean), 1.0)
    inv = np.where(keep, 1.0 / np.where(keep, std, 1.0), 0.0)
    cov = np.zeros((d, d))
    for start in range(0, n, chunk):
        Z = (X[start : start + chunk].astype(np.float64) - mean) * inv
        cov += Z.T @ Z
    cov /= n - 1
    k = min(n_comps, int(keep.sum()), n - 1)
    if k < n_comps:
        logger.info("morphology PCA: %d components (asked %d; features/spots limit it)", k, n_comps)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    vectors *= np.where(signs == 0, 1.0, signs)
    scores = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        Z = (X[start : start + chunk].astype(np.float64) - mean) * inv
        scores[start : start + chunk] = Z @ vectors
    total = float(np.trace(cov)) or 1.0
    return scores, vectors, values / total


def morphology_embedding(
    adata: ad.AnnData,
    *,
    features_key: str = K.MORPH_FEATURES,
    n_comps: int = 20,
    method: str = "harmony",
    batch_key: str = K.SAMPLE,
    seed: int = 0,
    key_added: str = K.MORPH_PCA,
    integrated_key: str | None = None,
    **params,
) -> str:
    """PCA of the pooled, standardised morphology features, then batch correction.

    Features of all samples are z-scored per feature and reduced to ``n_comps`` principal
    components (paper: 20), which are corrected for ``batch_key`` with an integration method
    (paper: Harmony with the sample as covariate) through :func:`spatlas.pp.integrate`.

    Parameters
    ----------
    adata
        Cohort with ``obsm[features_key]`` (from :func:`morphology_features`).
    features_key
        obsm key of the raw features.
    n_comps
        Number of principal components.
    method
        Integration method (``harmony``, ``scanorama``, ``none``; see
        :func:`spatlas.pp.list_integrations`).
    batch_key
        obs column of the batch.
    seed
        Seed of the integration.
    key_added
        obsm key of the PCA scores.
    integrated_key
        obsm key of the corrected embedding; default ``X_morph_<method>`` (``X_morph_harmony``).
    **params
        Integration parameters (e.g. ``theta``).

    Returns
    -------
    The obsm key of the corrected embedding. Writes ``obsm[key_added]`` (float32),
    ``obsm[integrated_key]`` (float32) and ``uns['spatlas']['morphology']['embedding']``
    (features key, components, variance ratio); the integration records itself under
    ``uns['spatlas']['integration']``.
    """
    from .._integrate import get_integration, integrate

    if features_key not in adata.obsm:
        raise SpatlasInputError(
            f"obsm['{features_key}'] is missing; run spatlas.pp.morphology_features first"
        )
    spec = get_integration(method)
    if spec.reads_counts:
        raise SpatlasInputError(
            f"integration method '{method}' reads expression counts; morphology needs one that "
            "corrects an embedding (harmony, scanorama, none)"
        )
    X = np.asarray(adata.obsm[features_key], dtype=np.float32)
    if not np.isfinite(X).all():
        raise SpatlasInputError(f"obsm['{features_key}'] has NaN or infinite values")
    scores, _, ratio = standardized_pca(X, n_comps=n_comps)
    adata.obsm[key_added] = scores
    adata.uns.setdefault(K.UNS, {}).setdefault(K.MORPHOLOGY, {})["embedding"] = {
        "features_key": features_key,
        "n_comps": int(scores.shape[1]),
        "variance_ratio": ratio.astype(np.float64),
        "method": method,
    }
    logger.info(
        "morphology PCA: %d components explain %.0f %% of the standardised feature variance",
        scores.shape[1],
        100 * ratio.sum(),
    )
    integrated_key = integrated_key or f"X_morph_{method}"
    return integrate(
        adata,
        basis=key_added,
        batch_key=batch_key,
        method=method,
        key_added=integrated_key,
        seed=seed,
        **params,
    )
