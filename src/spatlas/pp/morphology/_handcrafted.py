"""A dependency-light H&E patch descriptor, computed for a whole batch at once.

Per patch (resampled to a fixed side so that texture is measured at the same physical scale on
every slide):

- ``tissue_fraction``: share of tissue pixels (optical density above background, not black);
- colour: mean and standard deviation of R, G, B and of the colour-deconvolved haematoxylin,
  eosin and residual (DAB) channels (scikit-image ``rgb2hed``, Ruifrok & Johnston), over
  tissue pixels; 10th / 50th / 90th percentiles of haematoxylin and eosin;
- an 8-bin intensity (grey) histogram of tissue pixels;
- GLCM texture: contrast, dissimilarity, homogeneity, energy, correlation and ASM at distances
  1 and 2, averaged over 0, 45, 90 and 135 degrees (symmetric, normalised; the same numbers as
  scikit-image's ``graycomatrix`` / ``graycoprops``, computed for the batch with one
  ``bincount`` per offset);
- uniform rotation-invariant LBP histogram (P = 8, R = 1; scikit-image's
  ``local_binary_pattern`` run once on the batch tiled into one image);
- a nuclei-density proxy: the area share of strongly haematoxylin-stained pixels, the number of
  haematoxylin blobs (local maxima of the smoothed haematoxylin channel above a threshold) per
  1,000 pixels, and their mean haematoxylin.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._stain import tissue_mask

GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_POINTS = 8
NUCLEI_THRESHOLD = 0.12  # rgb2hed haematoxylin of a nucleus-stained pixel (nuclei ~0.15-0.4)
TISSUE_OD = 0.2


def feature_names(glcm_levels: int = 16) -> list[str]:
    """Names of the handcrafted features, in column order."""
    names = ["tissue_fraction"]
    for ch in ("R", "G", "B", "H", "E", "D"):
        names += [f"{ch}_mean", f"{ch}_std"]
    for ch in ("H", "E"):
        names += [f"{ch}_p10", f"{ch}_p50", f"{ch}_p90"]
    names += [f"grey_hist_{i}" for i in range(8)]
    names += [f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS]
    names += [f"lbp_{i}" for i in range(LBP_POINTS + 2)]
    names += ["nuclei_area", "nuclei_per_1000px", "nuclei_mean_H"]
    return names


def glcm_offsets(distance: int) -> list[tuple[int, int]]:
    """(row, col) offsets of scikit-image's ``graycomatrix`` for the four angles."""
    return [(round(np.sin(a) * distance), round(np.cos(a) * distance)) for a in GLCM_ANGLES]


def glcm_features(quantised: np.ndarray, levels: int) -> np.ndarray:
    """(B, len(GLCM_PROPS) * len(GLCM_DISTANCES)) GLCM properties of (B, H, W) level images."""
    n, h, w = quantised.shape
    q = quantised.astype(np.int64)
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    base = (np.arange(n) * levels * levels)[:, None, None]
    out = []
    for d in GLCM_DISTANCES:
        props = np.zeros((n, len(GLCM_PROPS)))
        for dr, dc in glcm_offsets(d):
            r0, r1 = max(0, -dr), h - max(0, dr)
            c0, c1 = max(0, -dc), w - max(0, dc)
            a = q[:, r0:r1, c0:c1]
            b = q[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
            counts = np.bincount(
                (base + a * levels + b).ravel(), minlength=n * levels * levels
            ).reshape(n, levels, levels)
            p = counts + counts.transpose(0, 2, 1)  # symmetric
            p = p / np.maximum(p.sum(axis=(1, 2), keepdims=True), 1)
            diff2 = (i - j) ** 2
            mu_i = (p * i).sum(axis=(1, 2))
            mu_j = (p * j).sum(axis=(1, 2))
            var_i = (p * (i - mu_i[:, None, None]) ** 2).sum(axis=(1, 2))
            var_j = (p * (j - mu_j[:, None, None]) ** 2).sum(axis=(1, 2))
            cov = (p * (i - mu_i[:, None, None]) * (j - mu_j[:, None, None])).sum(axis=(1, 2))
            denom = np.sqrt(var_i * var_j)
            corr = np.where(denom < 1e-15, 1.0, cov / np.where(denom < 1e-15, 1.0, denom))
            asm = (p**2).sum(axis=(1, 2))
            props += np.stack(
                [
                    (p * diff2).sum(axis=(1, 2)),
                    (p * np.abs(i - j)).sum(axis=(1, 2)),
                    (p / (1.0 + diff2)).sum(axis=(1, 2)),
                    np.sqrt(asm),
                    corr,
                    asm,
                ],
                axis=1,
            )
        out.append(props / len(GLCM_ANGLES))
    return np.concatenate(out, axis=1)


def lbp_histograms(grey: np.ndarray) -> np.ndarray:
    """(B, P + 2) uniform LBP histograms of (B, H, W) uint8 images, over interior pixels.

    The batch is stacked into one tall image for a single scikit-image call; the first and last
    row and column of every patch (whose neighbours lie in another patch) are left out.
    """
    from skimage.feature import local_binary_pattern

    n, h, w = grey.shape
    codes = local_binary_pattern(grey.reshape(n * h, w), LBP_POINTS, 1, method="uniform")
    codes = codes.reshape(n, h, w)[:, 1:-1, 1:-1].astype(np.int64)
    bins = LBP_POINTS + 2
    hist = np.bincount(
        ((np.arange(n) * bins)[:, None, None] + codes).ravel(), minlength=n * bins
    ).reshape(n, bins)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)


def _masked_mean_std(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and std per row of (B, P, C) values with (B, P) weights (float32 sums)."""
    total = weights.sum(axis=1)[:, None]
    mean = np.einsum("bp,bpc->bc", weights, values) / total
    sq = np.einsum("bp,bpc->bc", weights, values * values) / total
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


def hed_lut() -> np.ndarray:
    """(256,) optical density per uint8 value as scikit-image's ``rgb2hed`` computes it."""
    rgb = np.maximum(np.arange(256) / 255.0, 1e-6)
    return (np.log(rgb) / np.log(1e-6)).astype(np.float32)


def rgb_to_hed(patches: np.ndarray) -> np.ndarray:
    """Haematoxylin, eosin, DAB of (..., 3) uint8 pixels, float32.

    ``skimage.color.rgb2hed`` through a lookup table (scikit-image's Ruifrok-Johnston matrix).
    """
    from skimage.color import hed_from_rgb

    od = hed_lut()[patches]
    return np.maximum(od @ hed_from_rgb.astype(np.float32), 0.0)


def _masked_quantiles(values: np.ndarray, valid: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """(B, len(qs)) quantiles (linear interpolation) of each row's valid entries (>= 1 each)."""
    ordered = np.sort(np.where(valid, values, np.inf), axis=1)
    k = valid.sum(axis=1)
    rows = np.arange(values.shape[0])
    out = []
    for q in qs:
        pos = q * (k - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, k - 1)
        frac = pos - lo
        out.append(ordered[rows, lo] * (1 - frac) + ordered[rows, hi] * frac)
    return np.stack(out, axis=1)


def handcrafted_features(patches: np.ndarray, *, glcm_levels: int = 16) -> np.ndarray:
    """(B, D) float32 handcrafted features of (B, S, S, 3) uint8 patches (see module doc)."""
    patches = np.asarray(patches)
    n = patches.shape[0]
    mask = tissue_mask(patches, od_threshold=TISSUE_OD)  # (B, S, S)
    has_tissue = mask.any(axis=(1, 2))
    # patches without tissue are described over all their pixels
    weights = np.where(has_tissue[:, None, None], mask, True).astype(np.float32)
    flat_w = weights.reshape(n, -1)

    rgb = patches.reshape(n, -1, 3).astype(np.float32) / np.float32(255.0)
    hed = rgb_to_hed(patches)  # (B, S, S, 3)
    rgb_mean, rgb_std = _masked_mean_std(rgb, flat_w)
    hed_mean, hed_std = _masked_mean_std(hed.reshape(n, -1, 3), flat_w)
    colour = np.stack([rgb_mean, rgb_std], axis=2).reshape(n, 6)
    stains = np.stack([hed_mean, hed_std], axis=2).reshape(n, 6)

    valid = flat_w > 0
    quantiles = np.concatenate(
        [_masked_quantiles(hed[..., c].reshape(n, -1), valid, (0.1, 0.5, 0.9)) for c in (0, 1)],
        axis=1,
    )

    grey_u8 = np.clip(
        patches[..., 0] * 0.2125 + patches[..., 1] * 0.7154 + patches[..., 2] * 0.0721 + 0.5,
        0,
        255,
    ).astype(np.uint8)
    grey_bins = (grey_u8.astype(np.int64) * 8) // 256
    hist = np.bincount(
        ((np.arange(n) * 8)[:, None, None] + grey_bins).ravel(),
        weights=weights.ravel(),
        minlength=n * 8,
    ).reshape(n, 8)
    hist /= hist.sum(axis=1, keepdims=True)

    quantised = (grey_u8.astype(np.int64) * glcm_levels) // 256
    glcm = glcm_features(quantised, glcm_levels)
    lbp = lbp_histograms(grey_u8)

    haem = ndimage.gaussian_filter(hed[..., 0], sigma=(0, 1.0, 1.0), truncate=2.0)
    strong = haem > NUCLEI_THRESHOLD
    peaks = strong & (haem == ndimage.maximum_filter(haem, size=(1, 3, 3), mode="nearest"))
    n_peaks = peaks.sum(axis=(1, 2))
    area = patches.shape[1] * patches.shape[2]
    nuclei = np.stack(
        [
            strong.mean(axis=(1, 2)),
            n_peaks * (1000.0 / area),
            np.where(n_peaks > 0, (haem * peaks).sum(axis=(1, 2)) / np.maximum(n_peaks, 1), 0.0),
        ],
        axis=1,
    )
    features = np.concatenate(
        [
            mask.mean(axis=(1, 2))[:, None],
            np.concatenate([colour.reshape(n, 3, 2), stains.reshape(n, 3, 2)], axis=1).reshape(
                n, 12
            ),
            quantiles,
            hist,
            glcm,
            lbp,
            nuclei,
        ],
        axis=1,
    )
    return features.astype(np.float32)
