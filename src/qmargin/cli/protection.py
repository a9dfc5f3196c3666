"""What ``qmargin evaluate --protect`` shows: the resolved plan with its memory overhead, and the
detected uncorrectable errors (DUEs) per BER (:mod:`qmargin.faults.protection`, result keys of
:mod:`qmargin.engine.store`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

__all__ = ["show_protection"]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def show_protection(console: Console, result: dict[str, Any]) -> None:
    """Print the ``protection`` plan (per tensor: rule, scheme, bits, overhead; total) and, when DUEs
    were counted, one line per BER: share of patterns flagged, mean DUEs per pattern, and the mean
    metric over the unflagged patterns. Prints nothing for a result without either."""
    plan = result.get("protection")
    if isinstance(plan, dict):
        from rich.table import Table

        console.print(
            f"protection {plan['spec']}: memory overhead {_pct(plan['overhead'])} "
            f"({plan['extra_bits']} extra bits over {plan['data_bits']} data bits)",
            soft_wrap=True,
        )
        table = Table()
        for col in ("layer", "tensor", "rule", "scheme", "data bits", "extra bits", "overhead"):
            table.add_column(col, justify="right" if "bits" in col or col == "overhead" else "left")
        for e in plan["tensors"]:
            table.add_row(
                e["layer"] or "(root)",
                e["tensor"],
                e["rule"],
                e["scheme"],
                str(e["data_bits"]),
                str(e["extra_bits"]),
                _pct(e["overhead"]),
            )
        console.print(table)
    if not result.get("evaluation", {}).get("count_dues"):
        return
    fraction = (result.get("metric") or {"fraction": True}).get("fraction", True)
    parts = []
    for row in result["results"]:
        dues = row.get("dues") or []
        if not dues:
            continue
        um = row.get("unflagged_mean")
        shown = "-" if um is None else (f"{100 * um:.2f}" if fraction else f"{um:.4g}")
        parts.append(
            f"  BER {row['ber']:g}: {_pct(row['flagged'])} of patterns flagged, "
            f"{sum(dues) / len(dues):.2f} DUEs per pattern, mean over unflagged patterns {shown}"
        )
    if parts:
        console.print(
            "detected uncorrectable errors (DUEs; every inference reads every weight, so the share of "
            "inferences flagged is the share of patterns):\n" + "\n".join(parts),
            soft_wrap=True,
        )
