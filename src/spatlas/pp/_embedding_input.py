"""Embeddings the user already trusts as the expression basis or the morphology features.

An expression embedding of a foundation model (CancerFoundation, scGPT, Geneformer, ...) stored
in the ``.h5ad`` or next to it can replace the expression PCs that augmentation, integration and
the fusion model read; precomputed per-spot image features (e.g. UNI2-h vectors) can replace the
patch features that :func:`spatlas.pp.morphology_features` extracts from the H&E image::

    spatlas.pp.use_expression_embedding(adata, "X_scgpt")  # -> obsm['X_input']
    spatlas.pp.use_morphology_features(adata, "uni2h.parquet")  # -> obsm['X_morph_features']
    spatlas.pp.morphology_embedding(adata)  # PCA + Harmony, as on extracted features

A source is an ``obsm`` key of ``adata`` or a file: ``.npy`` (one row per spot, in the order of
``adata``), or ``.csv`` / ``.tsv`` / ``.parquet`` whose first column (or index) holds the spot ids
(``adata.obs_names``; the ``barcode`` column is accepted too when it is unique), reordered to
``adata``.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys as K
from .._config import EMBEDDING_SUFFIXES  # what read_embedding reads; the rest are obsm keys
from .._errors import SpatlasInputError
from .._logging import logger


def is_embedding_file(source: str | Path) -> bool:
    """Whether ``source`` names a file :func:`read_embedding` reads (by its suffix)."""
    return Path(str(source)).suffix.lower() in EMBEDDING_SUFFIXES


def _names(values, n: int = 3) -> str:
    values = list(values)
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(str(v) for v in values[:n]) + more


def _read_table(path: Path, prefix: str) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
            if isinstance(table.index, pd.RangeIndex):  # ids in the first column, not the index
                table = table.set_index(table.columns[0])
        else:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pd.read_csv(path, sep=sep, index_col=0)
    except Exception as err:  # pandas / pyarrow raise many types for a bad file
        raise SpatlasInputError(f"{prefix}{path} is not a readable table ({err})") from None
    table.index = table.index.astype(str)
    text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if text:
        raise SpatlasInputError(
            f"{prefix}{path} has non-numeric columns ({_names(text)}); the first column holds "
            "the spot ids and every other column one embedding dimension"
        )
    return table


def _align(table: pd.DataFrame, adata: ad.AnnData, path: Path, prefix: str) -> np.ndarray:
    """Rows of ``table`` in the order of ``adata`` (by ``obs_names``, else by unique barcodes)."""
    dup = table.index[table.index.duplicated()].unique()
    if len(dup):
        raise SpatlasInputError(
            f"{prefix}{path} lists {len(dup)} spot ids more than once ({_names(dup)}); "
            "keep one row per spot"
        )
    ids = adata.obs_names.astype(str)
    missing = ids[~ids.isin(table.index)]
    if len(missing) and K.BARCODE in adata.obs:
        barcodes = pd.Index(adata.obs[K.BARCODE].astype(str))
        if barcodes.is_unique and barcodes.isin(table.index).all():
            logger.info("%s%s matched to the spots by their barcodes", prefix, path)
            ids, missing = barcodes, barcodes[:0]
    if len(missing):
        raise SpatlasInputError(
            f"{prefix}{len(missing)} of {adata.n_obs} spots have no row in {path} "
            f"({_names(missing)}); its first column must hold the spot ids (obs_names, e.g. "
            f"{_names(adata.obs_names[:2], 2)})"
        )
    if len(table) > len(ids):
        logger.info(
            "%s%d rows of %s name no spot of the cohort (ignored)",
            prefix,
            len(table) - len(ids),
            path,
        )
    return table.loc[ids].to_numpy()


def read_embedding(adata: ad.AnnData, source: str | Path, *, where: str = "") -> np.ndarray:
    """A per-spot embedding from an ``obsm`` key of ``adata`` or a file, checked.

    Parameters
    ----------
    adata
        The cohort the embedding describes (its spots and their order).
    source
        An ``obsm`` key, or a ``.npy`` file with one row per spot in the order of ``adata``, or a
        ``.csv`` / ``.tsv`` / ``.parquet`` table whose first column (or index) holds the spot ids
        (``adata.obs_names``, or ``obs['barcode']`` when those are unique); its rows are put in
        the order of ``adata`` and rows of other spots are ignored.
    where
        What the source is for, e.g. ``data.expression_embedding`` (starts every error message).

    Returns
    -------
    The embedding, float32 ``(n_spots, n_dims)``.

    Raises
    ------
    SpatlasInputError
        The key or file is missing; the values are not a numeric 2-D matrix with at least one
        column and one row per spot; a spot has no row in the table; a value is NaN or infinite.
    """
    prefix = f"{where}: " if where else ""
    path = Path(str(source)).expanduser()
    if str(source) in adata.obsm:
        value = adata.obsm[str(source)]
        what = f"obsm['{source}']"
        if isinstance(value, pd.DataFrame):
            text = [c for c in value.columns if not pd.api.types.is_numeric_dtype(value[c])]
            if text:
                raise SpatlasInputError(
                    f"{prefix}{what} has non-numeric columns ({_names(text)}); keep only the "
                    "embedding's dimensions"
                )
            value = value.to_numpy()
    elif is_embedding_file(path) or path.is_file():
        what = str(path)
        if not path.is_file():
            raise SpatlasInputError(f"{prefix}{path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                value = np.load(path, allow_pickle=False)
            except Exception as err:  # a bad or pickled .npy
                raise SpatlasInputError(f"{prefix}{path} is not a readable .npy ({err})") from None
        elif suffix in EMBEDDING_SUFFIXES:
            value = _align(_read_table(path, prefix), adata, path, prefix)
        else:
            raise SpatlasInputError(
                f"{prefix}{path} is not a supported embedding file; use "
                f"{', '.join(EMBEDDING_SUFFIXES)} or an obsm key"
            )
    else:
        raise SpatlasInputError(
            f"{prefix}'{source}' is neither an obsm key of the cohort (obsm: "
            f"{', '.join(adata.obsm) or 'none'}) nor a file; a path to "
            f"{'/'.join(EMBEDDING_SUFFIXES)} works too"
        )
    if sp.issparse(value):
        value = value.toarray()
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
        raise SpatlasInputError(
            f"{prefix}{what} holds {value.dtype} values, not numbers; give a numeric matrix"
        )
    if value.ndim != 2:
        raise SpatlasInputError(
            f"{prefix}{what} has shape {value.shape}, expected (n_spots, n_dims)"
        )
    if value.shape[0] != adata.n_obs:
        raise SpatlasInputError(
            f"{prefix}{what} has {value.shape[0]} rows but the cohort has {adata.n_obs} spots; "
            "a .npy needs one row per spot in the cohort's order (a table keyed by spot id is "
            "reordered for you)"
        )
    if value.shape[1] == 0:
        raise SpatlasInputError(f"{prefix}{what} has no columns; give at least one dimension")
    X = value.astype(np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise SpatlasInputError(
            f"{prefix}{what} has NaN or infinite values in {int(bad.sum())} spots (first: "
            f"{adata.obs_names[int(np.argmax(bad))]}); fill or drop them before the run"
        )
    return X


def use_expression_embedding(
    adata: ad.AnnData,
    source: str | Path,
    *,
    n_comps: int | None = None,
    seed: int = 0,
    key_added: str = K.EXPRESSION_INPUT,
) -> str:
    """A precomputed expression embedding as the expression basis -> ``obsm[key_added]``.

    What :func:`spatlas.pp.integrate` (``basis=key_added``), :func:`spatlas.pp.spatial_embedding`
    and the fusion models then read instead of the expression PCs.

    Parameters
    ----------
    adata
        The cohort.
    source
        ``obsm`` key or file of the embedding (see :func:`read_embedding`).
    n_comps
        Reduce to this many principal components (centred; randomised SVD with ``seed``) when the
        embedding has more columns; ``None`` keeps every column.
    seed
        Seed of the randomised SVD.
    key_added
        obsm key of the basis.

    Returns
    -------
    The obsm key written. Writes ``obsm[key_added]`` (float32) and
    ``uns['spatlas']['expression_input']``: source, dims (the embedding's columns), n_comps (the
    basis' columns), key.
    """
    from ._spatial_expression import dense_pca

    if n_comps is not None and n_comps < 1:
        raise SpatlasInputError(f"n_comps must be at least 1 or None; got {n_comps}")
    X = read_embedding(adata, source, where="expression embedding")
    dims = X.shape[1]
    if n_comps is not None and dims > n_comps:
        X = dense_pca(X, n_comps=min(n_comps, adata.n_obs - 1), seed=seed)
    adata.obsm[key_added] = X
    adata.uns.setdefault(K.UNS, {})[K.EXPRESSION_INPUT_UNS] = {
        "source": str(source),
        "dims": int(dims),
        "n_comps": int(X.shape[1]),
        "key": key_added,
        "seed": seed,
    }
    logger.info(
        "expression embedding %s (%d-d%s) of %d spots -> obsm['%s']",
        source,
        dims,
        f", {X.shape[1]} PCs" if X.shape[1] < dims else "",
        adata.n_obs,
        key_added,
    )
    return key_added


def use_morphology_features(
    adata: ad.AnnData, source: str | Path, *, key_added: str = K.MORPH_FEATURES
) -> str:
    """Precomputed per-spot image features as the morphology features (no image is read).

    :func:`spatlas.pp.morphology_embedding` then reduces and corrects them as it does features
    from :func:`spatlas.pp.morphology_features`.

    Parameters
    ----------
    adata
        The cohort.
    source
        ``obsm`` key or file of the features (see :func:`read_embedding`), e.g. UNI2-h vectors.
    key_added
        obsm key of the features.

    Returns
    -------
    The obsm key written. Writes ``obsm[key_added]`` (float32, n_spots x n_features) and
    ``uns['spatlas']['morphology'][key_added]`` with the fields
    :func:`~spatlas.pp.morphology_features` writes (extractor ``precomputed``, ``source``,
    ``out_dim``; no images, stain statistics or feature names).
    """
    start = time.perf_counter()
    X = read_embedding(adata, source, where="morphology features")
    adata.obsm[key_added] = X
    meta = {
        "extractor": "precomputed",
        "source": str(source),
        "weights": "",
        "input_size": 0,
        "out_dim": int(X.shape[1]),
        "patch_scale": 0.0,
        "pad": "",
        "stain_norm": "",
        "stain_reference": "",
        "stain": {},
        "feature_names": [],
        "samples": {},
        "seed": 0,
        "seconds": time.perf_counter() - start,
    }
    adata.uns.setdefault(K.UNS, {}).setdefault(K.MORPHOLOGY, {})[key_added] = meta
    logger.info(
        "morphology: precomputed features %s (%d-d) of %d spots -> obsm['%s']",
        source,
        X.shape[1],
        adata.n_obs,
        key_added,
    )
    return key_added
