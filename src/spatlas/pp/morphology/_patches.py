"""Spot-centred H&E patches, gathered in batches from full-resolution, hires or lowres images.

A :class:`SlideImage` says where one sample's pixels live (a file, or an in-memory array) and how
its pixels relate to full-resolution pixels (``scale``: image pixels per full-resolution pixel).
Opening it gives an :class:`OpenImage` whose ``read_region`` returns a window of the slide:

- JPEG / PNG (Pillow): decoded once per slide and kept while the slide is open;
- TIFF: memory-mapped when its pixels are stored contiguously and uncompressed, otherwise read
  through tifffile's zarr store (tiled / pyramidal / compressed TIFFs), which decodes only the
  tiles a region touches;
- hires / lowres arrays (``uns['spatial'][sample]['images']``): views of the array.

:class:`SpotPatches` gathers a batch of square windows with index arithmetic from one region read
per batch (spots are visited in horizontal bands, so a batch's bounding box is a thin strip), pads
windows that cross the image border, and resamples them to the size an extractor wants with a
vectorised, antialiased bilinear filter. It is a map-style dataset (``len``, ``[i]``,
``__getitems__`` for batched fetching by a torch ``DataLoader``) and streams batches with
:meth:`SpotPatches.batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ... import _keys as K
from ..._errors import SpatlasInputError
from ..._logging import logger
from ...io._images import TIFF_SUFFIXES, read_image

IMAGE_CHOICES = ("auto", "fullres", "hires", "lowres")
PAD_MODES = ("constant", "reflect")
PAD_VALUE = 255  # white: glass / background in brightfield H&E, masked out as non-tissue
SMALL_PATCH_PX = 16.0  # below this many image pixels per spot diameter, patches carry little


@dataclass(frozen=True)
class SlideImage:
    """Where one sample's H&E pixels are.

    Attributes
    ----------
    sample
        Sample id.
    kind
        ``fullres``, ``hires`` or ``lowres``.
    scale
        Image pixels per full-resolution pixel (1 for the full-resolution image, the
        ``tissue_{hires,lowres}_scalef`` otherwise).
    path
        The image file (``fullres``), or ``None`` when ``array`` holds the pixels.
    array
        The in-memory (H, W, 3) uint8 image (``hires`` / ``lowres``).
    level
        For an OME-Zarr multiscale image (a SpatialData store's ``images/<name>`` folder): the
        pyramid level read (its array's path in the group; ``None``: the finest). ``scale`` is
        that level's.
    """

    sample: str
    kind: str
    scale: float
    path: str | None = None
    array: np.ndarray | None = None
    level: str | None = None

    def pyramid(self) -> list[tuple[str, float]]:
        """Levels of an OME-Zarr multiscale image, finest first (``[]`` for other images).

        Each is ``(level path, image pixels per full-resolution pixel)``.
        """
        if self.path is None or not Path(self.path).is_dir():
            return []
        levels = zarr_levels(Path(self.path))
        if not levels:
            return []
        base = levels[0][1][-1]
        current = next((w for p, (_, w) in levels if p == self.level), base)
        return [(p, self.scale * w / current) for p, (_, w) in levels]

    def open(self) -> OpenImage:
        """Open the image for reading regions (decodes a JPEG/PNG once)."""
        if self.array is not None:
            return OpenImage(_as_rgb_array(self.array, where=f"{self.sample} {self.kind} image"))
        assert self.path is not None
        path = Path(self.path)
        if not path.exists():
            raise SpatlasInputError(
                f"{path}: full-resolution image of sample {self.sample} does not exist"
            )
        if path.is_dir():
            return _open_zarr_level(path, self.level)
        if "".join(path.suffixes[-2:]).lower() in TIFF_SUFFIXES or path.suffix.lower() in (
            TIFF_SUFFIXES
        ):
            return _open_tiff(path)
        return OpenImage(read_image(path))

    def describe(self) -> str:
        """``path`` or ``uns images['hires']``, for logs and metadata."""
        return (
            self.path if self.path else f"uns['spatial']['{self.sample}']['images']['{self.kind}']"
        )


class OpenImage:
    """An open slide: ``shape`` (H, W) and ``read_region`` returning (h, w, 3) uint8 pixels.

    ``pixels`` is anything sliceable as ``pixels[y0:y1, x0:x1]`` giving (h, w, 3) (an array, a
    memory map or a zarr array); ``channels_first`` marks (3, H, W) storage.
    """

    def __init__(self, pixels, *, channels_first: bool = False, handle=None) -> None:
        self.pixels = pixels
        self.channels_first = channels_first
        self._handle = handle
        shape = pixels.shape
        self.shape = (
            (int(shape[1]), int(shape[2])) if channels_first else (int(shape[0]), int(shape[1]))
        )
        self.n_region_reads = 0

    def read_region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of rows ``y0:y1`` and columns ``x0:x1`` (inside the image) as (h, w, 3) uint8."""
        self.n_region_reads += 1
        if self.channels_first:
            region = np.moveaxis(np.asarray(self.pixels[:, y0:y1, x0:x1]), 0, -1)
        else:
            region = np.asarray(self.pixels[y0:y1, x0:x1])
        return _to_uint8_rgb(region)

    def close(self) -> None:
        """Release the file (and the decoded pixels)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.pixels = None

    def __enter__(self) -> OpenImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_tiff(path: Path) -> OpenImage:
    """Memory-map a contiguous TIFF, or open a tiled / compressed one as a zarr store."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise SpatlasInputError(f"{path}: cannot read TIFF ({err})") from None
    level = tif.series[0].levels[0]
    axes = level.axes
    if axes not in ("YXS", "YX", "SYX", "CYX", "YXC"):
        tif.close()
        raise SpatlasInputError(
            f"{path}: unsupported TIFF layout (axes {axes}); expected an RGB or greyscale image"
        )
    channels_first = axes[0] in "SC"
    try:
        pixels = tifffile.memmap(path, mode="r", series=0, level=0)
        logger.debug("%s: memory-mapped (%s)", path.name, axes)
    except (ValueError, OSError):
        import zarr

        pixels = zarr.open(level.aszarr(), mode="r")
        logger.debug("%s: tiled/compressed TIFF read through a zarr store (%s)", path.name, axes)
    return OpenImage(pixels, channels_first=channels_first, handle=tif)


def _multiscales(attrs) -> list[dict]:
    """The ``multiscales`` list of OME-NGFF attributes (0.4 at the top, 0.5 under ``ome``)."""
    attrs = dict(attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]
    return list(attrs.get("multiscales") or [])


def zarr_levels(path: Path) -> list[tuple[str, tuple[int, int]]]:
    """Levels of an OME-Zarr multiscale image folder, finest first.

    Each is ``(array path, (height, width))``; ``[]`` when ``path`` is not such a folder.
    """
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        multiscales = _multiscales(group.attrs)
    except Exception:  # not a zarr group: the caller reports it
        return []
    if not multiscales:
        return []
    names = [d["path"] for d in multiscales[0].get("datasets", [])]
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])]
    out = []
    for name in names:
        shape = group[name].shape
        y = axes.index("y") if "y" in axes else len(shape) - 2
        x = axes.index("x") if "x" in axes else len(shape) - 1
        out.append((name, (int(shape[y]), int(shape[x]))))
    return sorted(out, key=lambda lv: -lv[1][1])


def _open_zarr_level(path: Path, level: str | None) -> OpenImage:
    """One level of an OME-Zarr multiscale image, read lazily (only the chunks a region needs)."""
    import zarr

    levels = zarr_levels(path)
    if not levels:
        raise SpatlasInputError(
            f"{path}: a folder, but not an OME-Zarr multiscale image (a SpatialData store's "
            "images/<name>); give an image file or the image folder inside the store"
        )
    group = zarr.open_group(str(path), mode="r")
    name = level if level is not None else levels[0][0]
    axes = [
        a["name"] if isinstance(a, dict) else a
        for a in _multiscales(group.attrs)[0].get("axes", [])
    ]
    pixels = group[name]
    if (axes and axes[0] == "c") or (
        not axes and pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4)
    ):
        return OpenImage(pixels, channels_first=True)
    if pixels.ndim == 2:
        return OpenImage(pixels)
    raise SpatlasInputError(f"{path}: image axes {axes} not understood; expected (c, y, x)")


def _as_rgb_array(image: np.ndarray, *, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
        return image
    raise SpatlasInputError(f"{where}: expected an (H, W, 3) image, got shape {image.shape}")


def _to_uint8_rgb(region: np.ndarray) -> np.ndarray:
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    region = region[..., :3]
    if region.dtype == np.uint8:
        return region
    if np.issubdtype(region.dtype, np.integer):  # e.g. 16-bit scans: by the dtype's range
        return (region.astype(np.float32) * (255.0 / np.iinfo(region.dtype).max) + 0.5).astype(
            np.uint8
        )
    hi = 255.0 if region.max(initial=0) > 1.0 else 1.0  # float images in [0, 1] or [0, 255]
    return np.clip(region.astype(np.float32) * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# choosing each sample's image


def slide_images(
    adata, *, image: str = "auto", sample_key: str = K.SAMPLE
) -> dict[str, SlideImage]:
    """Pick one image per sample from ``uns['spatial']``.

    ``image='auto'`` prefers the full-resolution file (``metadata['fullres_image_path']``), then
    the hires, then the lowres array; ``fullres`` / ``hires`` / ``lowres`` insist on one.

    Raises
    ------
    SpatlasInputError
        One line per sample without a usable image or scalefactor.
    """
    if image not in IMAGE_CHOICES:
        raise SpatlasInputError(f"image must be one of {', '.join(IMAGE_CHOICES)} (got {image!r})")
    if sample_key not in adata.obs:
        raise SpatlasInputError(f"sample_key '{sample_key}' is not an obs column")
    spatial = adata.uns.get(K.SPATIAL, {})
    out, problems = {}, []
    for sample in adata.obs[sample_key].astype(str).unique():
        info = spatial.get(sample)
        if info is None:
            problems.append(
                f"sample {sample}: no uns['spatial']['{sample}'] (images, scalefactors)"
            )
            continue
        images = info.get(K.IMAGES, {}) or {}
        scalefactors = info.get(K.SCALEFACTORS, {}) or {}
        fullres = (info.get(K.METADATA, {}) or {}).get(K.FULLRES_PATH, "") or ""
        order = ("fullres", "hires", "lowres") if image == "auto" else (image,)
        chosen = None
        for kind in order:
            if kind == "fullres":
                if fullres:
                    scalef = float(scalefactors.get(K.FULLRES_SCALEF, 1.0))
                    chosen = SlideImage(sample, "fullres", scalef, path=str(fullres))
            elif kind in images:
                scalef = scalefactors.get(f"tissue_{kind}_scalef")
                if scalef is None:
                    problems.append(
                        f"sample {sample}: scalefactors lack tissue_{kind}_scalef, needed to place "
                        f"spots on the {kind} image"
                    )
                    break
                chosen = SlideImage(sample, kind, float(scalef), array=images[kind])
            if chosen is not None:
                break
        if chosen is None and not any(p.startswith(f"sample {sample}:") for p in problems):
            have = sorted(images) + (["fullres"] if fullres else [])
            problems.append(
                f"sample {sample}: no {'H&E image' if image == 'auto' else image + ' image'} "
                f"(has: {', '.join(have) or 'none'}); give the full-resolution image in the "
                "sample sheet's 'image' column or keep the hires/lowres PNGs in spatial/"
            )
        if chosen is not None:
            out[sample] = chosen
    if problems:
        raise SpatlasInputError(problems)
    return out


def spot_diameters(adata, samples: Sequence[str]) -> dict[str, float]:
    """``spot_diameter_fullres`` of each sample (clear error when missing)."""
    spatial = adata.uns.get(K.SPATIAL, {})
    out, problems = {}, []
    for sample in samples:
        sf = (spatial.get(sample, {}) or {}).get(K.SCALEFACTORS, {}) or {}
        if K.SPOT_DIAMETER not in sf or not float(sf[K.SPOT_DIAMETER]) > 0:
            problems.append(
                f"sample {sample}: scalefactors lack a positive '{K.SPOT_DIAMETER}' (the spot "
                "size in full-resolution pixels), needed to size the patches"
            )
            continue
        out[sample] = float(sf[K.SPOT_DIAMETER])
    if problems:
        raise SpatlasInputError(problems)
    return out


def _matching_level(image: SlideImage, window: float, out_size: int | None) -> SlideImage:
    """The pyramid level that matches the patch size.

    The coarsest level whose window of ``window`` full-resolution pixels is still at least
    ``out_size`` pixels across (the finest level when none is, or without ``out_size``).
    """
    levels = image.pyramid()
    if not levels or out_size is None:
        return image
    path, scale = levels[0]
    for p, s in levels:
        if window * s >= out_size * (1 - 1e-9):
            path, scale = p, s
    if path != (image.level or levels[0][0]):
        logger.debug("%s: patches read from pyramid level %s (x %.4g)", image.sample, path, scale)
    return replace(image, level=path, scale=scale)


# ---------------------------------------------------------------------------------------------
# windows and resampling


def window_starts(centres: np.ndarray, side: int) -> np.ndarray:
    """Top-left pixel of the ``side``-pixel window centred on each (continuous) centre.

    Pixel ``i`` has its centre at coordinate ``i``; for an odd side the window's middle pixel is
    the one nearest the centre, for an even side the window is split evenly about it.
    """
    return np.floor(np.asarray(centres, dtype=np.float64) - (side - 1) / 2.0 + 0.5).astype(np.int64)


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into [0, n) without repeating the edge pixel (numpy ``pad='reflect'``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def gather_windows(
    image: OpenImage,
    top: np.ndarray,
    left: np.ndarray,
    side: int,
    *,
    pad: str = "constant",
) -> np.ndarray:
    """Square windows (B, side, side, 3) uint8 with top-left corners ``top``, ``left``.

    The image is read once, as the bounding box of all windows clipped to the image; windows
    are then gathered from it by index arithmetic. Pixels outside the image are ``255`` (white,
    ``pad='constant'``) or mirrored (``pad='reflect'``).
    """
    height, width = image.shape
    offsets = np.arange(side)
    rows = top[:, None] + offsets  # (B, side)
    cols = left[:, None] + offsets
    if pad == "reflect":
        rows_in, cols_in = _reflect(rows, height), _reflect(cols, width)
    else:
        rows_in, cols_in = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    y0, y1 = int(rows_in.min()), int(rows_in.max()) + 1
    x0, x1 = int(cols_in.min()), int(cols_in.max()) + 1
    region = image.read_region(y0, y1, x0, x1)
    patches = region[(rows_in - y0)[:, :, None], (cols_in - x0)[:, None, :]]
    if pad == "constant":
        outside = ~(
            ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        )
        if outside.any():
            patches[outside] = PAD_VALUE
    return patches


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a bilinear (triangle) filter, widened when shrinking (antialias).

    The same filter Pillow's ``BILINEAR`` resize uses: output pixel ``i`` is centred on input
    coordinate ``(i + 0.5) * n_in / n_out``.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centre[:, None]) / support, 0.0, None)
    empty = w.sum(axis=1) == 0  # cannot happen for the triangle filter, kept for safety
    w[empty, np.clip(np.floor(centre[empty]).astype(int), 0, n_in - 1)] = 1.0
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """Resample (B, S, S, 3) uint8 patches to (B, size, size, 3), antialiased bilinear.

    Vectorised over the batch as two small matrix products (rows, then columns).
    """
    side = patches.shape[1]
    if side == size and patches.shape[2] == size:
        return patches
    ry = _resize_matrix(patches.shape[1], size)
    rx = _resize_matrix(patches.shape[2], size)
    x = patches.astype(np.float32)
    x = np.einsum("oi,bijc->bojc", ry, x, optimize=True)
    x = np.einsum("pj,bojc->bopc", rx, x, optimize=True)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the dataset

Transform = Callable[[np.ndarray, str], np.ndarray]


class SpotPatches:
    """Spot-centred patches of a cohort, extracted in batches (a map-style dataset).

    Parameters
    ----------
    images
        One :class:`SlideImage` per sample.
    samples
        (n,) sample id of each spot.
    xy
        (n, 2) spot centres (x, y) in full-resolution pixels.
    diameters
        Spot diameter in full-resolution pixels per sample (``spot_diameter_fullres``).
    patch_scale
        Patch side as a multiple of the spot diameter.
    out_size
        Side the patches are resampled to (``None``: each sample's native window side, which
        differs between samples when their spot sizes in image pixels differ).
    pad
        ``constant`` (white) or ``reflect`` for windows crossing the image border.
    transform
        ``transform(patches, sample) -> patches`` applied to native-resolution windows before
        resampling (stain normalisation).

    Notes
    -----
    ``sides[sample]`` is the window side in image pixels, ``round(diameter * scale *
    patch_scale)``; ``pixels_per_spot[sample]`` the spot diameter in image pixels (the effective
    resolution: a few pixels on a lowres image carry colour, not texture).
    """

    def __init__(
        self,
        images: Mapping[str, SlideImage],
        samples: np.ndarray,
        xy: np.ndarray,
        diameters: Mapping[str, float],
        *,
        patch_scale: float = 1.0,
        out_size: int | None = None,
        pad: str = "constant",
        transform: Transform | None = None,
    ) -> None:
        if pad not in PAD_MODES:
            raise SpatlasInputError(f"pad must be one of {', '.join(PAD_MODES)} (got {pad!r})")
        if not patch_scale > 0:
            raise SpatlasInputError(f"patch_scale must be positive (got {patch_scale})")
        self.samples = np.asarray(samples).astype(str)
        self.xy = np.asarray(xy, dtype=np.float64)
        if self.xy.shape != (self.samples.size, 2) or not np.isfinite(self.xy).all():
            raise SpatlasInputError("spot coordinates must be a finite (n_spots, 2) array (x, y)")
        missing = sorted(set(self.samples) - set(images))
        if missing:
            raise SpatlasInputError(f"no image for sample(s) {', '.join(missing)}")
        self.images = {
            s: _matching_level(im, float(diameters[s]) * patch_scale, out_size)
            for s, im in images.items()
        }
        images = self.images
        self.patch_scale = float(patch_scale)
        self.out_size = out_size
        self.pad = pad
        self.transform = transform
        self.pixels_per_spot = {s: float(diameters[s]) * images[s].scale for s in images}
        self.sides = {s: max(1, round(self.pixels_per_spot[s] * self.patch_scale)) for s in images}
        self._names = list(self.images)
        self._codes = pd.Index(self._names).get_indexer(self.samples)
        self._open: tuple[str, OpenImage] | None = None
        self.n_opens = 0

    def __len__(self) -> int:
        return self.samples.size

    # ----- reading
    def _image(self, sample: str) -> OpenImage:
        if self._open is not None and self._open[0] == sample:
            return self._open[1]
        self.close()
        image = self.images[sample].open()
        self.n_opens += 1
        self._open = (sample, image)
        return image

    def close(self) -> None:
        """Close the open slide (the next read opens its slide again)."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def native(self, indices: np.ndarray) -> np.ndarray:
        """Native-resolution windows (B, side, side, 3) of spots of one sample, transformed."""
        indices = np.asarray(indices, dtype=np.int64)
        sample = self.samples[indices[0]]
        if (self.samples[indices] != sample).any():
            raise ValueError("native() takes spots of one sample; use __getitems__ for a mix")
        slide = self.images[sample]
        side = self.sides[sample]
        centres = self.xy[indices] * slide.scale
        image = self._image(sample)
        patches = gather_windows(
            image,
            window_starts(centres[:, 1], side),
            window_starts(centres[:, 0], side),
            side,
            pad=self.pad,
        )
        if self.transform is not None:
            patches = self.transform(patches, sample)
        return patches

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches (B, out, out, 3) uint8 of any spots (grouped by sample internally)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.out_size is None and len({self.sides[s] for s in self.samples[indices]}) > 1:
            raise ValueError("spots of samples with different window sides need out_size")
        out = None
        for sample in dict.fromkeys(self.samples[indices]):
            pos = np.flatnonzero(self.samples[indices] == sample)
            patches = self.native(indices[pos])
            if self.out_size is not None:
                patches = resize_patches(patches, self.out_size)
            if out is None:
                out = np.empty((indices.size, *patches.shape[1:]), dtype=np.uint8)
            out[pos] = patches
        assert out is not None
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get_batch([int(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        # a torch DataLoader with batch_size calls this once per batch
        return list(self.get_batch(indices))

    # ----- streaming
    def order(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Spot indices grouped by sample, then in horizontal bands of one window height."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        code = self._codes[indices]
        scale = np.array([self.images[s].scale for s in self._names])[code]
        side = np.array([self.sides[s] for s in self._names], dtype=np.float64)[code]
        band = np.floor(self.xy[indices, 1] * scale / side)
        return indices[np.lexsort((self.xy[indices, 0], band, code))]

    def batches(
        self, batch_size: int = 64, indices: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(spot indices, patches)`` batches; each slide is opened once.

        Batches never mix samples; within a sample spots are visited in horizontal bands so each
        batch reads one thin strip of the slide.
        """
        if batch_size < 1:
            raise SpatlasInputError(f"batch_size must be at least 1 (got {batch_size})")
        ordered = self.order(indices)
        try:
            for sample in dict.fromkeys(self.samples[ordered]):
                idx = ordered[self.samples[ordered] == sample]
                for start in range(0, idx.size, batch_size):
                    chunk = idx[start : start + batch_size]
                    patches = self.native(chunk)
                    if self.out_size is not None:
                        patches = resize_patches(patches, self.out_size)
                    yield chunk, patches
                self.close()
        finally:
            self.close()

    def torch_dataset(self):
        """The same patches as a ``torch.utils.data.Dataset`` (batched fetching kept)."""
        from ..._deps import import_optional

        torch = import_optional("torch", purpose="SpotPatches.torch_dataset")
        outer = self

        class _TorchSpotPatches(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(outer)

            def __getitem__(self, index: int) -> np.ndarray:
                return outer[index]

            def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
                return outer.__getitems__(indices)

        return _TorchSpotPatches()

    @classmethod
    def from_adata(
        cls,
        adata,
        *,
        image: str = "auto",
        sample_key: str = K.SAMPLE,
        patch_scale: float = 1.0,
        out_size: int | None = None,
        pad: str = "constant",
        transform: Transform | None = None,
    ) -> SpotPatches:
        """Patches of every spot of a cohort (images chosen by :func:`slide_images`)."""
        if K.SPATIAL not in adata.obsm:
            raise SpatlasInputError(
                "obsm['spatial'] (spot centres in full-resolution pixels) is missing"
            )
        images = slide_images(adata, image=image, sample_key=sample_key)
        diameters = spot_diameters(adata, list(images))
        patches = cls(
            images,
            adata.obs[sample_key].astype(str).to_numpy(),
            np.asarray(adata.obsm[K.SPATIAL])[:, :2],
            diameters,
            patch_scale=patch_scale,
            out_size=out_size,
            pad=pad,
            transform=transform,
        )
        for sample, slide in images.items():
            px = patches.pixels_per_spot[sample]
            log = logger.warning if px < SMALL_PATCH_PX else logger.info
            log(
                "morphology: sample %s patches from the %s image (%s): %.1f image pixels per spot "
                "diameter, window %d px%s",
                sample,
                slide.kind,
                slide.describe(),
                px,
                patches.sides[sample],
                " - tiny: colour only, little texture" if px < SMALL_PATCH_PX else "",
            )
        return patches
