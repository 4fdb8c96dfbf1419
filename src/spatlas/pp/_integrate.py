"""Horizontal integration: batch correction of one embedding into another (MISSION §2.3).

Every method reads ``obsm[basis]`` (scVI reads the HVG raw counts instead) and writes
``obsm[key_added]``. Methods live in a registry so the pipeline and the tuner pick them by name::

    spatlas.pp.integrate(adata, basis="X_pca", method="harmony", theta=2)  # -> X_pca_harmony
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .. import _keys as K
from .._deps import import_optional
from .._errors import SpatlasInputError
from .._logging import logger

# fn(X, batch_codes, adata, seed, **params) -> corrected (n, d) array
IntegrationFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class IntegrationMethod:
    """A registered integration method.

    Attributes
    ----------
    name
        Registry name (``harmony``, ``scanorama``, ``scvi``, ``none``).
    fn
        ``fn(X, batch, adata, *, seed, **params) -> np.ndarray``; ``batch`` are integer codes.
    defaults
        Default parameters (every accepted parameter is listed here).
    grid
        The paper's search grid (Table 1) for the tuner.
    reads_counts
        True when the method ignores ``basis`` and reads the HVG raw counts.
    """

    name: str
    fn: IntegrationFn
    defaults: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    reads_counts: bool = False


_METHODS: dict[str, IntegrationMethod] = {}


def register_integration(
    name: str, *, grid: dict | None = None, reads_counts: bool = False
) -> Callable[[IntegrationFn], IntegrationFn]:
    """Register ``fn`` as integration method ``name``; its keyword defaults are its parameters."""

    def decorator(fn: IntegrationFn) -> IntegrationFn:
        sig = inspect.signature(fn)
        defaults = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "seed"
        }
        _METHODS[name] = IntegrationMethod(name, fn, defaults, dict(grid or {}), reads_counts)
        return fn

    return decorator


def list_integrations() -> list[str]:
    """Names of the registered integration methods."""
    return sorted(_METHODS)


def get_integration(name: str) -> IntegrationMethod:
    """The registered method ``name`` (clear error listing the known ones)."""
    if name not in _METHODS:
        raise SpatlasInputError(
            f"unknown integration method '{name}' (known: {', '.join(list_integrations())})"
        )
    return _METHODS[name]


@register_integration("none")
def _none(X: np.ndarray, batch: np.ndarray, adata: ad.AnnData, *, seed: int) -> np.ndarray:
    return X.copy()


@register_integration("harmony", grid={"theta": [0, 0.5, 1, 2, 4, 6, 8]})
def _harmony(
    X: np.ndarray,
    batch: np.ndarray,
    adata: ad.AnnData,
    *,
    seed: int,
    theta: float = 2.0,
    sigma: float = 0.1,
    nclust: int | None = None,
    max_iter_harmony: int = 10,
) -> np.ndarray:
    harmonypy = import_optional("harmonypy", purpose="integration method 'harmony'")
    meta = pd.DataFrame({"batch": batch.astype(str)})
    result = harmonypy.run_harmony(
        X.astype(np.float64),
        meta,
        "batch",
        theta=theta,
        sigma=sigma,
        nclust=nclust,
        max_iter_harmony=max_iter_harmony,
        random_state=seed,
        verbose=False,
    )
    Z = np.asarray(result.Z_corr)
    return Z if Z.shape[0] == X.shape[0] else Z.T


@register_integration("scanorama", grid={"sigma": [10, 15, 20, 25]})
def _scanorama(
    X: np.ndarray,
    batch: np.ndarray,
    adata: ad.AnnData,
    *,
    seed: int,
    sigma: float = 15.0,
    knn: int = 20,
    alpha: float = 0.1,
    approx: bool = True,
    batch_size: int = 5000,
) -> np.ndarray:
    import random

    scanorama = import_optional("scanorama", purpose="integration method 'scanorama'")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (scanorama draws from the global generators)
    parts = [np.ascontiguousarray(X[batch == b], dtype=np.float64) for b in np.unique(batch)]
    corrected = scanorama.assemble(
        parts,
        knn=knn,
        sigma=sigma,
        approx=approx,
        alpha=alpha,
        batch_size=batch_size,
        verbose=False,
    )
    out = np.empty_like(X, dtype=np.float64)
    for b, part in zip(np.unique(batch), corrected, strict=True):
        out[batch == b] = part
    return out


@register_integration("scvi", grid={"n_layers": [1, 2, 3, 4]}, reads_counts=True)
def _scvi(
    X: np.ndarray,
    batch: np.ndarray,
    adata: ad.AnnData,
    *,
    seed: int,
    n_layers: int = 1,
    n_latent: int = 10,
    n_hidden: int = 128,
    max_epochs: int | None = None,
    batch_size: int = 128,
    accelerator: str = "auto",
) -> np.ndarray:
    scvi = import_optional("scvi", purpose="integration method 'scvi'")
    import torch

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep Lightning's banners out of logs

    if K.COUNTS not in adata.layers:
        raise SpatlasInputError(
            "integration method 'scvi' needs raw counts in layers['counts']; run "
            "spatlas.pp.preprocess_expression first"
        )
    genes = adata.var[K.HVG].to_numpy() if K.HVG in adata.var else slice(None)
    sub = ad.AnnData(
        X=adata.layers[K.COUNTS][:, genes].astype(np.float32),
        obs=pd.DataFrame({"batch": pd.Categorical(batch.astype(str))}, index=adata.obs_names),
    )
    scvi.settings.seed = seed
    torch.use_deterministic_algorithms(True, warn_only=True)
    scvi.model.SCVI.setup_anndata(sub, batch_key="batch")
    model = scvi.model.SCVI(sub, n_layers=n_layers, n_latent=n_latent, n_hidden=n_hidden)
    if max_epochs is None:  # scvi-tools' own heuristic, capped for CPUs
        max_epochs = int(min(round((20000 / max(sub.n_obs, 1)) * 400), 400))
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        accelerator=accelerator,
        enable_progress_bar=logger.isEnabledFor(logging.INFO),
        early_stopping=False,
        enable_model_summary=False,
    )
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def integrate(
    adata: ad.AnnData,
    *,
    basis: str = K.PCA,
    batch_key: str = K.SAMPLE,
    method: str = "harmony",
    key_added: str | None = None,
    seed: int = 0,
    **params,
) -> str:
    """Correct the embedding ``obsm[basis]`` for ``batch_key`` with ``method``.

    Parameters
    ----------
    adata
        Cohort; for ``scvi``, preprocessed by :func:`spatlas.pp.preprocess_expression`
        (raw counts in ``layers['counts']``, HVGs in ``var['highly_variable']``).
    basis
        obsm key of the embedding to correct (ignored by ``scvi``, which reads counts).
    batch_key
        obs column holding the batch (sample or donor).
    method
        A registered method: see :func:`list_integrations`.
    key_added
        obsm key of the result; default ``{basis}_{method}`` (``X_pca_harmony``), or
        ``X_scvi`` for scVI.
    seed
        Seed for every random choice of the method.
    **params
        Method parameters, e.g. ``theta`` (harmony), ``sigma`` (scanorama), ``n_layers`` (scvi).

    Returns
    -------
    The obsm key written. Writes ``obsm[key_added]`` (float32, same width as ``basis`` except for
    scVI, whose width is ``n_latent``) and ``uns['spatlas']['integration'][key_added]``
    (method, basis, batch key, parameters, seconds).
    """
    spec = get_integration(method)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise SpatlasInputError(
            f"integration method '{method}' has no parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(spec.defaults) or 'none'})"
        )
    if batch_key not in adata.obs:
        raise SpatlasInputError(
            f"batch_key '{batch_key}' is not an obs column (columns: {', '.join(adata.obs)})"
        )
    if not spec.reads_counts and basis not in adata.obsm:
        raise SpatlasInputError(
            f"basis '{basis}' is not in obsm (available: {', '.join(adata.obsm) or 'none'})"
        )
    if key_added is None:
        key_added = K.embedding_key("scvi") if spec.reads_counts else f"{basis}_{method}"
    X = (
        np.asarray(adata.obsm[basis], dtype=np.float64)
        if basis in adata.obsm
        else np.empty((adata.n_obs, 0))
    )
    if X.size and not np.isfinite(X).all():
        raise SpatlasInputError(f"obsm['{basis}'] has NaN or infinite values")
    batch = pd.Categorical(adata.obs[batch_key]).codes.astype(np.int64)
    n_batches = len(np.unique(batch))
    start = time.perf_counter()
    if n_batches < 2 and not spec.reads_counts and method != "none":
        logger.info("integrate: one batch only, %s leaves obsm['%s'] unchanged", method, basis)
        corrected = X.copy()
    else:
        corrected = spec.fn(X, batch, adata, seed=seed, **params)
    seconds = time.perf_counter() - start
    adata.obsm[key_added] = np.asarray(corrected, dtype=np.float32)
    used = {**spec.defaults, **params}
    adata.uns.setdefault(K.UNS, {}).setdefault("integration", {})[key_added] = {
        "method": method,
        "basis": basis,
        "batch_key": batch_key,
        "seed": seed,
        "seconds": seconds,
        "params": {k: ("" if v is None else v) for k, v in used.items()},
    }
    logger.info(
        "integrate: %s on obsm['%s'] by '%s' (%d batches) -> obsm['%s'] in %.1f s",
        method,
        basis,
        batch_key,
        n_batches,
        key_added,
        seconds,
    )
    return key_added
