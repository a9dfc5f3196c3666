"""Tables (rich, markdown), plots (matplotlib) and the self-contained HTML report of experiment
results (plain dicts).

Imports nothing of ``qmargin.experiments``: every function takes the plain dicts the experiments
return and store as JSON, so a stored result renders again without rerunning anything.
"""

from qmargin.report.html import report_html
from qmargin.report.plots import (
    plot_accuracy_vs_ber,
    plot_mondeq_conv_certificates,
    plot_mondeq_conv_displacement,
    plot_mondeq_displacement,
    plot_mondeq_margin_vs_bits,
)
from qmargin.report.provenance import machine_description, provenance
from qmargin.report.reproductions import (
    ablation_markdown,
    mcel_markdown,
    mondeq_conv_markdown,
    mondeq_markdown,
)
from qmargin.report.tables import (
    ber_table,
    compare_table,
    format_ber,
    format_markdown_table,
    paired_table,
    render_text,
)
from qmargin.stats import mean_confidence_interval

__all__ = [
    "ber_table",
    "compare_table",
    "format_markdown_table",
    "paired_table",
    "format_ber",
    "render_text",
    "plot_accuracy_vs_ber",
    "plot_mondeq_margin_vs_bits",
    "plot_mondeq_displacement",
    "mcel_markdown",
    "ablation_markdown",
    "mondeq_markdown",
    "report_html",
    "mean_confidence_interval",
    "machine_description",
    "provenance",
    "mondeq_conv_markdown",
    "plot_mondeq_conv_certificates",
    "plot_mondeq_conv_displacement",
]
