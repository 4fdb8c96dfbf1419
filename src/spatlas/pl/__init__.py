"""spatlas.pl: plots of a cohort and a run; every function returns a matplotlib ``Figure``.

Figures are drawn by the Agg canvas and never shown; save them with ``fig.savefig``.
"""

from ._benchmark import benchmark_bars
from ._embedding import umap
from ._spatial import spatial_domains
from ._training import loss_curves

__all__ = ["benchmark_bars", "loss_curves", "spatial_domains", "umap"]
