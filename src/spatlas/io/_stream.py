"""Counts streamed from an ``.h5ad`` file in row chunks, and the memory a cohort needs.

A cohort too large for memory stays on disk: :class:`H5adCounts` reads the CSR arrays of ``X``
(or of a layer) one row range at a time with h5py, and the streamed preprocessing
(:func:`spatlas.pp.preprocess_streaming`) makes its passes over those chunks. Only per-spot
vectors (embeddings, labels, coordinates) are held in memory.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._errors import SpatlasInputError

#: Stored values per chunk read from disk.
STREAM_CHUNK_NNZ = 8_000_000
#: Bytes per stored count value held in memory by the in-memory pipeline: the counts (value and
#: column, 8 bytes) and the normalised values sharing their columns (4 bytes).
BYTES_PER_VALUE = 12
#: Bytes per spot besides the counts (obs, coordinates, embeddings, Harmony's and the model's
#: per-spot arrays): 1.35 kB measured on the 1 M-spot benchmark, rounded up.
BYTES_PER_SPOT = 2_000
#: The interpreter with numpy, scipy, scanpy and torch imported.
BASE_BYTES = 1.0 * 2**30


class H5adCounts:
    """Row chunks of the counts in an ``.h5ad`` file (``X`` or ``layers[layer]``), from disk.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    layer
        Layer holding the raw counts (``None``: ``X``).
    """

    def __init__(self, path: str | Path, layer: str | None = None):
        import h5py

        self.path = Path(path)
        self.layer = layer
        self.key = "X" if layer is None else f"layers/{layer}"
        with h5py.File(self.path, "r") as f:
            if self.key not in f:
                raise SpatlasInputError(f"{self.path}: no {self.key} to stream the counts from")
            node = f[self.key]
            if isinstance(node, h5py.Group):
                encoding = node.attrs.get("encoding-type", "")
                if isinstance(encoding, bytes):
                    encoding = encoding.decode()
                if encoding != "csr_matrix":
                    raise SpatlasInputError(
                        f"{self.path}: {self.key} is stored as {encoding or 'an unknown group'}; "
                        "streaming reads rows of a CSR matrix: write it again as CSR "
                        "(adata.X = adata.X.tocsr(); adata.write_h5ad(...))"
                    )
                self.shape = tuple(int(v) for v in node.attrs["shape"])
                self.indptr = np.asarray(node["indptr"][:], dtype=np.int64)
                self.dense = False
            else:
                self.shape = tuple(int(v) for v in node.shape)
                self.indptr = None
                self.dense = True

    @property
    def nnz(self) -> int:
        """Stored values (dense: all of them)."""
        return int(self.indptr[-1]) if self.indptr is not None else self.shape[0] * self.shape[1]

    def chunks(self, chunk_nnz: int = STREAM_CHUNK_NNZ) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, counts[start:stop])`` (float32 CSR) over all rows, in file order."""
        import h5py

        n, g = self.shape
        with h5py.File(self.path, "r") as f:
            node = f[self.key]
            if self.dense:
                step = max(1, chunk_nnz // max(g, 1))
                for start in range(0, n, step):
                    stop = min(start + step, n)
                    block = sp.csr_matrix(np.asarray(node[start:stop], dtype=np.float32))
                    yield start, stop, block
                return
            data, indices = node["data"], node["indices"]
            bounds = np.searchsorted(self.indptr, np.arange(0, self.nnz, chunk_nnz), "right") - 1
            bounds = np.unique(np.concatenate([[0], np.clip(bounds, 0, n), [n]]))
            for start, stop in itertools.pairwise(bounds):
                lo, hi = int(self.indptr[start]), int(self.indptr[stop])
                block = sp.csr_matrix(
                    (
                        np.asarray(data[lo:hi], dtype=np.float32),
                        np.asarray(indices[lo:hi], dtype=np.int32),
                        (self.indptr[start : stop + 1] - lo).astype(np.int64),
                    ),
                    shape=(int(stop - start), g),
                )
                yield int(start), int(stop), block


def stack_rows(pieces: list[sp.csr_matrix], n_cols: int) -> sp.csr_matrix:
    """The CSR ``pieces`` stacked row-wise, each dropped from the list once copied.

    The peak is the result plus one piece, not twice the result (``scipy.sparse.vstack`` holds
    every piece and the result at once). The values keep the pieces' common dtype.
    """
    nnz = sum(p.nnz for p in pieces)
    n = sum(p.shape[0] for p in pieces)
    dtype = np.result_type(*(p.dtype for p in pieces)) if pieces else np.float32
    index = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, dtype=dtype)
    indices = np.empty(nnz, dtype=index)
    indptr = np.zeros(n + 1, dtype=index)
    row = pos = 0
    while pieces:
        piece = pieces.pop(0)
        data[pos : pos + piece.nnz] = piece.data
        indices[pos : pos + piece.nnz] = piece.indices
        indptr[row + 1 : row + 1 + piece.shape[0]] = piece.indptr[1:] + pos
        row, pos = row + piece.shape[0], pos + piece.nnz
    return sp.csr_matrix((data, indices, indptr), shape=(n, n_cols))


def h5ad_size(path: str | Path, layer: str | None = None) -> tuple[int, int, int]:
    """Spots, genes and stored count values of an ``.h5ad`` file, read from its metadata."""
    counts = H5adCounts(path, layer)
    return counts.shape[0], counts.shape[1], counts.nnz


def memory_estimate(n_spots: int, nnz: int) -> float:
    """Bytes the in-memory pipeline needs for a cohort (see the module's constants)."""
    return BASE_BYTES + BYTES_PER_VALUE * nnz + BYTES_PER_SPOT * n_spots


def streaming_estimate(n_spots: int, nnz: int, fit_spots: int | None) -> float:
    """Bytes the streamed pipeline needs: per-spot vectors, one chunk and the PCA's subsample."""
    fit = n_spots if fit_spots is None else min(n_spots, fit_spots)
    per_row = nnz / max(n_spots, 1)
    return BASE_BYTES + BYTES_PER_SPOT * n_spots + 8 * per_row * fit + 20 * STREAM_CHUNK_NNZ


def available_memory() -> float:
    """Bytes of memory available to this process (``MemAvailable``; a cgroup limit if lower)."""
    available = float("inf")
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        available = pages * os.sysconf("SC_PAGE_SIZE") if pages else float("inf")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, float(text))
    return available


def gb(value: float) -> str:
    """Bytes as ``12.3 GB``."""
    return f"{value / 2**30:.1f} GB"
