"""Stain normalisation across the slides of a cohort: Macenko and Reinhard, one shared reference.

Stain statistics are fitted with torchstain's numpy normalisers, on tissue pixels only:

- per slide, on tissue pixels sampled under that slide's spots (so the slide's own stain vectors
  / colour statistics are what gets corrected, not each patch's: a per-patch fit would erase the
  colour differences between tissue types that the features should see);
- for the reference, on the same number of tissue pixels from every slide pooled (so no slide
  dominates), or on a user-supplied reference image.

The fitted per-slide transform is then applied to whole batches of patches at once (vectorised
over pixels). Tissue is told from background by optical density relative to the slide's
background colour (estimated on the image border), and near-black pixels (masked-out
background, as in some published images) are never tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..._errors import SpatlasInputError
from ..._logging import logger

STAIN_METHODS = ("macenko", "reinhard")
OD_THRESHOLD = 0.15  # optical density (natural log) above background counting as tissue
DARK_THRESHOLD = 30  # brightest channel below this: masked/black background, never tissue
DEFAULT_IO = 240.0  # transmitted light when the background cannot be estimated (Macenko's default)
MIN_TISSUE_PIXELS = 200


def background_colour(image, *, frame: float = 0.02) -> np.ndarray | None:
    """Median RGB of the image's outer frame (glass), or ``None`` for a dark (masked) border.

    ``image`` is an :class:`~spatlas.pp.morphology.OpenImage` or an (H, W, 3) array; only the
    four border strips are read.
    """
    from ._patches import OpenImage

    if not isinstance(image, OpenImage):
        image = OpenImage(np.asarray(image))
    height, width = image.shape
    t = max(1, int(frame * min(height, width)))
    strips = [
        image.read_region(0, t, 0, width),
        image.read_region(height - t, height, 0, width),
        image.read_region(0, height, 0, t),
        image.read_region(0, height, width - t, width),
    ]
    border = np.concatenate([s.reshape(-1, 3) for s in strips])
    colour = np.median(border, axis=0)
    if colour.max() < 100:  # black masked background: no glass colour to measure
        return None
    return colour.astype(np.float64)


def tissue_mask(
    pixels: np.ndarray,
    *,
    background: np.ndarray | None = None,
    od_threshold: float = OD_THRESHOLD,
) -> np.ndarray:
    """Boolean mask of tissue pixels in a (..., 3) uint8 array.

    A pixel is tissue when some channel's optical density relative to ``background`` (white when
    ``None``) exceeds ``od_threshold`` and it is not near-black.
    """
    bg = np.full(3, 255.0) if background is None else np.asarray(background, dtype=np.float64)
    # OD_c = log((bg_c + 1) / (I_c + 1)) > t  <=>  I_c < (bg_c + 1) exp(-t) - 1: integer compares
    limit = (bg + 1.0) * np.exp(-od_threshold) - 1.0
    pixels = np.asarray(pixels)
    below = (pixels[..., 0] < limit[0]) | (pixels[..., 1] < limit[1]) | (pixels[..., 2] < limit[2])
    return below & (pixels.max(axis=-1) >= DARK_THRESHOLD)


@dataclass
class SlideStain:
    """Fitted stain statistics of one slide (or of the reference).

    ``io``: transmitted light per channel (the slide's background); Macenko: ``stain_matrix``
    (3, 2) haematoxylin / eosin optical-density vectors and ``max_conc`` (2,) 99th-percentile
    concentrations; Reinhard: ``lab_mean`` and ``lab_std`` (3,) of tissue pixels in LAB.
    """

    io: np.ndarray
    n_pixels: int
    stain_matrix: np.ndarray | None = None
    max_conc: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None

    def as_dict(self) -> dict:
        """Plain lists, for ``uns`` metadata."""
        out: dict = {"io": self.io.tolist(), "n_pixels": int(self.n_pixels)}
        for name in ("stain_matrix", "max_conc", "lab_mean", "lab_std"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value).ravel().tolist()
        return out


@dataclass
class StainNormalizer:
    """Macenko or Reinhard normalisation of every slide to one reference.

    Use :meth:`fit_slide` on each slide's tissue pixels and :meth:`fit_reference` once, then
    :meth:`transform` batches of a slide's patches (or :func:`fit_stain_normalizer` on a
    :class:`~spatlas.pp.morphology.SpotPatches`, which does all of it).

    Parameters
    ----------
    method
        ``macenko`` (stain vectors by the angle percentiles of optical density in the plane of
        its two main components; concentrations rescaled to the reference's 99th percentiles) or
        ``reinhard`` (per-channel mean and standard deviation in LAB).
    alpha
        Macenko's angle percentile (robust extreme stain directions).
    beta
        Macenko's optical-density floor inside torchstain's fit.
    """

    method: str = "macenko"
    alpha: float = 1.0
    beta: float = OD_THRESHOLD
    reference: SlideStain | None = None
    slides: dict[str, SlideStain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise SpatlasInputError(
                f"stain normalisation must be one of {', '.join(STAIN_METHODS)} or none "
                f"(got {self.method!r})"
            )

    def fit_stats(self, pixels: np.ndarray, io: np.ndarray | None, *, where: str) -> SlideStain:
        """Stain statistics of (N, 3) uint8 tissue pixels (torchstain's numpy fit)."""
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

        pixels = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
        if pixels.shape[0] < MIN_TISSUE_PIXELS:
            raise SpatlasInputError(
                f"{where}: only {pixels.shape[0]} tissue pixels found under the spots; stain "
                f"normalisation needs at least {MIN_TISSUE_PIXELS} (check the image, or turn "
                "stain normalisation off)"
            )
        io_vec = np.full(3, DEFAULT_IO) if io is None else np.asarray(io, dtype=np.float64)
        if self.method == "macenko":
            fitter = NumpyMacenkoNormalizer()
            try:
                with np.errstate(all="ignore"):
                    fitter.fit(pixels[:, None, :], Io=io_vec, alpha=self.alpha, beta=self.beta)
            except (np.linalg.LinAlgError, ValueError, IndexError) as err:
                raise SpatlasInputError(f"{where}: Macenko stain fit failed ({err})") from None
            he, max_c = np.asarray(fitter.HERef), np.asarray(fitter.maxCRef)
            if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
                raise SpatlasInputError(
                    f"{where}: Macenko stain fit failed (too few stained pixels above the "
                    "optical-density floor)"
                )
            return SlideStain(io_vec, pixels.shape[0], stain_matrix=he, max_conc=max_c)
        fitter = NumpyReinhardNormalizer()
        fitter.fit(pixels[:, None, :])
        std = np.maximum(np.asarray(fitter.target_stds, dtype=np.float64), 1e-3)
        return SlideStain(
            io_vec,
            pixels.shape[0],
            lab_mean=np.asarray(fitter.target_means, dtype=np.float64),
            lab_std=std,
        )

    def fit_slide(self, sample: str, pixels: np.ndarray, background: np.ndarray | None) -> None:
        """Fit one slide from its tissue pixels and background colour."""
        self.slides[sample] = self.fit_stats(pixels, background, where=f"sample {sample}")

    def fit_reference(self, pixels: np.ndarray, io: np.ndarray | None) -> None:
        """Fit the reference from (pooled or reference-image) tissue pixels."""
        self.reference = self.fit_stats(pixels, io, where="stain reference")

    def transform(self, patches: np.ndarray, sample: str) -> np.ndarray:
        """Normalise (..., 3) uint8 pixels of slide ``sample`` to the reference (uint8 out)."""
        if self.reference is None or sample not in self.slides:
            raise RuntimeError("fit the reference and the slide before transform()")
        src, ref = self.slides[sample], self.reference
        shape = patches.shape
        px = patches.reshape(-1, 3).astype(np.float32)
        if self.method == "macenko":
            od = np.log(src.io.astype(np.float32)) - np.log(px + 1.0)  # -log((I + 1) / Io)
            conc = od @ np.linalg.pinv(src.stain_matrix).T.astype(np.float32)  # least squares
            conc *= (ref.max_conc / src.max_conc).astype(np.float32)
            out = ref.io.astype(np.float32) * np.exp(-conc @ ref.stain_matrix.T.astype(np.float32))
        else:
            from torchstain.numpy.utils import lab2rgb, lab_merge, lab_split, rgb2lab

            lab = np.stack(lab_split(rgb2lab(px / 255.0)), axis=-1)
            lab = (lab - src.lab_mean) * (ref.lab_std / src.lab_std) + ref.lab_mean
            lab = lab.astype(np.float32)
            out = lab2rgb(lab_merge(lab[:, 0], lab[:, 1], lab[:, 2])) * 255.0
        return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(shape)

    def as_dict(self) -> dict:
        """The fitted statistics, for ``uns`` metadata."""
        return {
            "method": self.method,
            "reference": self.reference.as_dict() if self.reference is not None else {},
            "slides": {s: st.as_dict() for s, st in self.slides.items()},
        }


def sample_tissue_pixels(
    pixels: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Up to ``n`` tissue pixels (N, 3) drawn without replacement from a (..., 3) array."""
    flat = pixels.reshape(-1, 3)
    tissue = flat[tissue_mask(flat, background=background)]
    if tissue.shape[0] > n:
        tissue = tissue[np.sort(rng.choice(tissue.shape[0], n, replace=False))]
    return tissue


def fit_stain_normalizer(
    patches,
    *,
    method: str = "macenko",
    reference: str | np.ndarray | None = None,
    n_spots: int = 500,
    n_pixels: int = 50_000,
    seed: int = 0,
) -> StainNormalizer:
    """Fit a :class:`StainNormalizer` to the slides of a :class:`SpotPatches`.

    Each slide is opened once: its background colour is measured on the image border and up to
    ``n_pixels`` tissue pixels are drawn from the windows of up to ``n_spots`` random spots.
    The reference is fitted on the same number of pixels from every slide pooled, or on the
    tissue pixels of ``reference`` (an image path or an (H, W, 3) array).
    """
    normalizer = StainNormalizer(method)
    rng = np.random.default_rng([seed, 17])
    pooled, backgrounds = {}, []
    transform, patches.transform = patches.transform, None  # fit on raw pixels
    try:
        order = patches.order()
        for sample in dict.fromkeys(patches.samples[order]):
            idx = order[patches.samples[order] == sample]
            if idx.size > n_spots:
                idx = np.sort(rng.choice(idx, n_spots, replace=False))
            image = patches._image(sample)
            bg = background_colour(image)
            windows = np.concatenate(
                [patches.native(idx[i : i + 256]) for i in range(0, idx.size, 256)]
            )
            pixels = sample_tissue_pixels(windows, n_pixels, rng, background=bg)
            normalizer.fit_slide(sample, pixels, bg)
            pooled[sample] = pixels
            if bg is not None:
                backgrounds.append(bg)
            logger.info(
                "stain (%s): sample %s, %d tissue pixels from %d spots, background %s",
                method,
                sample,
                pixels.shape[0],
                idx.size,
                "masked/dark" if bg is None else np.round(bg).astype(int).tolist(),
            )
            patches.close()
    finally:
        patches.transform = transform
        patches.close()
    if reference is None:
        share = min(p.shape[0] for p in pooled.values())
        ref_pixels = np.concatenate(
            [p[np.sort(rng.choice(p.shape[0], share, replace=False))] for p in pooled.values()]
        )
        ref_io = np.median(np.stack(backgrounds), axis=0) if backgrounds else None
        normalizer.fit_reference(ref_pixels, ref_io)
        logger.info(
            "stain (%s): reference fitted on %d tissue pixels from each of %d slides",
            method,
            share,
            len(pooled),
        )
    else:
        from ._patches import OpenImage, SlideImage

        if isinstance(reference, np.ndarray):
            ref_image = OpenImage(reference)
        else:
            ref_image = SlideImage("reference", "fullres", 1.0, path=str(reference)).open()
        try:
            height, width = ref_image.shape
            bg = background_colour(ref_image)
            pixels = ref_image.read_region(0, height, 0, width)
            ref_pixels = sample_tissue_pixels(pixels, n_pixels * 4, rng, background=bg)
        finally:
            ref_image.close()
        normalizer.fit_reference(ref_pixels, bg)
        logger.info("stain (%s): reference image, %d tissue pixels", method, ref_pixels.shape[0])
    return normalizer
