"""Bundled demo data and synthetic cohort generators."""

from ._demo import dlpfc_demo, dlpfc_demo_sheet
from ._hd import synthetic_visium_hd
from ._synthetic import synthetic_cohort

__all__ = ["dlpfc_demo", "dlpfc_demo_sheet", "synthetic_cohort", "synthetic_visium_hd"]
