"""spatlas.report: a self-contained HTML report of a run folder."""

from ._html import REPORT_NAME, SECTIONS, build_report

__all__ = ["REPORT_NAME", "SECTIONS", "build_report"]
