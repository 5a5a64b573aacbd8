"""Reports: ``report.md`` with tables and plots for a run, and the table of a comparison."""

from distill.report.compare_report import build_compare_report
from distill.report.run_report import build_report, final_table, markdown_table

__all__ = ["build_compare_report", "build_report", "final_table", "markdown_table"]
