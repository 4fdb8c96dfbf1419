"""Reading one Space Ranger output folder (Visium, Visium HD bins) into AnnData."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ._images import MAX_TISSUE_IMAGE_PIXELS, check_fullres_image, read_image
from ._tenx import read_10x_h5, read_10x_mtx
from ._validate import (
    check_coordinates_in_image,
    check_counts,
    check_scalefactors,
    check_unique,
    first_duplicate,
    open_maybe_gzip,
    reading,
)

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
# file names in the order Space Ranger versions introduced them; each may be gzipped
POSITION_FILES = ["tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"]
COUNT_FILES = ["filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix"]
CELL_COUNT_FILES = ["filtered_feature_cell_matrix.h5", "filtered_feature_cell_matrix"]
# Space Ranger HD cell segmentation polygons, in the order they are preferred
CELL_SHAPE_FILES = [
    "cell_segmentations.geojson",
    "graphclust_annotated_cell_segmentations.geojson",
]
HD_BINS = "binned_outputs"
HD_CELLS = "segmented_outputs"
DEFAULT_HD_BIN = 8  # µm: 10x's recommended bin for analysis
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
SCALEFACTORS_FILE = "scalefactors_json.json"


def _find(folder: Path, names: list[str]) -> Path | None:
    """First of ``names`` (or ``name.gz``) in ``folder/spatial`` or ``folder``."""
    for name in names:
        for base in (folder / "spatial", folder):
            for candidate in (base / name, base / f"{name}.gz"):
                if candidate.exists():
                    return candidate
    return None


def read_positions(path: str | Path) -> pd.DataFrame:
    """Read spot positions in any Space Ranger layout, indexed by barcode.

    Handles ``tissue_positions_list.csv`` (Space Ranger 1.x, no header),
    ``tissue_positions.csv`` (2.x, header) and ``tissue_positions.parquet`` (Visium HD),
    gzipped or not. Columns: in_tissue, array_row, array_col, pxl_row_in_fullres,
    pxl_col_in_fullres.
    """
    path = Path(path)
    fix = "copy spatial/ again from the Space Ranger run of this sample"
    with reading(path, "spot positions", fix):
        if ".parquet" in path.suffixes:
            df = pd.read_parquet(path)
        else:
            with open_maybe_gzip(path) as fh:
                df = pd.read_csv(fh, header=None, dtype=str, encoding="utf-8-sig")
            if df.iloc[0, 0] == "barcode" or "in_tissue" in set(df.iloc[0]):
                df.columns = df.iloc[0]
                df = df.iloc[1:]
            elif df.shape[1] == len(POSITION_COLUMNS):
                df.columns = POSITION_COLUMNS
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise SpatlasInputError(
            f"{path}: positions file lacks column(s) {', '.join(missing)}; expected "
            f"{', '.join(POSITION_COLUMNS)} (with a header, or in that order without one)"
        )
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    try:
        for col in POSITION_COLUMNS[1:4]:
            df[col] = pd.to_numeric(df[col]).astype(np.int64)
        for col in POSITION_COLUMNS[4:]:
            df[col] = pd.to_numeric(df[col]).astype(np.float64)
    except (ValueError, TypeError) as err:
        raise SpatlasInputError(f"{path}: non-numeric spot positions ({err}); {fix}") from None
    problems = check_unique(
        df["barcode"].to_numpy(),
        what="barcode",
        where=str(path),
        units="rows",
        fix="each spot has one position; " + fix,
    )
    grid = df["array_row"].astype(str) + "," + df["array_col"].astype(str)
    problems += check_unique(
        grid.to_numpy(),
        what="array position (row,col)",
        where=str(path),
        units="rows",
        fix="two spots cannot share a place on the slide; " + fix,
    )
    if problems:
        raise SpatlasInputError(problems[:1])
    return df.set_index("barcode")


def read_scalefactors(path: str | Path) -> dict[str, float]:
    """Read ``scalefactors_json.json`` and check its numbers.

    ``spot_diameter_fullres``, ``tissue_hires_scalef`` and ``tissue_lowres_scalef`` (Space Ranger
    writes all three) are required; every scale factor and size present must be a positive,
    finite JSON number (not a string, a boolean, 0 or NaN).
    """
    path = Path(path)
    fix = "use the scalefactors_json.json that Space Ranger wrote for this sample"
    with (
        reading(path, "scalefactors (not valid JSON)", fix),
        open(path, encoding="utf-8-sig") as fh,
    ):
        sf = json.load(fh)
    if not isinstance(sf, dict):
        raise SpatlasInputError(
            f"{path}: scalefactors must be a JSON object of named numbers, got a "
            f"{type(sf).__name__}; {fix}"
        )
    problems = check_scalefactors(
        sf, where=str(path), required=(K.SPOT_DIAMETER, K.HIRES_SCALEF, K.LOWRES_SCALEF), fix=fix
    )
    if problems:
        raise SpatlasInputError(problems)
    return {
        str(k): float(v)
        for k, v in sf.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def read_spaceranger(
    path: str | Path,
    *,
    sample: str,
    donor: str | None = None,
    counts_file: str | Path | None = None,
    fullres_image: str | Path | None = None,
    load_images: bool = True,
    in_tissue_only: bool = True,
    bin: int | str | None = None,
) -> ad.AnnData:
    """Read one Space Ranger output folder (``outs/``) into AnnData.

    Parameters
    ----------
    path
        The folder holding ``filtered_feature_bc_matrix.h5`` (or the ``filtered_feature_bc_matrix/``
        mtx folder) and ``spatial/`` (positions, ``scalefactors_json.json``, images). For Visium HD,
        the ``outs/`` folder (choose the bins with ``bin``) or one ``binned_outputs/square_XXXum``
        folder.
    sample
        Sample id, stored in ``obs['sample']`` and as the key of ``uns['spatial']``.
    donor
        Donor id (``obs['donor']``); defaults to the sample id.
    counts_file
        A count matrix elsewhere than in ``path`` (``.h5`` file or mtx folder).
    fullres_image
        Path of the full-resolution H&E image (TIFF, JPEG, PNG). Its size is checked against the
        spot coordinates; pixels are read only by the morphology step.
    load_images
        Load ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` when present.
    in_tissue_only
        Keep only spots under tissue (``in_tissue == 1``).
    bin
        Visium HD only: the bin side in µm (``8`` reads ``binned_outputs/square_008um``; 2, 8 and
        16 are what Space Ranger writes), or ``'cells'`` for the cell segmentation
        (``segmented_outputs/``: one observation per cell, placed at its polygon's centroid, with
        the median cell's equivalent diameter as the spot size). Default for an HD ``outs/``
        folder: 8 µm bins. Square bins get the bin side as ``spot_diameter_fullres`` (the patch
        size) and their ``array_row`` / ``array_col`` on the square lattice of bins.

    Returns
    -------
    AnnData with raw counts in ``X`` (float32 CSR); ``obs``: ``barcode``, ``in_tissue``,
    ``array_row``, ``array_col``, ``sample``, ``donor``; ``obsm['spatial']``: (x, y) in
    full-resolution pixels; ``uns['spatial'][sample]``: ``images`` (``hires``/``lowres`` uint8
    arrays), ``scalefactors`` and ``metadata`` (source folder, full-resolution image path).

    Raises
    ------
    SpatlasInputError
        With one line per problem found (missing files, barcodes without positions, counts that
        are not raw integer counts, coordinates outside the images, an empty sample); an
        unexpected error inside a reader also becomes one line naming the folder.
    """
    with reading(path, "Space Ranger output", "check that it is an intact Space Ranger outs/"):
        path = hd_folder(Path(path), bin)
        if path.name == HD_CELLS:
            return _read_hd_cells(
                path,
                sample=sample,
                donor=donor,
                fullres_image=fullres_image,
                load_images=load_images,
            )
        return _read_spaceranger(
            path,
            sample=sample,
            donor=donor,
            counts_file=counts_file,
            fullres_image=fullres_image,
            load_images=load_images,
            in_tissue_only=in_tissue_only,
        )


def _read_spaceranger(
    path: Path,
    *,
    sample: str,
    donor: str | None,
    counts_file: str | Path | None,
    fullres_image: str | Path | None,
    load_images: bool,
    in_tissue_only: bool,
) -> ad.AnnData:
    if not path.exists():
        raise SpatlasInputError(f"{path}: folder does not exist")
    if not path.is_dir():
        raise SpatlasInputError(
            f"{path}: not a folder; give the Space Ranger output folder (outs/) or an .h5ad file"
        )
    counts_path = Path(counts_file) if counts_file is not None else _find(path, COUNT_FILES)
    positions_path = _find(path, POSITION_FILES)
    scalefactors_path = _find(path, [SCALEFACTORS_FILE])
    problems = []
    if counts_path is None or not counts_path.exists():
        problems.append(
            f"{path}: no count matrix (looked for filtered_feature_bc_matrix.h5 and the "
            "filtered_feature_bc_matrix/ folder)"
            if counts_file is None
            else f"{counts_file}: count matrix does not exist"
        )
    if positions_path is None:
        problems.append(
            f"{path}: no spot positions (looked for spatial/tissue_positions.parquet, "
            "tissue_positions.csv and tissue_positions_list.csv)"
        )
    if scalefactors_path is None:
        problems.append(
            f"{path}: no spatial/{SCALEFACTORS_FILE}; spatlas needs it for the spot size and to "
            "place spots on the images (copy it from the Space Ranger run of this sample)"
        )
    if fullres_image is not None and not Path(fullres_image).exists():
        problems.append(f"{fullres_image}: full-resolution image does not exist")
    if problems:
        raise SpatlasInputError(problems)

    assert counts_path is not None and positions_path is not None and scalefactors_path is not None
    counts = read_10x_h5(counts_path) if counts_path.is_file() else read_10x_mtx(counts_path)
    positions = read_positions(positions_path)
    scalefactors = read_scalefactors(scalefactors_path)

    unknown = counts.obs_names.difference(positions.index)
    if len(unknown):
        raise SpatlasInputError(
            f"{path}: {len(unknown)} of {counts.n_obs} barcodes in the count matrix have no "
            "position "
            f"in {positions_path.name} (e.g. {', '.join(unknown[:3])}); the count matrix and the "
            "spatial/ folder come from different runs or samples"
        )
    positions = positions.loc[counts.obs_names]
    if in_tissue_only:
        keep = positions["in_tissue"].to_numpy() == 1
        if not keep.all():
            logger.info("%s: keeping %d of %d barcodes under tissue", sample, keep.sum(), keep.size)
        counts, positions = counts[keep].copy(), positions.loc[keep]

    problems.extend(check_counts(counts.X, where=str(counts_path)))
    if counts.n_obs == 0 or counts.n_vars == 0:
        problems.append(
            f"{path}: sample is empty ({counts.n_obs} spots under tissue x {counts.n_vars} genes)"
        )

    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    images, image_problems = _load_images(path, scalefactors, xy, load_images, fullres_image)
    problems.extend(image_problems)
    if problems:
        raise SpatlasInputError(problems)
    _bin_side(scalefactors, sample)

    obs = pd.DataFrame(
        {
            K.BARCODE: counts.obs_names.astype(str),
            K.IN_TISSUE: positions["in_tissue"].to_numpy(),
            K.ARRAY_ROW: positions["array_row"].to_numpy(),
            K.ARRAY_COL: positions["array_col"].to_numpy(),
        },
        index=counts.obs_names,
    )
    adata = ad.AnnData(X=counts.X, obs=obs, var=counts.var)
    _finish(adata, xy, images, scalefactors, path, fullres_image, sample=sample, donor=donor)
    return adata


def _finish(
    adata: ad.AnnData,
    xy: np.ndarray,
    images: dict[str, np.ndarray],
    scalefactors: dict[str, float],
    path: Path,
    fullres_image: str | Path | None,
    *,
    sample: str,
    donor: str | None,
) -> None:
    adata.obsm[K.SPATIAL] = xy
    adata.uns[K.SPATIAL] = {
        sample: {
            K.IMAGES: images,
            K.SCALEFACTORS: scalefactors,
            K.METADATA: {
                "source": str(path.resolve()),
                K.FULLRES_PATH: str(Path(fullres_image).resolve()) if fullres_image else "",
            },
        }
    }
    set_sample_donor(adata, sample=sample, donor=donor)


def _load_images(
    path: Path,
    scalefactors: dict[str, float],
    xy: np.ndarray,
    load_images: bool,
    fullres_image: str | Path | None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The hires / lowres PNGs of ``spatial/``, and the spots checked against every image."""
    images: dict[str, np.ndarray] = {}
    problems: list[str] = []
    if load_images:
        for res, name in IMAGE_FILES.items():
            img_path = _find(path, [name])
            if img_path is not None:
                images[res] = read_image(
                    img_path,
                    max_pixels=MAX_TISSUE_IMAGE_PIXELS,
                    fix=f"Space Ranger writes it at most 6,000 px wide: copy {name} again from "
                    "the Space Ranger run of this sample",
                )
    for res, img in images.items():
        scalef = scalefactors[f"tissue_{res}_scalef"]
        problems.extend(
            check_coordinates_in_image(
                xy * scalef,
                img.shape[:2],
                what=f"tissue_{res}_image.png (x {scalef:g})",
                where=str(path),
            )
        )
    if fullres_image is not None:
        problems.extend(check_fullres_image(fullres_image, xy, where=str(path)))
    return images, problems


def _bin_side(scalefactors: dict[str, float], sample: str) -> None:
    """Visium HD bins: the spot size is the bin side (``bin_size_um / microns_per_pixel``)."""
    side_um, um_per_px = scalefactors.get("bin_size_um"), scalefactors.get("microns_per_pixel")
    if side_um is None or um_per_px is None:
        return
    side = float(side_um) / float(um_per_px)
    if not np.isclose(scalefactors[K.SPOT_DIAMETER], side, rtol=1e-3):
        logger.info(
            "%s: %g µm bins: spot size %.2f px (bin_size_um / microns_per_pixel), not the "
            "scalefactors' spot_diameter_fullres %.2f",
            sample,
            side_um,
            side,
            scalefactors[K.SPOT_DIAMETER],
        )
    scalefactors[K.SPOT_DIAMETER] = side


# ---------------------------------------------------------------------------------------------
# Visium HD


def parse_bin(value: int | str | None, *, where: str) -> int | str | None:
    """A sample sheet's ``bin``: a bin side in µm (``8``, ``'8'``, ``'8um'``) or ``'cells'``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpatlasInputError(f"{where}: bin must be a bin side in µm (2, 8, 16) or 'cells'")
    text = str(value).strip().lower().removesuffix("µm").removesuffix("um").strip()
    if text in ("cells", "cell"):
        return "cells"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise SpatlasInputError(
        f"{where}: bin is {value!r}; give a bin side in µm (2, 8 or 16, as Space Ranger writes "
        "binned_outputs/square_008um) or 'cells' for the cell segmentation"
    )


def _hd_choices(path: Path) -> list[str]:
    bins = sorted(
        int(p.name[len("square_") : -2])
        for p in (path / HD_BINS).glob("square_*um")
        if p.is_dir() and p.name[len("square_") : -2].isdigit()
    )
    cells = ["cells"] if (path / HD_CELLS).is_dir() else []
    return [str(b) for b in bins] + cells


def hd_folder(path: Path, bin: int | str | None) -> Path:
    """The folder one Visium HD sample is read from: a bin size's folder or the cells'.

    ``path`` is an HD ``outs/`` folder (it holds ``binned_outputs/`` or ``segmented_outputs/``),
    or already one ``square_XXXum`` / ``segmented_outputs`` folder; any other folder is returned
    as it is (``bin`` must then be ``None``).
    """
    bin = parse_bin(bin, where=str(path))
    is_hd = (path / HD_BINS).is_dir() or (path / HD_CELLS).is_dir()
    if not is_hd:
        if bin is None:
            return path
        name = "segmented_outputs" if bin == "cells" else f"square_{bin:03d}um"
        if path.name == name:
            return path
        raise SpatlasInputError(
            f"{path}: bin is {bin} but this is not a Visium HD outs/ folder (no binned_outputs/ "
            "or segmented_outputs/ in it); point path at the HD outs/ folder, or drop bin"
        )
    choices = _hd_choices(path)
    if bin is None:
        if str(DEFAULT_HD_BIN) not in choices:
            raise SpatlasInputError(
                f"{path}: a Visium HD output without {HD_BINS}/square_{DEFAULT_HD_BIN:03d}um; "
                f"choose the bins with the sample sheet's bin column (here: "
                f"{', '.join(choices) or 'none'})"
            )
        logger.info("%s: Visium HD, reading the %d µm bins (bin: to choose)", path, DEFAULT_HD_BIN)
        bin = DEFAULT_HD_BIN
    chosen = path / HD_CELLS if bin == "cells" else path / HD_BINS / f"square_{bin:03d}um"
    if not chosen.is_dir():
        raise SpatlasInputError(
            f"{path}: no {chosen.relative_to(path)}/ for bin {bin}; this output has bin(s): "
            f"{', '.join(choices) or 'none'}"
        )
    return chosen


def _cell_number(barcode: str) -> int | None:
    """Space Ranger's cell barcode ``cellid_000000042-1`` (or a bare ``42``) -> 42."""
    text = barcode.removeprefix("cellid_").split("-")[0]
    return int(text) if text.isdigit() else None


def read_cell_polygons(path: Path) -> pd.DataFrame:
    """Cell polygons of a GeoJSON (Space Ranger HD segmentation): centroid and area per cell.

    Returns a frame indexed by the integer ``cell_id`` with ``x``, ``y`` (the polygon's
    centroid, full-resolution pixels) and ``area`` (pixels²). A MultiPolygon counts by its
    largest part.
    """
    fix = "copy segmented_outputs/ again from the Space Ranger HD run of this sample"
    with reading(path, "cell segmentation GeoJSON", fix), open_maybe_gzip(path) as fh:
        data = json.load(fh)
    features = data.get("features") if isinstance(data, dict) else None
    if not isinstance(features, list) or not features:
        raise SpatlasInputError(f"{path}: no GeoJSON features (cell polygons); {fix}")
    ids, xs, ys, areas = [], [], [], []
    for i, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") or {}
        props = (feature or {}).get("properties") or {}
        cell = props.get("cell_id", feature.get("id"))
        try:
            cell = int(cell)
        except (TypeError, ValueError):
            raise SpatlasInputError(
                f"{path}: feature {i} has no integer properties.cell_id; {fix}"
            ) from None
        rings = []
        if geometry.get("type") == "Polygon":
            rings = [geometry["coordinates"][0]]
        elif geometry.get("type") == "MultiPolygon":
            rings = [poly[0] for poly in geometry["coordinates"]]
        if not rings:
            raise SpatlasInputError(f"{path}: cell {cell} is not a Polygon; {fix}")
        best = None
        for ring in rings:
            pts = np.asarray(ring, dtype=np.float64)[:, :2]
            x, y = pts[:, 0], pts[:, 1]
            x1, y1 = np.roll(x, -1), np.roll(y, -1)
            cross = x * y1 - x1 * y
            area = cross.sum() / 2.0
            if area == 0:
                centre = (x.mean(), y.mean())
            else:
                centre = ((x + x1) @ cross / (6 * area), (y + y1) @ cross / (6 * area))
            if best is None or abs(area) > best[2]:
                best = (centre[0], centre[1], abs(area))
        assert best is not None
        ids.append(cell)
        xs.append(best[0])
        ys.append(best[1])
        areas.append(best[2])
    table = pd.DataFrame({"x": xs, "y": ys, "area": areas}, index=pd.Index(ids, name="cell_id"))
    dup = first_duplicate(table.index)
    if dup is not None:
        raise SpatlasInputError(f"{path}: cell_id {dup[0]} has two polygons; {fix}")
    return table


def _read_hd_cells(
    path: Path,
    *,
    sample: str,
    donor: str | None,
    fullres_image: str | Path | None,
    load_images: bool,
) -> ad.AnnData:
    """Space Ranger HD ``segmented_outputs/``: one observation per segmented cell."""
    counts_path = _find(path, CELL_COUNT_FILES)
    shapes_path = next((path / n for n in CELL_SHAPE_FILES if (path / n).exists()), None)
    scalefactors_path = _find(path, [SCALEFACTORS_FILE])
    problems = []
    if counts_path is None:
        problems.append(f"{path}: no filtered_feature_cell_matrix.h5 (the cells' counts)")
    if shapes_path is None:
        problems.append(f"{path}: no {' or '.join(CELL_SHAPE_FILES)} (the cell polygons)")
    if scalefactors_path is None:
        problems.append(f"{path}: no spatial/{SCALEFACTORS_FILE}")
    if fullres_image is not None and not Path(fullres_image).exists():
        problems.append(f"{fullres_image}: full-resolution image does not exist")
    if problems:
        raise SpatlasInputError(problems)
    assert counts_path is not None and shapes_path is not None and scalefactors_path is not None
    counts = read_10x_h5(counts_path) if counts_path.is_file() else read_10x_mtx(counts_path)
    cells = read_cell_polygons(shapes_path)
    scalefactors = read_scalefactors(scalefactors_path)
    numbers = [_cell_number(str(b)) for b in counts.obs_names]
    unknown = [b for b, n in zip(counts.obs_names, numbers, strict=True) if n not in cells.index]
    if unknown:
        raise SpatlasInputError(
            f"{path}: {len(unknown)} of {counts.n_obs} cells in {counts_path.name} have no "
            f"polygon in {shapes_path.name} (e.g. {', '.join(unknown[:3])}); the count matrix "
            "and the segmentation come from different runs"
        )
    problems.extend(check_counts(counts.X, where=str(counts_path)))
    if counts.n_obs == 0 or counts.n_vars == 0:
        problems.append(f"{path}: sample is empty ({counts.n_obs} cells x {counts.n_vars} genes)")
    placed = cells.loc[numbers]
    xy = placed[["x", "y"]].to_numpy(np.float64)
    images, image_problems = _load_images(path, scalefactors, xy, load_images, fullres_image)
    problems.extend(image_problems)
    if problems:
        raise SpatlasInputError(problems)
    diameter = 2.0 * np.sqrt(placed["area"].to_numpy() / np.pi)
    scalefactors[K.SPOT_DIAMETER] = float(np.median(diameter))
    obs = pd.DataFrame(
        {
            K.BARCODE: counts.obs_names.astype(str),
            K.IN_TISSUE: np.ones(counts.n_obs, dtype=np.int64),
            K.CELL_AREA: placed["area"].to_numpy(),
        },
        index=counts.obs_names,
    )
    adata = ad.AnnData(X=counts.X, obs=obs, var=counts.var)
    _finish(adata, xy, images, scalefactors, path, fullres_image, sample=sample, donor=donor)
    logger.info(
        "%s: %d segmented cells, median diameter %.1f px", sample, adata.n_obs, np.median(diameter)
    )
    return adata


def set_sample_donor(adata: ad.AnnData, *, sample: str, donor: str | None) -> None:
    """Write ``obs['sample']`` and ``obs['donor']`` (donor defaults to the sample id)."""
    adata.obs[K.SAMPLE] = pd.Categorical([str(sample)] * adata.n_obs)
    adata.obs[K.DONOR] = pd.Categorical([str(donor if donor is not None else sample)] * adata.n_obs)
