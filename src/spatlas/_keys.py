"""Every obs / obsm / uns / layer key spatlas reads or writes, defined once."""

from __future__ import annotations

# obs
SAMPLE = "sample"
DONOR = "donor"
BARCODE = "barcode"
ARRAY_ROW = "array_row"
ARRAY_COL = "array_col"
IN_TISSUE = "in_tissue"
LABEL = "label"  # ground-truth domain annotation, when the cohort has one
#: obs column of a streamed cohort: each spot's row in the ``.h5ad`` file holding its counts.
FILE_ROW = "file_row"
INSTANCE = "instance_id"  # SpatialData input: the shape's instance id in its region
CELL_AREA = "cell_area"  # segmented cells: polygon area in full-resolution pixels²

# obsm / uns
SPATIAL = "spatial"  # obsm: full-resolution pixels (x, y); uns: per-sample images + scalefactors
PCA = "X_pca"
SPATIAL_PCA = "X_spatial_pca"  # PCA of the neighbourhood-augmented expression
EXPRESSION_INPUT = "X_input"  # a user-given expression embedding used as the expression basis
FUSED = "X_fused"  # expression embedding joined by the weighted morphology embedding
MORPH_FEATURES = "X_morph_features"  # raw patch features (float32, one column per feature)
MORPH_PCA = "X_morph_pca"  # PCA of the pooled standardised morphology features
MORPH_HARMONY = "X_morph_harmony"  # the morphology PCs corrected by Harmony on the sample
PREDICTED_EXPRESSION = "X_predicted_expression"  # expression predicted from the image (genes)

# layers / var / uns
COUNTS = "counts"  # raw UMI counts, kept through preprocessing
HVG = "highly_variable"
UNS = "spatlas"  # spatlas' own metadata (versions, preprocessing parameters)
MORPHOLOGY = "morphology"  # uns['spatlas']['morphology']: extractor, images, stain statistics
PREDICTED = "predicted_expression"  # uns['spatlas']['predicted_expression'][key]: genes, source
EXPRESSION_INPUT_UNS = "expression_input"  # uns['spatlas']['expression_input']: source, dims

# uns['spatial'][sample] fields, as scanpy / squidpy write them
IMAGES = "images"
SCALEFACTORS = "scalefactors"
METADATA = "metadata"
FULLRES_PATH = "fullres_image_path"
SPOT_DIAMETER = "spot_diameter_fullres"
# image pixels per full-resolution pixel of the image at FULLRES_PATH (1 when it is the
# full-resolution image itself; a SpatialData store's H&E may sit at another scale)
FULLRES_SCALEF = "fullres_image_scalef"
# uns['spatial'][sample]['metadata'] of a sample read from a SpatialData store
SD_STORE = "spatialdata_store"
SD_TABLE = "spatialdata_table"
SD_REGION = "spatialdata_region"
SD_COORDINATES = "spatialdata_coordinate_system"
LOWRES_SCALEF = "tissue_lowres_scalef"
HIRES_SCALEF = "tissue_hires_scalef"


def embedding_key(method: str) -> str:
    """``obsm`` key of a method's embedding, e.g. ``X_harmony``."""
    return method if method.startswith("X_") else f"X_{method}"


def domain_key(method: str) -> str:
    """``obs`` key of a method's spatial domains, e.g. ``harmony_domain``."""
    return f"{method.removeprefix('X_')}_domain"


# fusion models (spatlas.models) and their neighbourhood windows (spatlas.pp.build_neighbourhoods)
NEIGHBOURHOOD = "neighbourhood"  # obsm: (N, w²) int32 neighbour-index table, -1 = empty cell
MODELS = "models"  # uns['spatlas']['models'][key_added]: model name, settings, losses, seconds


def neighbourhood_key(window: int) -> str:
    """``obsm`` key of a ``window x window`` neighbourhood table, e.g. ``neighbourhood_w5``."""
    return f"{NEIGHBOURHOOD}_w{window}"
