"""Reading ``.h5ad`` inputs (one sample, or a cohort split by an obs column)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys as K
from .._errors import SpatlasInputError
from ._images import check_fullres_image
from ._spaceranger import set_sample_donor
from ._validate import (
    check_coordinates_in_image,
    check_counts,
    check_one_section,
    check_scalefactors,
    check_spot_ids,
    check_unique,
    reading,
)

_H5AD_FIX = (
    "spatlas needs raw counts in X (or counts_layer), spot centres in obsm['spatial'] and "
    "images / scalefactors in uns['spatial'] as scanpy writes them"
)
# how to give a multi-section file, ending the "holds several sections" line
SPLIT_HINT = (
    "give it as data.h5ad with data.sample_key: {column} in the config "
    "(Python: read_h5ad(path, sample_key='{column}'))"
)


def _load(path: Path, *, backed: bool = False) -> ad.AnnData:
    if not path.exists():
        raise SpatlasInputError(f"{path}: file does not exist")
    try:
        with warnings.catch_warnings():  # repeated names are reported as one line, below
            warnings.filterwarnings(
                "ignore", message=".* names are not unique", category=UserWarning
            )
            return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py / anndata raise many types for a bad file
        raise SpatlasInputError(
            f"{path}: not a readable .h5ad file ({' '.join(str(err).split())}); copy it again, or "
            "write it again with adata.write_h5ad"
        ) from None


def standardise_h5ad_sample(
    adata: ad.AnnData,
    *,
    sample: str,
    donor: str | None = None,
    counts_layer: str | None = None,
    fullres_image: str | Path | None = None,
    where: str = "",
    split_keys: tuple[str, ...] = (),
) -> ad.AnnData:
    """Bring one sample's AnnData to spatlas' layout, checking it on the way.

    Raw counts move to ``X`` (float32 CSR) from ``X`` or ``layers[counts_layer]``;
    ``obsm['spatial']`` must hold (x, y) spot centres in full-resolution pixels;
    ``obs['array_row'/'array_col']`` and the other 2-D ``obsm`` entries (embeddings) are kept;
    ``uns['spatial']`` is re-keyed to ``sample``.

    Spot ids and gene ids must be unique, scale factors positive numbers, coordinates finite,
    and the table must hold one section (see :func:`~spatlas.io._validate.check_one_section`;
    ``split_keys`` are the obs columns it was already split by).
    """
    where = where or sample
    problems = check_spot_ids(adata.obs_names, where=where)
    problems += check_unique(
        adata.var_names,
        what="gene id",
        where=where,
        units="columns",
        fix="genes are matched across samples by id: make var_names unique (Ensembl ids, or "
        "adata.var_names_make_unique()) and save the file again",
    )
    if problems:
        raise SpatlasInputError(problems)
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise SpatlasInputError(
                f"{where}: counts_layer '{counts_layer}' is not among the layers "
                f"({', '.join(adata.layers) or 'none'})"
            )
        X = adata.layers[counts_layer]
    else:
        X = adata.X
    if X is None:
        raise SpatlasInputError(f"{where}: the AnnData has no X matrix")
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr()
    problems.extend(check_counts(X, where=where))
    if adata.n_obs == 0 or adata.n_vars == 0:
        problems.append(f"{where}: sample is empty ({adata.n_obs} spots x {adata.n_vars} genes)")
    if K.SPATIAL not in adata.obsm:
        problems.append(
            f"{where}: obsm['spatial'] is missing; spatlas needs each spot's (x, y) centre in "
            "full-resolution pixels there"
        )
    if problems:
        raise SpatlasInputError(problems)

    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise SpatlasInputError(f"{where}: obsm['spatial'] has shape {xy.shape}, expected (n, 2)")
    finite = np.isfinite(xy).all(axis=1)
    if not finite.all():
        raise SpatlasInputError(
            f"{where}: {int((~finite).sum())} spots have NaN or infinite coordinates in "
            f"obsm['spatial'] (e.g. {adata.obs_names[np.flatnonzero(~finite)[0]]}); drop them or "
            "fix their coordinates"
        )
    problems += check_one_section(adata.obs, xy, where=where, hint=SPLIT_HINT, exclude=split_keys)
    if problems:
        raise SpatlasInputError(problems)
    out = ad.AnnData(
        X=X.astype(np.float32, copy=False),
        obs=adata.obs.copy(),
        var=adata.var.copy(),
    )
    out.obsm[K.SPATIAL] = xy
    for key, value in adata.obsm.items():  # embeddings (X_scgpt, ...) travel with their spots
        if key != K.SPATIAL and len(getattr(value, "shape", ())) == 2:
            out.obsm[key] = value
    out.obs[K.BARCODE] = adata.obs_names.astype(str)
    old = adata.uns.get(K.SPATIAL, {})
    info = dict(old[next(iter(old))]) if isinstance(old, dict) and len(old) == 1 else {}
    info.setdefault(K.IMAGES, {})
    info.setdefault(K.SCALEFACTORS, {})
    problems += check_scalefactors(
        dict(info[K.SCALEFACTORS]),
        where=f"{where} uns['spatial'] scalefactors",
        fix="copy them from the sample's scalefactors_json.json",
    )
    if problems:
        raise SpatlasInputError(problems)
    info[K.METADATA] = dict(info.get(K.METADATA, {}))
    info[K.METADATA][K.FULLRES_PATH] = str(Path(fullres_image).resolve()) if fullres_image else ""
    for res, img in info[K.IMAGES].items():
        scalef = info[K.SCALEFACTORS].get(f"tissue_{res}_scalef")
        if scalef is not None:
            problems.extend(
                check_coordinates_in_image(
                    xy * scalef, np.asarray(img).shape[:2], what=f"the {res} image", where=where
                )
            )
    if fullres_image is not None:
        problems.extend(check_fullres_image(fullres_image, xy, where=where))
    if problems:
        raise SpatlasInputError(problems)
    out.uns[K.SPATIAL] = {sample: info}
    set_sample_donor(out, sample=sample, donor=donor)
    return out


def read_h5ad(
    path: str | Path,
    *,
    sample: str | None = None,
    donor: str | None = None,
    sample_key: str | None = None,
    donor_key: str | None = None,
    counts_layer: str | None = None,
    fullres_image: str | Path | None = None,
    counts: bool = True,
) -> ad.AnnData | list[ad.AnnData]:
    """Read an ``.h5ad`` file holding one sample, or several split by ``sample_key``.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    sample, donor
        Ids for a single-sample file.
    sample_key, donor_key
        obs columns naming each spot's sample and donor in a multi-sample file; the result is then
        a list of per-sample AnnData in order of first appearance.
    counts_layer
        Layer holding raw counts when ``X`` holds normalised values.
    fullres_image
        Full-resolution image of a single-sample file.
    counts
        Read the counts. ``False`` (streaming, with ``sample_key``): the samples get an empty
        ``X`` of the right shape and ``obs['file_row']``, each spot's row in the file, from
        which the counts are streamed later (:class:`spatlas.io._stream.H5adCounts`).

    Returns
    -------
    One standardised AnnData (see :func:`standardise_h5ad_sample`) or, with ``sample_key``, a list.

    Raises
    ------
    SpatlasInputError
        One line per problem (see :func:`standardise_h5ad_sample`); a file holding several
        sections read as one sample is refused with the ``sample_key`` to use; an unexpected error
        inside a reader also becomes one line naming the file.
    """
    path = Path(path)
    # several samples: the file stays on disk and each sample's rows are read in turn, so the
    # whole matrix is never held twice
    if not counts and sample_key is None:
        raise SpatlasInputError(f"{path}: reading without counts needs a sample_key")
    adata = _load(path, backed=sample_key is not None)
    try:
        with reading(path, ".h5ad input", _H5AD_FIX):
            return _split(
                adata,
                path,
                sample=sample,
                donor=donor,
                sample_key=sample_key,
                donor_key=donor_key,
                counts_layer=counts_layer,
                fullres_image=fullres_image,
                counts=counts,
            )
    finally:
        if adata.isbacked:
            adata.file.close()


def _split(
    adata: ad.AnnData,
    path: Path,
    *,
    sample: str | None,
    donor: str | None,
    sample_key: str | None,
    donor_key: str | None,
    counts_layer: str | None,
    fullres_image: str | Path | None,
    counts: bool = True,
) -> ad.AnnData | list[ad.AnnData]:
    if sample_key is None:
        if sample is None:
            raise SpatlasInputError(f"{path}: give a sample id (sample=...) or a sample_key column")
        return standardise_h5ad_sample(
            adata,
            sample=sample,
            donor=donor,
            counts_layer=counts_layer,
            fullres_image=fullres_image,
            where=f"{path} [{sample}]",
        )
    for key in (sample_key, donor_key):
        if key is not None and key not in adata.obs:
            raise SpatlasInputError(
                f"{path}: obs column '{key}' does not exist (columns: {', '.join(adata.obs)})"
            )
    unnamed = adata.obs[sample_key].isna()
    if unnamed.any():
        raise SpatlasInputError(
            f"{path}: {int(unnamed.sum())} spots have no value in obs['{sample_key}'] (e.g. "
            f"{adata.obs_names[np.flatnonzero(unnamed)[0]]}); give every spot its sample"
        )
    # codes in order of first appearance: one integer comparison per sample, not a string one
    codes, samples = pd.factorize(adata.obs[sample_key].astype(str).to_numpy())
    parts = []
    for i, s in enumerate(samples):
        rows = codes == i
        if not counts:
            sub = _without_counts(adata, np.flatnonzero(rows), counts_layer)
        elif adata.isbacked:
            sub = adata[rows].to_memory()
        else:
            sub = adata[rows].copy()
        d = str(sub.obs[donor_key].iloc[0]) if donor_key else donor
        if donor_key and sub.obs[donor_key].astype(str).nunique() > 1:
            raise SpatlasInputError(f"{path}: sample '{s}' has spots from several donors")
        sub.uns.pop(K.SPATIAL, None)
        if _has_sample_uns(adata, s):
            sub.uns[K.SPATIAL] = {s: adata.uns[K.SPATIAL][s]}
        parts.append(
            standardise_h5ad_sample(
                sub,
                sample=s,
                donor=d,
                counts_layer=counts_layer,
                where=f"{path} [{s}]",
                split_keys=tuple(k for k in (sample_key, donor_key) if k is not None),
            )
        )
    return parts


def _without_counts(adata: ad.AnnData, rows: np.ndarray, counts_layer: str | None) -> ad.AnnData:
    """The spots ``rows`` of a (backed) file with an empty counts matrix and ``obs['file_row']``."""
    empty = sp.csr_matrix((rows.size, adata.n_vars), dtype=np.float32)
    obsm = {}
    for key, value in adata.obsm.items():
        obsm[key] = value.iloc[rows] if hasattr(value, "iloc") else np.asarray(value[rows])
    sub = ad.AnnData(
        X=empty,
        obs=adata.obs.iloc[rows].copy(),
        var=adata.var.copy(),
        obsm=obsm,
        layers={counts_layer: empty} if counts_layer is not None else None,
    )
    sub.obs[K.FILE_ROW] = rows.astype(np.int64)
    return sub


def _has_sample_uns(adata: ad.AnnData, sample: str) -> bool:
    spatial = adata.uns.get(K.SPATIAL)
    return isinstance(spatial, dict) and sample in spatial
