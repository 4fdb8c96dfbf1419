"""Integration and clustering metrics (paper §3.3), in numpy / scipy / scikit-learn.

Pure functions on arrays returning floats, and :func:`evaluate`, which returns a tidy table
per sample from an AnnData.

Bio conservation: :func:`ari`, :func:`nmi` (arithmetic-mean normalisation), :func:`asw_label`
(silhouette rescaled to [0, 1]). Batch mixing: :func:`ilisi` (k = 90, perplexity 30, median,
scaled to [0, 1]), :func:`kbet` (acceptance rate, k = 50, α = 0.05), :func:`asw_batch`.
:func:`composite` = λ · mean(bio) + (1 − λ) · mean(batch); :func:`ari_donor` (lower is better).
Neighbours can be computed once with :func:`neighbors` and passed to :func:`lisi`,
:func:`ilisi` and :func:`kbet`.
"""

from __future__ import annotations

from ._batch import asw_batch, ilisi, kbet, lisi
from ._bio import ari, ari_donor, asw_label, nmi
from ._evaluate import BATCH_METRICS, BIO_METRICS, COLUMNS, composite, evaluate
from ._neighbors import Neighbors, neighbors

__all__ = [
    "BATCH_METRICS",
    "BIO_METRICS",
    "COLUMNS",
    "Neighbors",
    "ari",
    "ari_donor",
    "asw_batch",
    "asw_label",
    "composite",
    "evaluate",
    "ilisi",
    "kbet",
    "lisi",
    "neighbors",
    "nmi",
]
