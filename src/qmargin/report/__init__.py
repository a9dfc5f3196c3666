"""Tables (rich, markdown) and plots (matplotlib) of experiment results (plain dicts)."""

from qmargin.report.plots import plot_accuracy_vs_ber
from qmargin.report.tables import (
    ber_table,
    compare_table,
    format_ber,
    format_markdown_table,
    render_text,
)

__all__ = [
    "ber_table",
    "compare_table",
    "format_markdown_table",
    "format_ber",
    "render_text",
    "plot_accuracy_vs_ber",
]
