"""A synthetic multi-donor Visium-like cohort: planted domains, batch effects and H&E images.

Everything is drawn from ``numpy.random.Generator`` streams keyed by ``(seed, role, donor,
sample)``, so a sample's data do not depend on how many other donors or samples are generated.
"""

from __future__ import annotations

import time
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

MORPH_TRUTH_KEY = "X_morph_truth"
"""``obsm`` key of the per-spot morphology signal the synthetic images are painted from."""

MORPH_FEATURES = ("haematoxylin", "nuclei_density", "nuclei_size", "fibre")
"""Columns of ``obsm['X_morph_truth']``, each in [0, 1]."""

LAYOUTS = ("layers", "blobs", "mixed")

# Visium: spot centre-to-centre distance (100 um) over spot diameter (55 um)
_SPACING = 100.0 / 55.0
_ROW_STEP = np.sqrt(3.0) / 2.0  # row spacing on the hex lattice, in centre-to-centre units
_HEX_OFFSETS = ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1))
_SQUARE_OFFSETS = ((0, 1), (0, -1), (1, 0), (-1, 0))
# Ruifrok & Johnston optical-density vectors of haematoxylin and eosin (RGB)
_H_OD = np.array([0.650, 0.704, 0.286])
_E_OD = np.array([0.072, 0.990, 0.105])
# generator stream roles
_GLOBAL, _DONOR, _SAMPLE, _IMAGE = 0, 1, 2, 3


def synthetic_cohort(
    n_donors: int = 3,
    n_samples_per_donor: int = 2,
    n_spots: int = 1500,
    n_genes: int = 500,
    n_domains: int = 5,
    seed: int = 0,
    *,
    layout: Literal["layers", "blobs", "mixed"] = "layers",
    lattice: Literal["hex", "square"] = "hex",
    image: bool = True,
    spot_diameter_px: float = 24.0,
    hires_spot_px: float = 12.0,
    library_size: float = 1000.0,
    dispersion: float = 4.0,
    n_markers: int = 20,
    marker_lfc: float = 1.2,
    boundary_mixing: float = 0.35,
    spatial_noise: float = 0.3,
    donor_effect: float = 0.15,
    sample_effect: float = 0.1,
    library_shift: float = 0.2,
    dropout: float = 0.15,
    n_batch_genes: int = 5,
    missing_domain_prob: float = 0.2,
    morph_noise: float = 0.08,
    stain_shift: float = 1.0,
) -> ad.AnnData:
    """Simulate a multi-donor Visium-like cohort with planted spatial domains.

    Each sample is a roughly oval patch of a hexagonal Visium lattice. Domains are planted as
    layered bands with wavy, curved boundaries (cortex-like), as blobs, or as layers with blobs of
    the last domain on top. Counts are negative binomial (Poisson-Gamma) around a mixture of
    domain gene programmes (neighbouring spots mix at domain boundaries), with spatially smooth
    noise, per-spot library sizes, and donor- and sample-level batch effects: per-gene log-normal
    scaling, library-size shifts, extra zero inflation and a few donor-specific genes. Each sample
    gets a synthetic H&E image whose colour and texture (nuclei, fibres) follow a per-spot
    morphology signal that depends on the domain, with a per-slide stain shift.

    Parameters
    ----------
    n_donors
        Number of donors.
    n_samples_per_donor
        Slices per donor.
    n_spots
        Approximate number of spots per sample (each sample varies by up to ±10 %).
    n_genes
        Number of genes (``gene_0000``, ...).
    n_domains
        Number of planted domains (``domain_0``, ...).
    seed
        Seed of every random choice; the same seed gives identical data.
    layout
        ``'layers'`` (bands), ``'blobs'`` or ``'mixed'`` (bands plus blobs of the last domain).
    lattice
        ``'hex'``: Visium spots (55 µm, 100 µm apart); ``'square'``: a Visium-HD-like square
        lattice of touching bins whose side is ``spot_diameter_px`` (``array_row`` /
        ``array_col`` the bin's row and column).
    image
        Paint a hires H&E image per sample (``uns['spatial'][sample]['images']['hires']``).
    spot_diameter_px
        Spot diameter in full-resolution pixels (``spot_diameter_fullres``).
    hires_spot_px
        Spot diameter in hires-image pixels; sets ``tissue_hires_scalef``.
    library_size
        Median UMI count per spot before batch shifts.
    dispersion
        Median negative-binomial inverse dispersion (theta) over genes; smaller is noisier.
    n_markers
        Up-regulated marker genes per domain (half as many down-regulated ones are added).
    marker_lfc
        Mean natural-log fold change of a domain's up-regulated markers.
    boundary_mixing
        Weight of the neighbouring spots' domains in a spot's expression and morphology.
    spatial_noise
        Standard deviation of spatially smooth, domain-independent log-expression noise.
    donor_effect
        Standard deviation of per-gene log scaling factors per donor.
    sample_effect
        Standard deviation of per-gene log scaling factors per sample.
    library_shift
        Standard deviation of the log library-size shift per donor (half of it per sample).
    dropout
        Largest extra zero-inflation rate of a sample (each draws uniformly up to it).
    n_batch_genes
        Genes switched on in one donor only (contamination-like batch genes).
    missing_domain_prob
        Probability that a sample lacks one domain (an outer layer, or one blob domain).
    morph_noise
        Standard deviation of per-spot noise on the morphology signal.
    stain_shift
        Scale of the per-slide stain, intensity and background colour shifts (0: none).

    Returns
    -------
    One cohort AnnData in spatlas' layout: ``X`` raw counts (float32 CSR); ``obs`` ``sample``,
    ``donor``, ``label`` (categorical), ``barcode``, ``in_tissue``, ``array_row``, ``array_col``;
    ``obsm['spatial']`` full-resolution (x, y) pixels; ``obsm['X_morph_truth']`` (float32, columns
    :data:`MORPH_FEATURES`); ``var['domain_marker']`` (the domain a gene is an up-marker of, or
    ``''``); ``uns['spatial'][sample]`` with ``images``, ``scalefactors`` and ``metadata``.
    """
    _check_args(
        n_donors,
        n_samples_per_donor,
        n_spots,
        n_genes,
        n_domains,
        seed,
        layout,
        spot_diameter_px,
        hires_spot_px,
        n_markers,
        lattice=lattice,
        fractions={
            "dropout": dropout,
            "boundary_mixing": boundary_mixing,
            "missing_domain_prob": missing_domain_prob,
        },
        scales={
            "library_size": library_size,
            "dispersion": dispersion,
            "marker_lfc": marker_lfc,
            "spatial_noise": spatial_noise,
            "donor_effect": donor_effect,
            "sample_effect": sample_effect,
            "library_shift": library_shift,
            "morph_noise": morph_noise,
            "stain_shift": stain_shift,
        },
    )
    start = time.perf_counter()
    programmes = _gene_programmes(
        n_genes, n_domains, seed, dispersion=dispersion, n_markers=n_markers, marker_lfc=marker_lfc
    )
    blocks, obs_frames, spatial_blocks, morph_blocks, uns_spatial = [], [], [], [], {}
    donor_names, sample_names = [], []
    for d in range(n_donors):
        donor = f"d{d}"
        donor_names.append(donor)
        batch = _donor_batch(
            n_genes,
            seed,
            d,
            donor_effect=donor_effect,
            library_shift=library_shift,
            n_batch_genes=n_batch_genes,
        )
        for s in range(n_samples_per_donor):
            sample = f"{donor}_s{s}"
            sample_names.append(sample)
            rng = np.random.default_rng([seed, _SAMPLE, d, s])
            square = lattice == "square"
            rows, cols = _square_patch(n_spots, rng) if square else _hex_patch(n_spots, rng)
            uv = (  # centre-to-centre units
                np.column_stack([cols, rows]).astype(np.float64)
                if square
                else np.column_stack([cols / 2.0, rows * _ROW_STEP])
            )
            labels = _plant_domains(
                uv,
                n_domains,
                layout,
                programmes["proportions"],
                rng,
                missing_domain_prob=missing_domain_prob,
            )
            membership = _soft_membership(
                rows, cols, labels, n_domains, boundary_mixing, square=square
            )
            counts = _simulate_counts(
                uv,
                membership,
                programmes,
                batch,
                rng,
                library_size=library_size,
                spatial_noise=spatial_noise,
                sample_effect=sample_effect,
                library_shift=library_shift,
                dropout=dropout,
            )
            morph = _morphology(uv, membership, programmes["morph_means"], rng, morph_noise)

            # tissue placed with a margin of 1.5-2.5 spot distances on every side
            c2c = spot_diameter_px * (1.0 if square else _SPACING)
            x0, y0, right, bottom = c2c * rng.uniform(1.5, 2.5, size=4)
            step = (c2c, c2c) if square else (c2c / 2.0, c2c * _ROW_STEP)  # per col, per row
            xy = np.column_stack([x0 + cols * step[0], y0 + rows * step[1]])
            hires_scalef = hires_spot_px / spot_diameter_px
            images = {}
            if image:
                shape = (
                    int(np.ceil((xy[:, 1].max() + bottom) * hires_scalef)),
                    int(np.ceil((xy[:, 0].max() + right) * hires_scalef)),
                )
                images["hires"] = _render_he(
                    rows,
                    cols,
                    (x0, y0),
                    c2c,
                    hires_scalef,
                    shape,
                    morph,
                    np.random.default_rng([seed, _IMAGE, d, s]),
                    stain_shift=stain_shift,
                    square=square,
                )
            barcodes = _barcodes(rows, cols)
            obs_frames.append(
                pd.DataFrame(
                    {
                        K.SAMPLE: sample,
                        K.DONOR: donor,
                        K.BARCODE: barcodes,
                        K.IN_TISSUE: np.ones(rows.size, dtype=np.int64),
                        K.ARRAY_ROW: rows.astype(np.int64),
                        K.ARRAY_COL: cols.astype(np.int64),
                        K.LABEL: labels,
                    },
                    index=pd.Index([f"{b}-{sample}" for b in barcodes]),
                )
            )
            blocks.append(sp.csr_matrix(counts.astype(np.float32)))
            spatial_blocks.append(xy)
            morph_blocks.append(morph)
            uns_spatial[sample] = {
                K.IMAGES: images,
                K.SCALEFACTORS: {
                    K.SPOT_DIAMETER: float(spot_diameter_px),
                    K.HIRES_SCALEF: float(hires_scalef),
                    K.LOWRES_SCALEF: float(hires_scalef * 0.3),
                },
                K.METADATA: {"source": "synthetic", K.FULLRES_PATH: ""},
            }

    obs = pd.concat(obs_frames)
    obs[K.SAMPLE] = pd.Categorical(obs[K.SAMPLE], categories=sample_names)
    obs[K.DONOR] = pd.Categorical(obs[K.DONOR], categories=donor_names)
    domain_names = [f"domain_{k}" for k in range(n_domains)]
    obs[K.LABEL] = pd.Categorical.from_codes(obs[K.LABEL].to_numpy(), categories=domain_names)
    var = pd.DataFrame(
        {"domain_marker": programmes["marker_of"]},
        index=pd.Index([f"gene_{g:04d}" for g in range(n_genes)]),
    )
    adata = ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=var)
    adata.obsm[K.SPATIAL] = np.vstack(spatial_blocks).astype(np.float64)
    adata.obsm[MORPH_TRUTH_KEY] = np.vstack(morph_blocks).astype(np.float32)
    adata.uns[K.SPATIAL] = uns_spatial
    logger.info(
        "synthetic cohort: %d samples, %d spots, %d genes, %d domains (%.2f s)",
        len(sample_names),
        adata.n_obs,
        n_genes,
        n_domains,
        time.perf_counter() - start,
    )
    return adata


def _check_args(
    n_donors: int,
    n_samples_per_donor: int,
    n_spots: int,
    n_genes: int,
    n_domains: int,
    seed: int,
    layout: str,
    spot_diameter_px: float,
    hires_spot_px: float,
    n_markers: int,
    *,
    lattice: str = "hex",
    fractions: dict[str, float],
    scales: dict[str, float],
) -> None:
    """Raise one :class:`SpatlasInputError` (a ``ValueError``) listing every bad argument."""
    problems = []
    problems += [
        f"{k} must lie in [0, 1] (got {v})" for k, v in fractions.items() if not 0 <= v <= 1
    ]
    problems += [f"{k} must not be negative (got {v})" for k, v in scales.items() if v < 0]
    if scales["library_size"] <= 0 or scales["dispersion"] <= 0:
        problems.append("library_size and dispersion must be positive")
    if n_donors < 1 or n_samples_per_donor < 1:
        problems.append("n_donors and n_samples_per_donor must be at least 1")
    if n_spots < 50:
        problems.append(f"n_spots must be at least 50 (got {n_spots})")
    if n_domains < 2:
        problems.append(f"n_domains must be at least 2 (got {n_domains})")
    if n_genes < n_domains * n_markers + n_markers // 2:
        problems.append(
            f"n_genes ({n_genes}) must be at least n_domains * n_markers + n_markers // 2 "
            f"({n_domains * n_markers + n_markers // 2})"
        )
    if n_markers < 1:
        problems.append(f"n_markers must be at least 1 (got {n_markers})")
    if seed < 0:
        problems.append(f"seed must be a non-negative integer (got {seed})")
    if layout not in LAYOUTS:
        problems.append(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if lattice not in ("hex", "square"):
        problems.append(f"lattice must be 'hex' or 'square' (got {lattice!r})")
    if spot_diameter_px <= 0 or hires_spot_px <= 0:
        problems.append("spot_diameter_px and hires_spot_px must be positive")
    if problems:
        raise SpatlasInputError(problems)


# ---------------------------------------------------------------------------------------------
# geometry and domains


def _square_patch(n_spots: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows / cols of an irregular oval-to-rectangular patch of a square lattice."""
    n = int(np.rint(n_spots * rng.uniform(0.9, 1.1)))
    aspect = rng.uniform(0.7, 1.45)
    power = rng.uniform(2.0, 4.0)
    size = np.sqrt(n / np.pi)
    half_w, half_h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    n_rows, n_cols = int(np.ceil(1.8 * half_h)) * 2 + 1, int(np.ceil(1.8 * half_w)) * 2 + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    u, v = cols - (n_cols - 1) / 2.0, rows - (n_rows - 1) / 2.0
    keep = _oval(u, v, half_w, half_h, power, n, rng)
    rows, cols = rows[keep], cols[keep]
    return (rows - rows.min()).astype(np.int64), (cols - cols.min()).astype(np.int64)


def _oval(
    u: np.ndarray,
    v: np.ndarray,
    half_w: float,
    half_h: float,
    power: float,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sorted indices of the ``n`` innermost sites of a wobbly superellipse.

    ``u``, ``v``: the sites' centred coordinates; ``half_w``, ``half_h``: the half-axes;
    ``power``: the exponent (2 ellipse, 4 rounded rectangle).
    """
    angle = np.arctan2(v, u)
    wobble = 1.0 + sum(
        rng.uniform(0.0, 0.06) * np.cos(h * angle + rng.uniform(0, 2 * np.pi)) for h in (2, 3, 5)
    )
    radius = (np.abs(u / half_w) ** power + np.abs(v / half_h) ** power) ** (1 / power) / wobble
    return np.sort(np.argsort(radius, kind="stable")[:n])


def _hex_patch(n_spots: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Array rows / cols of an irregular oval-to-rectangular patch of about ``n_spots`` spots."""
    n = int(np.rint(n_spots * rng.uniform(0.9, 1.1)))
    aspect = rng.uniform(0.7, 1.45)  # width / height
    power = rng.uniform(2.0, 4.0)  # superellipse exponent: 2 = ellipse, 4 = rounded rectangle
    size = np.sqrt(n * _ROW_STEP / np.pi)
    half_w, half_h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    n_rows = int(np.ceil(1.8 * half_h / _ROW_STEP)) * 2 + 1
    n_cols = int(np.ceil(1.8 * half_w)) * 4 + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    even = (rows + cols) % 2 == 0
    rows, cols = rows[even], cols[even]
    u = cols / 2.0 - (n_cols - 1) / 4.0
    v = (rows - (n_rows - 1) / 2.0) * _ROW_STEP
    keep = _oval(u, v, half_w, half_h, power, n, rng)
    rows, cols = rows[keep], cols[keep]
    # shift to start near 0, keeping (row + col) even
    r0, c0 = rows.min(), cols.min()
    c0 -= (r0 + c0) % 2
    return (rows - r0).astype(np.int64), (cols - c0).astype(np.int64)


def _smooth_fields(
    uv: np.ndarray,
    n_fields: int,
    length_scale: float,
    rng: np.random.Generator,
    n_features: int = 48,
) -> np.ndarray:
    """``n_fields`` smooth Gaussian random fields of unit variance at ``uv`` (random Fourier)."""
    omega = rng.normal(0.0, 1.0 / length_scale, size=(n_fields, n_features, 2))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n_fields, n_features))
    proj = np.einsum("nd,fmd->nfm", uv, omega) + phase
    return np.sqrt(2.0 / n_features) * np.cos(proj).sum(axis=-1)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of ``values`` scaled to [0, 1)."""
    out = np.empty(values.size)
    out[np.argsort(values, kind="stable")] = np.arange(values.size) / values.size
    return out


def _layer_labels(uv: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bands with wavy, curved boundaries and random orientation; exact spot proportions."""
    theta = rng.uniform(0, 2 * np.pi)
    centred = uv - uv.mean(axis=0)
    t = centred @ np.array([np.cos(theta), np.sin(theta)])
    s = centred @ np.array([-np.sin(theta), np.cos(theta)])
    extent = np.ptp(t)
    s_n = s / (np.abs(s).max() + 1e-9)
    t = (
        t
        + extent
        * rng.uniform(0.02, 0.06)
        * np.sin(2 * np.pi * rng.uniform(0.4, 1.1) * s_n + rng.uniform(0, 2 * np.pi))
        + extent * rng.uniform(-0.3, 0.3) * s_n**2
        + extent * 0.025 * _smooth_fields(uv, 1, 4.0, rng)[:, 0]
    )
    bounds = np.cumsum(proportions)[:-1]
    return np.searchsorted(bounds, _ranks(t), side="right")


def _blob_labels(uv: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blobs: each domain takes the top of its own smooth field among the spots still free."""
    n_domains = proportions.size
    fields = _smooth_fields(uv, n_domains, rng.uniform(3.5, 6.0), rng)
    background = int(np.argmax(proportions))  # the largest domain fills what is left
    labels = np.full(uv.shape[0], background)
    free = np.ones(uv.shape[0], dtype=bool)
    for k in rng.permutation(n_domains):
        if k == background:
            continue
        n_k = int(np.rint(proportions[k] * uv.shape[0]))
        if n_k == 0:
            continue
        idx = np.flatnonzero(free)
        take = idx[np.argsort(-fields[idx, k], kind="stable")[:n_k]]
        labels[take] = k
        free[take] = False
    return labels


def _plant_domains(
    uv: np.ndarray,
    n_domains: int,
    layout: str,
    base_proportions: np.ndarray,
    rng: np.random.Generator,
    *,
    missing_domain_prob: float,
) -> np.ndarray:
    """Integer domain per spot; proportions vary per sample and one domain may be missing."""
    proportions = rng.dirichlet(25.0 * n_domains * base_proportions)
    proportions = np.maximum(proportions, 0.3 / n_domains)
    if rng.random() < missing_domain_prob:
        # an outer layer that the section missed, or (blobs) any non-background domain
        if layout == "blobs":
            candidates = np.delete(np.arange(n_domains), np.argmax(proportions))
        elif layout == "mixed":  # an outer layer; the blob domain when there is one layer
            candidates = np.array([0, n_domains - 2] if n_domains > 2 else [n_domains - 1])
        else:
            candidates = np.array([0, n_domains - 1])
        proportions[rng.choice(candidates)] = 0.0
    proportions /= proportions.sum()
    if layout == "layers":
        return _layer_labels(uv, proportions, rng)
    if layout == "blobs":
        return _blob_labels(uv, proportions, rng)
    labels = _layer_labels(uv, proportions[:-1] / proportions[:-1].sum(), rng)
    n_last = int(np.rint(proportions[-1] * uv.shape[0]))
    if n_last:
        field = _smooth_fields(uv, 1, rng.uniform(3.0, 5.0), rng)[:, 0]
        labels[np.argsort(-field, kind="stable")[:n_last]] = n_domains - 1
    return labels


def _hex_neighbours(
    rows: np.ndarray, cols: np.ndarray, offsets: tuple = _HEX_OFFSETS
) -> np.ndarray:
    """(n, 6) indices of each spot's hex-lattice neighbours (or ``offsets``), -1 where none."""
    grid = np.full((rows.max() + 3, cols.max() + 5), -1, dtype=np.int64)
    grid[rows + 1, cols + 2] = np.arange(rows.size)
    return np.stack([grid[rows + 1 + dr, cols + 2 + dc] for dr, dc in offsets], axis=1)


def _soft_membership(
    rows: np.ndarray,
    cols: np.ndarray,
    labels: np.ndarray,
    n_domains: int,
    mixing: float,
    *,
    square: bool = False,
) -> np.ndarray:
    """One-hot domains blended with the neighbours' (spots straddle domain boundaries)."""
    onehot = np.eye(n_domains)[labels]
    nb = _hex_neighbours(rows, cols, _SQUARE_OFFSETS if square else _HEX_OFFSETS)
    valid = nb >= 0
    n_valid = valid.sum(axis=1, keepdims=True)
    nb_mean = (onehot[np.where(valid, nb, 0)] * valid[..., None]).sum(axis=1)
    nb_mean = np.where(n_valid > 0, nb_mean / np.maximum(n_valid, 1), onehot)
    return (1.0 - mixing) * onehot + mixing * nb_mean


# ---------------------------------------------------------------------------------------------
# expression


def _gene_programmes(
    n_genes: int,
    n_domains: int,
    seed: int,
    *,
    dispersion: float,
    n_markers: int,
    marker_lfc: float,
) -> dict[str, np.ndarray]:
    """Shared across samples: baseline abundance, domain log-fold changes, morphology means."""
    rng = np.random.default_rng([seed, _GLOBAL])
    log_base = rng.normal(0.0, 1.0, n_genes)
    lfc = rng.normal(0.0, 0.08, size=(n_domains, n_genes))  # weak diffuse programme
    marker_of = np.full(n_genes, "", dtype=object)
    # disjoint up-markers per domain, among the better-detected 70 % of genes (as HVG selection
    # would keep them); down-markers drawn among all other genes
    n_candidates = max(int(0.7 * n_genes), n_domains * n_markers)
    order = rng.permutation(np.argsort(-log_base, kind="stable")[:n_candidates])
    n_down = n_markers // 2
    for k in range(n_domains):
        up = order[k * n_markers : (k + 1) * n_markers]
        lfc[k, up] += np.abs(rng.normal(marker_lfc, 0.35 * marker_lfc, up.size))
        marker_of[up] = f"domain_{k}"
        down = rng.choice(np.setdiff1d(np.arange(n_genes), up), n_down, replace=False)
        lfc[k, down] -= np.abs(rng.normal(0.6 * marker_lfc, 0.2 * marker_lfc, n_down))
    return {
        "log_base": log_base,
        "lfc": lfc,
        "theta": dispersion * np.exp(rng.normal(0.0, 0.5, n_genes)),
        "library_domain": rng.normal(0.0, 0.25, n_domains),
        "proportions": rng.dirichlet(np.full(n_domains, 6.0)),
        "morph_means": rng.uniform(0.1, 0.9, size=(n_domains, len(MORPH_FEATURES))),
        "marker_of": marker_of.astype(str),
    }


def _donor_batch(
    n_genes: int,
    seed: int,
    donor: int,
    *,
    donor_effect: float,
    library_shift: float,
    n_batch_genes: int,
) -> dict[str, np.ndarray | float]:
    """Per-donor log gene scaling (with a few donor-only genes) and library-size shift."""
    rng = np.random.default_rng([seed, _DONOR, donor])
    gene = rng.normal(0.0, donor_effect, n_genes)
    if n_batch_genes:
        special = rng.choice(n_genes, min(n_batch_genes, n_genes), replace=False)
        gene[special] += rng.uniform(1.5, 3.0, special.size)
    return {"gene": gene, "library": float(rng.normal(0.0, library_shift))}


def _simulate_counts(
    uv: np.ndarray,
    membership: np.ndarray,
    programmes: dict[str, np.ndarray],
    batch: dict[str, np.ndarray | float],
    rng: np.random.Generator,
    *,
    library_size: float,
    spatial_noise: float,
    sample_effect: float,
    library_shift: float,
    dropout: float,
) -> np.ndarray:
    """Poisson-Gamma counts (n_spots, n_genes) for one sample."""
    n, n_genes = membership.shape[0], programmes["log_base"].size
    signal = rng.uniform(0.75, 1.0)  # marker strength varies with section quality
    # mix the domains' expression in linear space: a spot is a mixture of cells
    mean = membership @ np.exp(signal * programmes["lfc"])
    smooth = _smooth_fields(uv, 4, rng.uniform(5.0, 9.0), rng)
    log_rate = (
        programmes["log_base"]
        + np.log(mean)
        + spatial_noise * smooth @ rng.normal(0.0, 1.0 / 2.0, size=(4, n_genes))
        + batch["gene"]
        + rng.normal(0.0, sample_effect, n_genes)
    )
    log_rate -= log_rate.max(axis=1, keepdims=True)
    proportions = np.exp(log_rate)
    proportions /= proportions.sum(axis=1, keepdims=True)
    log_library = (
        np.log(library_size)
        + batch["library"]
        + rng.normal(0.0, 0.5 * library_shift)
        + membership @ programmes["library_domain"]
        + 0.2 * _smooth_fields(uv, 1, 6.0, rng)[:, 0]
        + rng.normal(0.0, 0.25, n)
    )
    rate = proportions * np.exp(log_library)[:, None]
    theta = programmes["theta"]
    rate *= rng.gamma(theta, 1.0 / theta, size=(n, n_genes))
    counts = rng.poisson(rate)
    zero_inflation = rng.uniform(0.0, dropout)
    counts[rng.random((n, n_genes)) < zero_inflation] = 0
    return counts


# ---------------------------------------------------------------------------------------------
# morphology and the H&E image


def _morphology(
    uv: np.ndarray,
    membership: np.ndarray,
    means: np.ndarray,
    rng: np.random.Generator,
    noise: float,
) -> np.ndarray:
    """Per-spot morphology signal in [0, 1]: domain means, smooth noise and spot noise."""
    n, m = membership.shape[0], means.shape[1]
    morph = (
        membership @ means
        + 0.05 * _smooth_fields(uv, m, 6.0, rng)
        + rng.normal(0.0, noise, size=(n, m))
    )
    return np.clip(morph, 0.0, 1.0)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _nearest_site(
    shape: tuple[int, int],
    origin: tuple[float, float],
    step: tuple[float, float],
    grid: np.ndarray,
    *,
    square: bool = False,
) -> np.ndarray:
    """For each pixel, the index of the spot whose hex cell holds it, -1 off tissue.

    ``grid`` maps (array_row + 2, array_col + 2) to a spot index and is -1 elsewhere, with a
    border of at least 2, so lattice sites outside the patch land off tissue.
    """
    height, width = shape
    fr = (np.arange(height, dtype=np.float32) - np.float32(origin[1])) / np.float32(step[1])
    fc = (np.arange(width, dtype=np.float32) - np.float32(origin[0])) / np.float32(step[0])
    if square:  # the square bin holding the pixel
        r = np.clip(np.round(fr).astype(np.int64) + 2, 0, grid.shape[0] - 1)
        c = np.clip(np.round(fc).astype(np.int64) + 2, 0, grid.shape[1] - 1)
        return grid[r[:, None], c[None, :]]
    best = row = col = None
    for dr in (0, 1):
        r = np.floor(fr).astype(np.int32) + dr
        parity = (r % 2)[:, None]
        c = 2 * np.round((fc[None, :] - parity) / np.float32(2.0)).astype(np.int32) + parity
        d2 = ((fc[None, :] - c) * np.float32(step[0])) ** 2 + (
            ((fr - r) * np.float32(step[1])) ** 2
        )[:, None]
        if best is None:
            best, row, col = d2, np.broadcast_to(r[:, None], shape), c
        else:
            closer = d2 < best
            row = np.where(closer, r[:, None], row)
            col = np.where(closer, c, col)
    row = np.clip(row + 2, 0, grid.shape[0] - 1)
    col = np.clip(col + 2, 0, grid.shape[1] - 1)
    return grid[row, col]


def _stamp_nuclei(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    radius: np.ndarray,
    strength: np.ndarray,
) -> np.ndarray:
    """Anti-aliased discs of ``radius`` at (x, y), summed into a float32 image (vectorised)."""
    height, width = shape
    dy, dx = np.mgrid[-4:5, -4:5]
    dist = np.sqrt(dy**2 + dx**2).ravel()
    near = dist <= 4.0
    dy, dx, dist = dy.ravel()[near], dx.ravel()[near], dist[near]
    weight = np.clip(radius[:, None] + 0.5 - dist[None, :], 0.0, 1.0) * strength[:, None]
    py = np.round(y).astype(np.int64)[:, None] + dy[None, :]
    px = np.round(x).astype(np.int64)[:, None] + dx[None, :]
    inside = (weight > 0) & (py >= 0) & (py < height) & (px >= 0) & (px < width)
    image = np.bincount((py * width + px)[inside], weights=weight[inside], minlength=height * width)
    return image.reshape(shape).astype(np.float32)


def _render_he(
    rows: np.ndarray,
    cols: np.ndarray,
    origin: tuple[float, float],
    c2c: float,
    scalef: float,
    shape: tuple[int, int],
    morph: np.ndarray,
    rng: np.random.Generator,
    *,
    stain_shift: float,
    square: bool = False,
) -> np.ndarray:
    """Paint a hires H&E-like RGB image (uint8) of one sample from its morphology signal.

    Colour is a Beer-Lambert mix of haematoxylin and eosin: diffuse haematoxylin follows
    ``morph[:, 0]``, nuclei (dark discs) have density ``morph[:, 1]`` and size ``morph[:, 2]``,
    eosin fibre texture has strength ``morph[:, 3]``; stain vectors, stain intensities and the
    background colour shift per slide.
    """
    f32 = np.float32
    c2c_px = c2c * scalef
    step = (c2c, c2c) if square else (c2c / 2.0, c2c * _ROW_STEP)
    cx = (origin[0] + cols * step[0]) * scalef
    cy = (origin[1] + rows * step[1]) * scalef
    grid = np.full((rows.max() + 5, cols.max() + 5), -1, dtype=np.int64)
    grid[rows + 2, cols + 2] = np.arange(rows.size)
    owner = _nearest_site(
        shape,
        (origin[0] * scalef, origin[1] * scalef),
        (step[0] * scalef, step[1] * scalef),
        grid,
        square=square,
    )
    tissue = (owner >= 0).astype(f32)
    safe_owner = np.maximum(owner, 0)

    # per-pixel haematoxylin and fibre strength: the spot's value, softened across hex cells
    # (normalised convolution, so the tissue edge keeps its value)
    stack = np.stack(
        [
            tissue,
            morph[:, 0].astype(f32)[safe_owner] * tissue,
            morph[:, 3].astype(f32)[safe_owner] * tissue,
        ]
    )
    stack = ndimage.gaussian_filter(stack, (0.0, 0.12 * c2c_px, 0.12 * c2c_px), truncate=2.5)
    tissue_soft = stack[0]
    hema = stack[1] / np.maximum(tissue_soft, f32(1e-3))
    fibre_strength = stack[2] / np.maximum(tissue_soft, f32(1e-3))

    # nuclei around each spot centre: density and size follow the spot's signal
    n_nuclei = rng.poisson(2.0 + 14.0 * morph[:, 1])
    spot = np.repeat(np.arange(rows.size), n_nuclei)
    r = 0.55 * c2c_px * np.sqrt(rng.random(spot.size))
    phi = rng.uniform(0.0, 2 * np.pi, spot.size)
    radius = np.clip(1.0 + 1.8 * morph[spot, 2] + rng.normal(0.0, 0.25, spot.size), 0.8, 3.3)
    nuclei = _stamp_nuclei(
        shape,
        cx[spot] + r * np.cos(phi),
        cy[spot] + r * np.sin(phi),
        radius,
        rng.uniform(0.7, 1.1, spot.size),
    )
    np.minimum(nuclei, f32(1.2), out=nuclei)

    # fibre and grain texture: smoothed noise, anisotropic for fibres (direction per slide)
    fibre_sigma = (0.7, 3.0) if rng.random() < 0.5 else (3.0, 0.7)
    fibre = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=f32), fibre_sigma, truncate=2.5
    )
    fibre *= f32(1.0 / (fibre.std() + 1e-6))
    grain = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32), 0.8, truncate=2.5)
    grain *= f32(1.0 / (grain.std() + 1e-6))

    # per-slide stain: perturbed stain vectors, stain intensities, background colour
    h_vec = _unit(_H_OD * np.exp(rng.normal(0.0, 0.12 * stain_shift, 3))).astype(f32)
    e_vec = _unit(_E_OD * np.exp(rng.normal(0.0, 0.12 * stain_shift, 3))).astype(f32)
    h_scale, e_scale = (f32(v) for v in np.exp(rng.normal(0.0, 0.2 * stain_shift, 2)))
    background = np.clip(
        240.0 + rng.normal(0.0, 5.0 * stain_shift) + rng.normal(0.0, 3.0 * stain_shift, 3),
        190.0,
        255.0,
    ).astype(f32)

    conc_h = h_scale * (tissue_soft * (f32(0.08) + f32(0.5) * hema) + f32(1.3) * nuclei * tissue)
    conc_e = e_scale * tissue_soft * (f32(0.2) + f32(0.55) * (f32(1.0) - hema))
    conc_e *= np.maximum(f32(1.0) + f32(0.6) * fibre_strength * fibre + f32(0.1) * grain, f32(0.2))
    out = np.empty((*shape, 3), dtype=np.uint8)
    for ch in range(3):
        value = background[ch] * np.exp(-(conc_h * h_vec[ch] + conc_e * e_vec[ch]))
        value += f32(2.0) * grain  # faint glass / scanner texture, off tissue too
        np.clip(np.round(value), 0, 255, out=value)
        out[..., ch] = value
    return out


def _barcodes(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Visium-like 16-base barcodes, a fixed bijection of the array position (``...-1``)."""
    code = rows.astype(np.uint64) * np.uint64(4096) + cols.astype(np.uint64)
    mixed = (code * np.uint64(2654435761) + np.uint64(97531)) % np.uint64(2**32)
    digits = (mixed[:, None] >> (np.uint64(2) * np.arange(16, dtype=np.uint64))) & np.uint64(3)
    letters = np.array(list("ACGT"))[digits.astype(np.int64)]
    return np.char.add(np.ascontiguousarray(letters).view("<U16").ravel(), "-1").astype(object)
