"""spatlas.report: a self-contained HTML report of a run folder or a search folder."""

from ._html import REPORT_NAME, SECTIONS, build_report
from ._search import SEARCH_SECTIONS, build_search_report

__all__ = ["REPORT_NAME", "SEARCH_SECTIONS", "SECTIONS", "build_report", "build_search_report"]
