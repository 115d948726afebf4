"""Method comparison: lora, pissa and milora at equal rank and budget over several seeds,
scored along training, summarised as mean +/- std with forgetting at equal steps and at a
matched company score, written as tables and plots."""

from milora.comparison.aggregate import Stat, Summary, common_level, mean_std, summarise, value_at_level
from milora.comparison.protocol import RunSpec, plan_runs
from milora.comparison.report import markdown_table, plot_steps, plot_tradeoff, write_report
from milora.comparison.trajectory import Point, RunRecord, track_run

__all__ = [
    "Point",
    "RunRecord",
    "RunSpec",
    "Stat",
    "Summary",
    "common_level",
    "markdown_table",
    "mean_std",
    "plan_runs",
    "plot_steps",
    "plot_tradeoff",
    "summarise",
    "track_run",
    "value_at_level",
    "write_report",
]
