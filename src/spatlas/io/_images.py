"""Reading H&E images and their sizes without decoding whole slides when not needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._errors import SpatlasInputError

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".svs", ".ome.tif"}


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def image_size(path: str | Path) -> tuple[int, int]:
    """Return (height, width) of an image file, reading only its header."""
    path = Path(path)
    try:
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
    except (OSError, ValueError, KeyError) as err:
        raise SpatlasInputError(f"{path}: cannot read image header ({err})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array (alpha dropped, greyscale expanded)."""
    path = Path(path)
    try:
        if _is_tiff(path):
            import tifffile

            arr = tifffile.imread(path, level=0) if path.exists() else None
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as im:
                im.load()
                if im.mode != "RGB":  # convert() copies: only when needed (peak memory)
                    im = im.convert("RGB")
                arr = np.asarray(im)
                del im
    except (OSError, ValueError) as err:
        raise SpatlasInputError(f"{path}: cannot read image ({err})") from None
    if arr is None:
        raise SpatlasInputError(f"{path}: image file does not exist")
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
