"""spatlas.pl: plots of a cohort and a run; every function returns a matplotlib ``Figure``.

Figures are drawn by the Agg canvas and never shown; save them with ``fig.savefig``.
"""

from ._benchmark import benchmark_bars
from ._biology import marker_dotplot, pathway_heatmap
from ._embedding import umap
from ._expression import expression_maps
from ._spatial import spatial_domains
from ._training import loss_curves
from ._utils import category_colours, domain_colours

__all__ = [
    "benchmark_bars",
    "category_colours",
    "domain_colours",
    "expression_maps",
    "loss_curves",
    "marker_dotplot",
    "pathway_heatmap",
    "spatial_domains",
    "umap",
]
