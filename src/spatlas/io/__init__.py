"""Reading and writing cohorts: Space Ranger, ``.h5ad``, SpatialData, sample sheets, runs.

Space Ranger folders cover Visium and Visium HD (bins and segmented cells).
"""

from ._h5ad import read_h5ad
from ._images import image_size, read_image
from ._sheet import (
    SampleSpec,
    concat_samples,
    read_cohort,
    read_sample,
    read_sample_sheet,
    summarize_cohort,
    validate_sheet,
)
from ._spaceranger import read_cell_polygons, read_positions, read_scalefactors, read_spaceranger
from ._spatialdata import read_spatialdata, write_spatialdata_results
from ._tenx import read_10x_h5, read_10x_mtx, write_10x_h5
from ._write import atomic_output_dir, write_h5ad

__all__ = [
    "SampleSpec",
    "atomic_output_dir",
    "concat_samples",
    "image_size",
    "read_10x_h5",
    "read_10x_mtx",
    "read_cell_polygons",
    "read_cohort",
    "read_h5ad",
    "read_image",
    "read_positions",
    "read_sample",
    "read_sample_sheet",
    "read_scalefactors",
    "read_spaceranger",
    "read_spatialdata",
    "summarize_cohort",
    "validate_sheet",
    "write_10x_h5",
    "write_h5ad",
    "write_spatialdata_results",
]
