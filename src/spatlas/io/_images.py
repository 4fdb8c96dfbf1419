"""Reading H&E images and their sizes without decoding whole slides when not needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._errors import SpatlasInputError
from ._validate import check_coordinates_in_image, reading

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".svs", ".ome.tif"}
# The most pixels read_image decodes into memory (2 Gpx: 6 GB of RGB, a 44,700 px square).
# Larger slides are read region by region from a tiled TIFF (spatlas.pp.morphology).
MAX_DECODED_PIXELS = 2_000_000_000
# The most pixels of Space Ranger's tissue_hires_image.png / tissue_lowres_image.png (Space
# Ranger writes at most 6,000 px on a side; a larger header is a damaged or foreign file).
MAX_TISSUE_IMAGE_PIXELS = 100_000_000


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def image_size(path: str | Path) -> tuple[int, int]:
    """Return (height, width) of an image file, reading only its header."""
    path = Path(path)
    if not path.exists():
        raise SpatlasInputError(f"{path}: image file does not exist")
    with reading(path, "image header", "give a TIFF, PNG or JPEG image"):
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].levels[0].shape
                axes = tif.series[0].levels[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # whole-slide images are large on purpose
        with Image.open(path) as im:
            width, height = im.size
        return int(height), int(width)


def _check_pixels(path: Path, shape: tuple[int, int], max_pixels: int, fix: str) -> None:
    height, width = shape
    if height * width > max_pixels:
        raise SpatlasInputError(
            f"{path}: image header says {width:,} x {height:,} px ({height * width / 1e6:,.0f} "
            f"Mpx), above the {max_pixels / 1e6:,.0f} Mpx spatlas decodes into memory; {fix}"
        )


def read_image(
    path: str | Path,
    *,
    max_pixels: int = MAX_DECODED_PIXELS,
    fix: str = "save it as a tiled TIFF, which spatlas reads region by region",
) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array (alpha dropped, greyscale expanded).

    The size in the header is checked against ``max_pixels`` before any pixel is decoded, so a
    damaged or hostile header cannot exhaust the memory.

    Parameters
    ----------
    path
        TIFF, PNG or JPEG file.
    max_pixels
        Refuse images with more pixels than this (default :data:`MAX_DECODED_PIXELS`).
    fix
        The advice given when the image is larger.
    """
    path = Path(path)
    if not path.exists():
        raise SpatlasInputError(f"{path}: image file does not exist")
    with reading(path, "image", "give an intact TIFF, PNG or JPEG image"):
        if _is_tiff(path):
            import tifffile

            _check_pixels(path, image_size(path), max_pixels, fix)
            arr = tifffile.imread(path, level=0)
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None  # the size is checked below, before decoding
            with Image.open(path) as im:
                width, height = im.size
                _check_pixels(path, (height, width), max_pixels, fix)
                im.load()
                if im.mode != "RGB":  # convert() copies: only when needed (peak memory)
                    im = im.convert("RGB")
                arr = np.asarray(im)
                del im
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise SpatlasInputError(f"{path}: expected an RGB image, got array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        # 16-bit or float scans: rescale to 8 bit
        arr = arr.astype(np.float64)
        hi = arr.max() or 1.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def check_fullres_image(path: str | Path, xy: np.ndarray, *, where: str) -> list[str]:
    """A sample's full-resolution image: it exists, its header reads, spots lie on it.

    A PNG / JPEG must also be small enough to decode (:data:`MAX_DECODED_PIXELS`): the
    morphology step decodes it whole, while a TIFF is read region by region.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path}: full-resolution image does not exist"]
    try:
        shape = image_size(path)
        if not _is_tiff(path):
            _check_pixels(
                path,
                shape,
                MAX_DECODED_PIXELS,
                "save it as a tiled TIFF, which spatlas reads region by region",
            )
    except SpatlasInputError as err:
        return err.problems
    return check_coordinates_in_image(xy, shape, what=f"full-resolution image {path}", where=where)
