"""SpatialData stores in and out (the ``spatialdata`` extra, imported lazily).

Reading (:func:`read_spatialdata`): one table holds the counts; each region it annotates (a
shapes element: Visium circles, Visium HD squares, segmented cells) is one sample. Spot / cell
positions are the shapes' centroids mapped through the store's coordinate transformations:

- when every image of the region maps to the shared coordinate system by a scale alone (the
  Visium layout ``spatialdata-io`` writes: shapes in full-resolution pixels, images scaled to
  them), positions stay in that coordinate system, which plays the role of Space Ranger's
  full-resolution pixels, and each image gets its scale factor;
- otherwise (translation, rotation, any affine) positions are mapped into the pixel frame of the
  region's largest image, which becomes the full-resolution frame.

Spot size: twice the circle radius, or the median cell's equivalent diameter
``2 sqrt(area / pi)`` for polygons, in the same frame. Images named ``*hires_image`` /
``*lowres_image`` are read into ``uns['spatial'][sample]['images']`` as Space Ranger's PNGs
would be; any other image (the full-resolution H&E) stays on disk and the morphology step reads
patches from the pyramid level that matches the patch size.

Writing (:func:`write_spatialdata_results`): a copy of each input store with a ``spatlas`` table
annotating the same regions (domains, embeddings, per-domain tables); the input is never
modified.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import _keys as K
from .._deps import import_optional
from .._errors import SpatlasInputError
from .._logging import logger
from ._spaceranger import set_sample_donor
from ._validate import check_counts, reading

RESULTS_TABLE = "spatlas"
_MAX_PREVIEW_SIDE = 2000  # px: the image kept in memory for maps when the H&E stays on disk
_ROLES = (("lowres", "lowres_image"), ("hires", "hires_image"))


def _spatialdata():
    return import_optional("spatialdata", purpose="reading and writing SpatialData stores")


def _open(sdata_or_path):
    sd = _spatialdata()
    if isinstance(sdata_or_path, str | Path):
        path = Path(sdata_or_path)
        if not path.exists():
            raise SpatlasInputError(f"{path}: SpatialData store does not exist")
        with reading(path, "SpatialData store", "give a store written by SpatialData (.zarr)"):
            return sd.read_zarr(path), path.resolve()
    if not isinstance(sdata_or_path, sd.SpatialData):
        raise SpatlasInputError(
            f"read_spatialdata takes a SpatialData object or the path of a .zarr store, got "
            f"{type(sdata_or_path).__name__}"
        )
    path = getattr(sdata_or_path, "path", None)
    return sdata_or_path, (Path(path).resolve() if path is not None else None)


def _pick_table(sdata, table: str | None, where: str) -> tuple[str, ad.AnnData]:
    names = list(sdata.tables.keys())
    if not names:
        raise SpatlasInputError(
            f"{where}: the SpatialData store has no table (spatlas needs the counts as a table "
            "annotating the spots / cells)"
        )
    if table is None:
        candidates = [n for n in names if n != RESULTS_TABLE] or names
        if len(candidates) > 1:
            raise SpatlasInputError(
                f"{where}: the store has several tables ({', '.join(names)}); choose one with "
                "table="
            )
        table = candidates[0]
    if table not in sdata.tables:
        raise SpatlasInputError(
            f"{where}: no table '{table}' in the SpatialData store (tables: {', '.join(names)})"
        )
    return table, sdata.tables[table]


def _table_keys(tab: ad.AnnData, where: str) -> tuple[list[str], str, str]:
    attrs = tab.uns.get("spatialdata_attrs") or {}
    region, region_key, instance_key = (
        attrs.get("region"),
        attrs.get("region_key"),
        attrs.get("instance_key"),
    )
    if region is None or region_key is None or instance_key is None:
        raise SpatlasInputError(
            f"{where}: the table annotates no region (uns['spatialdata_attrs'] needs region, "
            "region_key and instance_key; build it with spatialdata.models.TableModel.parse)"
        )
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    return regions, str(region_key), str(instance_key)


def _affine(element, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), float)


def _systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def _scale_only(m: np.ndarray, tol: float = 1e-9) -> float | None:
    """The scale of an isotropic scale-only 3x3 affine, else ``None``."""
    s = m[0, 0]
    ok = (
        abs(m[0, 1]) <= tol * abs(s)
        and abs(m[1, 0]) <= tol * abs(s)
        and abs(m[0, 2]) <= tol * max(1.0, abs(s))
        and abs(m[1, 2]) <= tol * max(1.0, abs(s))
        and s > 0
        and np.isclose(m[1, 1], s, rtol=1e-9)
    )
    return float(s) if ok else None


def _levels(image) -> list:
    """The image's pyramid levels as (c, y, x) arrays, finest first."""
    import xarray as xr

    if isinstance(image, xr.DataTree):  # a multiscale image
        return [
            image[name]["image"] if "image" in image[name] else next(iter(image[name].values()))
            for name in image.children
        ]
    return [image]


def _image_size(image) -> tuple[int, int]:
    level = _levels(image)[0]
    return int(level.sizes["y"]), int(level.sizes["x"])


def _centroids(shapes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (x, y) and diameters of the shapes, in their own coordinates."""
    geom = shapes.geometry
    kinds = set(geom.geom_type)
    if kinds <= {"Point"}:
        if "radius" not in shapes.columns:
            raise SpatlasInputError(
                f"{where}: the shapes are points without a 'radius' column; spatlas needs the "
                "spot size (circles: points with a radius)"
            )
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
        return xy, 2.0 * shapes["radius"].to_numpy(np.float64)
    if kinds <= {"Polygon", "MultiPolygon"}:
        c = geom.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()])
        return xy, 2.0 * np.sqrt(geom.area.to_numpy(np.float64) / np.pi)
    raise SpatlasInputError(
        f"{where}: shapes of type {', '.join(sorted(kinds))}; spatlas reads circles (points "
        "with a radius) and polygons"
    )


def _map(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def read_spatialdata(
    sdata_or_path,
    *,
    table: str | None = None,
    region: str | None = None,
    sample: str | None = None,
    donor: str | None = None,
    image: str | None = None,
    counts_layer: str | None = None,
) -> ad.AnnData:
    """Read a SpatialData store (or object) into spatlas' cohort layout.

    Parameters
    ----------
    sdata_or_path
        A ``spatialdata.SpatialData`` or the path of a ``.zarr`` store (read lazily: images are
        not loaded).
    table
        The table holding the counts; needed only when the store has several.
    region
        The region (shapes element) to read. Default: every region the table annotates, one
        sample each.
    sample
        Sample id (one region only); default the region's name.
    donor
        Donor id; default the sample id.
    image
        The H&E image element to use; default the largest image sharing a coordinate system with
        the region.
    counts_layer
        The table's layer holding raw counts when ``X`` does not (default: ``X``, or the
        ``counts`` layer when ``X`` is not integer counts and that layer exists).

    Returns
    -------
    AnnData as :func:`spatlas.io.read_spaceranger` returns it (several samples concatenated,
    when the table annotates several regions): raw counts in ``X``, ``obs['barcode']`` (the
    table's ``obs_names``), ``obs['instance_id']``, ``obsm['spatial']``,
    ``uns['spatial'][sample]`` (images, scalefactors, and the store, table and region in
    ``metadata``). The table's other ``obs`` columns are kept (annotations, ``array_row`` /
    ``array_col`` of Visium).

    Raises
    ------
    SpatlasInputError
        A missing extra (with the install hint), a store without a table, an unknown table,
        region or image, shapes that are not circles or polygons, table rows without a shape.
    """
    where = str(sdata_or_path) if isinstance(sdata_or_path, str | Path) else "SpatialData"
    sdata, store = _open(sdata_or_path)
    table_name, tab = _pick_table(sdata, table, where)
    regions, region_key, instance_key = _table_keys(tab, where)
    if region is not None:
        if region not in regions:
            raise SpatlasInputError(
                f"{where}: table '{table_name}' does not annotate region '{region}' (its "
                f"regions: {', '.join(regions)})"
            )
        regions = [region]
    elif sample is not None and len(regions) > 1:
        raise SpatlasInputError(
            f"{where}: table '{table_name}' annotates {len(regions)} regions "
            f"({', '.join(regions)}); give region= (a sample sheet's region column) to read one "
            "as this sample"
        )
    parts = []
    for reg in regions:
        parts.append(
            _read_region(
                sdata,
                store,
                tab,
                table_name=table_name,
                region=reg,
                region_key=region_key,
                instance_key=instance_key,
                sample=sample if sample is not None else reg,
                donor=donor,
                image=image,
                counts_layer=counts_layer,
                where=where,
            )
        )
    if len(parts) == 1:
        return parts[0]
    from ._sheet import concat_samples

    return concat_samples(parts, consume=True)


def _counts(tab: ad.AnnData, counts_layer: str | None, where: str):
    if counts_layer is not None:
        if counts_layer not in tab.layers:
            raise SpatlasInputError(
                f"{where}: the table has no layer '{counts_layer}' (layers: "
                f"{', '.join(tab.layers) or 'none'})"
            )
        return tab.layers[counts_layer], f"layer '{counts_layer}'"
    if check_counts(tab.X, where="X") and "counts" in tab.layers:
        return tab.layers["counts"], "layer 'counts'"
    return tab.X, "X"


def _read_region(
    sdata,
    store: Path | None,
    tab: ad.AnnData,
    *,
    table_name: str,
    region: str,
    region_key: str,
    instance_key: str,
    sample: str,
    donor: str | None,
    image: str | None,
    counts_layer: str | None,
    where: str,
) -> ad.AnnData:
    import scipy.sparse as sp

    here = f"{where}: region '{region}'"
    if region not in sdata.shapes:
        kind = "labels" if region in sdata.labels else "points" if region in sdata.points else ""
        raise SpatlasInputError(
            f"{here}: not a shapes element"
            + (f" (it is {kind}: spatlas reads spots / cells as shapes)" if kind else "")
            + f"; shapes: {', '.join(sdata.shapes.keys()) or 'none'}"
        )
    shapes = sdata.shapes[region]
    rows = np.flatnonzero(tab.obs[region_key].astype(str).to_numpy() == region)
    if rows.size == 0:
        raise SpatlasInputError(f"{here}: no table row annotates this region")
    sub = tab[rows]
    instances = sub.obs[instance_key].to_numpy()
    pos = shapes.index.get_indexer(pd.Index(instances))
    if (pos < 0).any():
        missing = instances[pos < 0]
        raise SpatlasInputError(
            f"{here}: {missing.size} of {instances.size} table rows have no shape (instance "
            f"ids {', '.join(map(str, missing[:3]))}); the table and the shapes do not match"
        )
    xy_shape, diam_shape = _centroids(shapes.iloc[pos], here)

    # the coordinate system shapes and images share, and the target frame
    shape_cs = _systems(shapes)
    candidates = {}
    for name, img in sdata.images.items():
        shared = [cs for cs in shape_cs if cs in _systems(img)]
        if shared:
            candidates[name] = (img, shared[0])
    if image is not None:
        if image not in sdata.images:
            raise SpatlasInputError(
                f"{here}: no image '{image}' in the store (images: "
                f"{', '.join(sdata.images.keys()) or 'none'})"
            )
        if image not in candidates:
            raise SpatlasInputError(
                f"{here}: image '{image}' shares no coordinate system with the shapes "
                f"({', '.join(shape_cs)})"
            )
        candidates = {image: candidates[image]}
    if candidates:
        largest = max(candidates, key=lambda n: np.prod(_image_size(candidates[n][0])))
        cs = candidates[largest][1]
    else:
        largest, cs = None, ("global" if "global" in shape_cs else shape_cs[0])
    to_cs = _affine(shapes, cs)
    frame = np.eye(3)
    if largest is not None:
        if _scale_only(np.linalg.inv(_affine(candidates[largest][0], cs))) is None:
            # not a pure scale of the coordinate system: the largest image's pixels
            frame = np.linalg.inv(_affine(candidates[largest][0], cs))
            logger.info(
                "%s: the images are not a scale of '%s': positions in the pixels of image '%s'",
                sample,
                cs,
                largest,
            )
    to_frame = frame @ to_cs
    xy = _map(to_frame, xy_shape)
    linear = float(np.sqrt(abs(np.linalg.det(to_frame[:2, :2]))))
    diameters = diam_shape * linear
    scalefactors: dict[str, float] = {K.SPOT_DIAMETER: float(np.median(diameters))}
    images: dict[str, np.ndarray] = {}
    fullres = ""
    for name, (img, c) in sorted(
        candidates.items(), key=lambda kv: -np.prod(_image_size(kv[1][0]))
    ):
        if c != cs:
            continue
        scalef = _scale_only(np.linalg.inv(frame @ _affine(img, cs)))
        if scalef is None:
            logger.info("%s: image '%s' is not a scale of the spots' frame: not used", sample, name)
            continue
        role = next((r for r, suffix in _ROLES if name.endswith(suffix)), None)
        if role is not None and role not in images:
            images[role] = _as_rgb(_levels(img)[0], name)
            scalefactors[f"tissue_{role}_scalef"] = scalef
        elif not fullres and store is not None and (store / "images" / name).is_dir():
            fullres = str(store / "images" / name)
            scalefactors[K.FULLRES_SCALEF] = scalef
            if "hires" not in images:
                level, level_scale = _preview(img)
                images["hires"] = level
                scalefactors[K.HIRES_SCALEF] = scalef * level_scale
        elif "hires" not in images:
            level, level_scale = _preview(img)
            images["hires"] = level
            scalefactors[K.HIRES_SCALEF] = scalef * level_scale
    X, source = _counts(sub, counts_layer, here)
    X = sp.csr_matrix(X, dtype=np.float32)
    problems = check_counts(X, where=f"{here}: table '{table_name}' {source}")
    if problems:
        raise SpatlasInputError(problems)
    obs = sub.obs.drop(columns=[c for c in (region_key, instance_key) if c in sub.obs]).copy()
    for col in (K.SAMPLE, K.DONOR):
        if col in obs:
            obs = obs.drop(columns=col)
    obs.insert(0, K.BARCODE, sub.obs_names.astype(str))
    obs.insert(1, K.INSTANCE, instances)
    if K.IN_TISSUE not in obs:
        obs[K.IN_TISSUE] = np.ones(sub.n_obs, dtype=np.int64)
    obs.index = sub.obs_names.astype(str)
    var = pd.DataFrame(index=sub.var_names.astype(str))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[K.SPATIAL] = np.ascontiguousarray(xy, dtype=np.float64)
    adata.uns[K.SPATIAL] = {
        sample: {
            K.IMAGES: images,
            K.SCALEFACTORS: scalefactors,
            K.METADATA: {
                "source": str(store) if store is not None else "SpatialData object",
                K.FULLRES_PATH: fullres,
                K.SD_STORE: str(store) if store is not None else "",
                K.SD_TABLE: table_name,
                K.SD_REGION: region,
                K.SD_COORDINATES: cs,
            },
        }
    }
    set_sample_donor(adata, sample=sample, donor=donor)
    logger.info(
        "%s: %d spots/cells from region '%s' of table '%s' (spot size %.1f, images: %s)",
        sample,
        adata.n_obs,
        region,
        table_name,
        scalefactors[K.SPOT_DIAMETER],
        ", ".join(sorted(images) + (["fullres (on disk)"] if fullres else [])) or "none",
    )
    return adata


def _as_rgb(level, name: str) -> np.ndarray:
    arr = np.asarray(
        level.transpose("y", "x", "c").values if hasattr(level, "transpose") else level
    )
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise SpatlasInputError(f"image '{name}': expected (c, y, x) with 1, 3 or 4 channels")
    from ..pp.morphology._patches import _to_uint8_rgb

    return np.ascontiguousarray(_to_uint8_rgb(arr))


def _preview(img) -> tuple[np.ndarray, float]:
    """A preview of the image for maps, and its pixels per level-0 pixel.

    The coarsest pyramid level at least ``_MAX_PREVIEW_SIDE`` px across (or the finest), read
    with a stride when that level is much larger.
    """
    levels = _levels(img)
    full = max(levels[0].sizes["y"], levels[0].sizes["x"])
    chosen = levels[0]
    for level in levels:
        if max(level.sizes["y"], level.sizes["x"]) >= min(_MAX_PREVIEW_SIDE, full):
            chosen = level
    side = max(chosen.sizes["y"], chosen.sizes["x"])
    step = max(1, int(np.ceil(side / (2 * _MAX_PREVIEW_SIDE))))
    if step > 1:
        chosen = chosen.isel(y=slice(None, None, step), x=slice(None, None, step))
    scale = chosen.sizes["x"] / levels[0].sizes["x"]
    return _as_rgb(chosen, "preview"), float(scale)


# ---------------------------------------------------------------------------------------------
# writing the results back


def write_spatialdata_results(
    adata: ad.AnnData,
    folder: str | Path,
    *,
    domain_key: str,
    embeddings: tuple[str, ...] = (),
    tables: dict[str, pd.DataFrame] | None = None,
) -> list[Path]:
    """Write a copy of every SpatialData store the cohort was read from, with a results table.

    Each copy ``folder/<store name>`` holds the store as it was plus a table
    ``spatlas`` annotating the same regions (matched by instance id): the sample, the domains
    (``obs[domain_key]``, and ``obs['label']`` when present), the embeddings as ``obsm`` and
    the per-domain ``tables`` in ``uns``. The input stores are only read.

    Returns
    -------
    The written stores.
    """
    sd = _spatialdata()
    from spatialdata.models import TableModel

    folder = Path(folder)
    spatial = adata.uns.get(K.SPATIAL, {})
    by_store: dict[str, list[str]] = {}
    for sample in adata.obs[K.SAMPLE].cat.categories:
        meta = (spatial.get(sample) or {}).get(K.METADATA) or {}
        if meta.get(K.SD_STORE):
            by_store.setdefault(meta[K.SD_STORE], []).append(sample)
    written = []
    names = [Path(s).name for s in by_store]
    for store, samples in by_store.items():
        name = Path(store).name
        if names.count(name) > 1:
            name = f"{Path(store).parent.name}_{name}"
        target = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(store, target)
        mask = adata.obs[K.SAMPLE].isin(samples).to_numpy()
        sub = adata[mask]
        regions = [spatial[s][K.METADATA][K.SD_REGION] for s in samples]
        region_of = dict(zip(samples, regions, strict=True))
        obs = pd.DataFrame(
            {
                "region": pd.Categorical(
                    sub.obs[K.SAMPLE].astype(str).map(region_of), categories=regions
                ),
                "instance_id": sub.obs[K.INSTANCE].to_numpy(),
                K.SAMPLE: sub.obs[K.SAMPLE].astype(str).to_numpy(),
                domain_key: sub.obs[domain_key].astype(str).to_numpy(),
            },
            index=sub.obs[K.BARCODE].astype(str).to_numpy()
            + "-"
            + sub.obs[K.SAMPLE].astype(str).to_numpy(),
        )
        obs[domain_key] = pd.Categorical(obs[domain_key])
        if K.LABEL in sub.obs:
            obs[K.LABEL] = pd.Categorical(sub.obs[K.LABEL].astype(str).to_numpy())
        table = ad.AnnData(obs=obs)
        for key in embeddings:
            if key in sub.obsm:
                table.obsm[key] = np.asarray(sub.obsm[key], dtype=np.float32)
        table.obsm[K.SPATIAL] = np.asarray(sub.obsm[K.SPATIAL], dtype=np.float64)
        table.uns[RESULTS_TABLE] = {
            "domain_key": domain_key,
            "samples": list(samples),
            "frame": "obsm['spatial'] is in the full-resolution frame of uns['spatial'] "
            "(see spatlas.io.read_spatialdata)",
        }
        for tname, frame in (tables or {}).items():
            table.uns[RESULTS_TABLE][tname] = frame.reset_index(drop=True).astype(
                {c: str for c in frame.columns if frame[c].dtype == object}
            )
        table = TableModel.parse(
            table, region=regions, region_key="region", instance_key="instance_id"
        )
        with reading(target, "SpatialData store copy", "check the disk space of the run folder"):
            copy = sd.read_zarr(target)
            if RESULTS_TABLE in copy.tables:
                del copy.tables[RESULTS_TABLE]
                copy.delete_element_from_disk(RESULTS_TABLE)
            copy.tables[RESULTS_TABLE] = table
            copy.write_element(RESULTS_TABLE)
        logger.info("wrote %s (table '%s': %d rows)", target, RESULTS_TABLE, table.n_obs)
        written.append(target)
    return written
