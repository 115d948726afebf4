"""Static HTML reports of pipeline runs: self-contained pages with inline SVG plots.

Pure rendering: the pages are built from plain data (run records, loss points, evaluation
rows, registry history) that the orchestration layer gathers (``tasks.html_report``), so
this package needs matplotlib and nothing of Prefect or MLflow. :mod:`.spectrum` reads the
singular values of a few base weights and the adapted components of an init adapter.
"""

from __future__ import annotations

from milora.reporting.data import IndexRow, RunPage, Spectrum, VersionPoint
from milora.reporting.pages import render_index, render_run

__all__ = ["IndexRow", "RunPage", "Spectrum", "VersionPoint", "render_index", "render_run"]
