"""Plots: accuracy versus bit error rate (design.md §4) and the MonDEQ reproduction's two figures.

Layout: a wide main panel with a logarithmic BER axis (``p > 0``) and, to its left, a narrow panel
``clean`` sharing the accuracy axis. The clean accuracy (no injection) of every model is a marker on
the clean panel; a ``p = 0`` grid point, which a log axis cannot show, is drawn there too (hollow
marker, min-max error bar) unless all its patterns equal the clean accuracy, as they do for pure
random bit errors. On the main panel each model is a line through the per-BER mean accuracies
``a_bar_p`` with a shaded band: ``[min_r a_{p,r}, max_r a_{p,r}]`` (``band="minmax"``, default) or
``a_bar_p ± std`` clipped to ``[0, 1]`` (``band="std"``).

:func:`plot_mondeq_margin_vs_bits` and :func:`plot_mondeq_displacement` draw the summary dict of
:func:`qmargin.experiments.mondeq.run_mondeq_reproduction` (PTQ certificates; displacement bounds).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change) and writes
every PNG atomically (:func:`qmargin.files.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qmargin.errors import ConfigError
from qmargin.files import atomic_path
from qmargin.report.tables import (
    Result,
    Results,
    as_labelled,
    clean_value,
    entry_count,
    metric_label,
    metric_of,
)
from qmargin.stats import mean_confidence_interval

__all__ = [
    "plot_accuracy_vs_ber",
    "plot_mondeq_margin_vs_bits",
    "plot_mondeq_displacement",
    "accuracy_vs_ber_figure",
    "mondeq_margin_vs_bits_figure",
    "mondeq_displacement_figure",
    "plot_mondeq_conv_certificates",
    "plot_mondeq_conv_displacement",
    "save_png",
]


def _series(
    res: Result,
) -> tuple[list[float], list[float], list[float], list[float], list[float], list[int]]:
    """BER, mean, std, min, max, patterns over the completed positive-BER grid points, sorted by BER."""
    rows = sorted(
        (e for e in res["results"] if entry_count(e) and float(e["ber"]) > 0),
        key=lambda e: float(e["ber"]),
    )
    return (
        [float(e["ber"]) for e in rows],
        [float(e["mean"]) for e in rows],
        [float(e["std"]) for e in rows],
        [float(e["min"]) for e in rows],
        [float(e["max"]) for e in rows],
        [entry_count(e) for e in rows],
    )


def plot_accuracy_vs_ber(
    results: Results | Sequence[tuple[str, Result]],
    path: str | Path,
    title: str | None = None,
    *,
    band: str = "minmax",
    percent: bool = True,
    dpi: int = 150,
) -> Path:
    """Accuracy (or the results' metric) vs BER of one or several campaign results, saved as a PNG
    at ``path``; returns it. Fractions are drawn in percent on ``[0, 100]``; other metrics on their
    own scale, the axis label saying whether higher or lower is better."""
    fig = accuracy_vs_ber_figure(results, title, band=band, percent=percent)
    return save_png(fig, path, dpi=dpi)


def accuracy_vs_ber_figure(
    results: Results | Sequence[tuple[str, Result]],
    title: str | None = None,
    *,
    band: str = "minmax",
    percent: bool = True,
    ci: bool = False,
    legend_outside: bool = False,
    zoom: bool = False,
) -> Figure:
    """The figure of :func:`plot_accuracy_vs_ber`; with ``ci``, also error bars of the 95 %
    confidence interval of each mean (:func:`qmargin.stats.mean_confidence_interval`; a
    BER entry needs its pattern count: its values, or ``patterns``); with ``legend_outside``, the
    legend sits right of the plot (a wider figure) instead of over the curves; with ``zoom``, the
    value axis spans the data (not ``[0, 100]`` %)."""
    if band not in ("minmax", "std"):
        raise ConfigError(f"band must be 'minmax' or 'std', got {band!r}")
    items = as_labelled(results)
    metric = metric_of(items[0][1])
    fraction = bool(metric["fraction"])
    percent = percent and fraction
    label = metric_label(metric) + (" (%)" if percent else "")
    if metric["name"] != "top1":
        label += ", higher is better" if metric["higher_is_better"] else ", lower is better"
    k = 100.0 if percent else 1.0
    fig = Figure(figsize=(9.6 if legend_outside else 7.5, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax0, ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 7]})
    cycle = [f"C{i}" for i in range(10)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    any_positive = False
    for i, (name_i, res) in enumerate(items):
        color = cycle[i % len(cycle)]
        marker = markers[i % len(markers)]
        name = name_i or f"mean {metric_label(metric)}"
        offset = (i - (len(items) - 1) / 2) * min(0.15, 0.7 / len(items))
        ax0.plot([offset], [k * clean_value(res)], marker=marker, color=color, ls="none", ms=7)
        zero = next((e for e in res["results"] if float(e["ber"]) == 0 and entry_count(e)), None)
        if zero is not None and not (zero["min"] == zero["max"] == clean_value(res)):
            m = float(zero["mean"])
            ax0.errorbar(
                [offset],
                [k * m],
                yerr=[[k * max(0.0, m - float(zero["min"]))], [k * max(0.0, float(zero["max"]) - m)]],
                color=color,
                marker=marker,
                mfc="none",
                ls="none",
                capsize=3,
            )
        bers, mean, std, lo, hi, counts = _series(res)
        if not bers:
            continue
        any_positive = True
        if band == "std":
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            if fraction:  # shares stay in [0, 1]
                lo, hi = [max(0.0, v) for v in lo], [min(1.0, v) for v in hi]
        ax.fill_between(bers, [k * v for v in lo], [k * v for v in hi], color=color, alpha=0.18, lw=0)
        ax.plot(bers, [k * v for v in mean], marker=marker, color=color, label=name, ms=5, lw=1.6)
        if ci:
            intervals = [mean_confidence_interval(m, s, n) for m, s, n in zip(mean, std, counts, strict=True)]
            shown = [(b, m, iv) for b, m, iv in zip(bers, mean, intervals, strict=True) if iv is not None]
            if shown:
                ax.errorbar(
                    [b for b, _, _ in shown],
                    [k * m for _, m, _ in shown],
                    yerr=[[k * (m - iv[0]) for _, m, iv in shown], [k * (iv[1] - m) for _, m, iv in shown]],
                    color=color,
                    ls="none",
                    capsize=3.5,
                    elinewidth=1.2,
                )
    ax0.set_xlim(-0.5, 0.5)
    ax0.set_xticks([0.0], ["clean\n(p = 0)"])
    ax0.set_ylabel(label)
    if fraction and not zoom:
        ax0.set_ylim(-0.02 * k, 1.02 * k)
    ax0.grid(True, axis="y", alpha=0.3)
    if any_positive:
        ax.set_xscale("log")
    ax.set_xlabel("bit error rate p (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    band_txt = "min-max over patterns" if band == "minmax" else "mean ± std over patterns"
    if ci:
        band_txt += ";\nbars: 95% confidence interval of the mean"
    if any_positive:
        where: dict[str, Any] = (
            {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
            if legend_outside
            else {"loc": "lower left" if metric["higher_is_better"] else "upper left"}
        )
        ax.legend(
            **where,
            fontsize=9,
            frameon=True,
            title=f"line: mean; band: {band_txt}",
            title_fontsize=8,
        )
    if title:
        fig.suptitle(title)
    return fig


def save_png(fig: Figure, path: str | Path, *, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (parent directories created); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_mondeq_margin_vs_bits(summary: Mapping[str, Any], path: str | Path) -> Path:
    """PTQ sweep: ``||dW||_2`` and exact ``mu(W~)`` per bit width (per-tensor and per-row) against
    ``mu(W)``; the certificate holds where ``||dW||_2 < mu(W)``."""
    return save_png(mondeq_margin_vs_bits_figure(summary), path, dpi=120)


def mondeq_margin_vs_bits_figure(summary: Mapping[str, Any]) -> Figure:
    """The figure of :func:`plot_mondeq_margin_vs_bits`."""
    fig, ax = _figure()
    for pc, style in ((False, "o-"), (True, "s--")):
        rows = [r for r in summary["ptq"] if r["per_channel"] == pc]
        label = "per-row" if pc else "per-tensor"
        bits = [r["bits"] for r in rows]
        ax.plot(bits, [r["delta_w_norm"] for r in rows], style, label=f"‖dW‖₂ {label}")
        ax.plot(bits, [r["margin_quantized"] for r in rows], style, alpha=0.6, label=f"exact μ(W~) {label}")
    ax.set_yscale("symlog", linthresh=1e-2)  # μ(W~) < 0 (not monotone) stays visible below zero
    ax.axhline(0.0, color="grey", lw=0.8)
    mu = summary["ptq"][0]["margin"]
    ax.axhline(mu, color="k", lw=1, label=f"μ(W) = {mu:.3f}")
    ax.set_xlabel("bits")
    ax.set_ylabel("spectral quantity")
    ax.set_title("certificate: ‖dW‖₂ < μ(W)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_mondeq_displacement(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Measured ``||z* - z~*||`` per test sample against the full and the paper's bound (log-log);
    needs the per-sample lists (``distances``, ``bound_full``, ``bound_paper``) of each case."""
    return save_png(mondeq_displacement_figure(summary), path, dpi=120)


def mondeq_displacement_figure(summary: Mapping[str, Any]) -> Figure:
    """The figure of :func:`plot_mondeq_displacement`."""
    fig, ax = _figure()
    for d in summary["displacement"]:
        ax.loglog(d["bound_full"], d["distances"], ".", ms=3, label=f"{d['bits']}-bit full bound")
        ax.loglog(
            d["bound_paper"], d["distances"], "x", ms=3, alpha=0.5, label=f"{d['bits']}-bit paper bound"
        )
    lo = min(min(d["distances"]) for d in summary["displacement"])
    hi = max(max(d["bound_full"]) for d in summary["displacement"])
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="distance = bound")
    ax.set_xlabel("bound on ‖z* − z~*‖")
    ax.set_ylabel("measured ‖z* − z~*‖")
    ax.set_title("displacement: points above the line violate the bound")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_mondeq_conv_certificates(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Conv preset: exact per-frequency ``||dW||_2`` and ``mu(W~)`` of the PTQ sweep against ``mu(W)``,
    with the certified-QAT models as separate markers (their own ``mu(W)`` as short bars)."""
    fig, ax = _figure()
    rows = summary["ptq"]
    bits = [r["bits"] for r in rows]
    ax.plot(bits, [r["delta_w_norm"] for r in rows], "o-", label="PTQ ‖dW‖₂")
    ax.plot(bits, [r["margin_quantized"] for r in rows], "s--", alpha=0.7, label="PTQ exact μ(W~)")
    if rows:
        mu = rows[0]["margin"]
        ax.axhline(mu, color="k", lw=1, label=f"float μ(W) = {mu:.3f}")
    for r in summary["qat"]:
        ax.plot([r["bits"]], [r["delta_w_norm"]], "D", color="tab:green", ms=7)
        ax.plot([r["bits"]], [r["margin_quantized"]], "^", color="tab:red", ms=7)
        ax.plot([r["bits"] - 0.2, r["bits"] + 0.2], [r["margin"]] * 2, color="tab:green", lw=2)
    if summary["qat"]:
        ax.plot([], [], "D", color="tab:green", label="certified QAT ‖dW‖₂ (bar: its μ(W))")
        ax.plot([], [], "^", color="tab:red", label="certified QAT exact μ(W~)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("bits")
    ax.set_ylabel("exact per-frequency quantity")
    ax.set_title("conv MonDEQ certificate: ‖dW‖₂ < μ(W)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_mondeq_conv_displacement(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Conv preset: measured ``||z* - z~*||`` per test sample against the full bound (log-log), one
    series per model; needs the per-sample lists ``distances`` / ``bound_full`` of each row."""
    fig, ax = _figure()
    lo, hi = float("inf"), 0.0
    for r in [*summary["ptq"], *summary["qat"]]:
        d = r.get("displacement") or {}
        if not d.get("distances"):
            continue
        dist = [max(v, 1e-12) for v in d["distances"]]
        ax.loglog(d["bound_full"], dist, ".", ms=2, label=f"{r['method']} {r['bits']}-bit")
        lo, hi = min(lo, min(dist)), max(hi, max(d["bound_full"]))
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="distance = bound")
    ax.set_xlabel("bound ‖dW z~* + dU x + db‖ / μ(W)")
    ax.set_ylabel("measured ‖z* − z~*‖")
    ax.set_title("displacement per test sample: all points must lie below the line")
    ax.legend(fontsize=6, markerscale=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
