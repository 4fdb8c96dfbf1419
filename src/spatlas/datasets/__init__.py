"""Bundled demo data and a synthetic cohort generator."""

from ._demo import dlpfc_demo, dlpfc_demo_sheet
from ._synthetic import synthetic_cohort

__all__ = ["dlpfc_demo", "dlpfc_demo_sheet", "synthetic_cohort"]
