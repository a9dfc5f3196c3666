"""Rendering a protection plan (:func:`qmargin.engine.planner.plan_protection`, a plain dict).

* :func:`protect_layers_table`: per layer and candidate scheme, the measured drop (errors in that
  layer only) with its 95% CI and the cost in bits;
* :func:`protect_summary_table`: the plan beside the unprotected and the fully protected model at the
  same BER and patterns: spec, overhead, hardened share, cost, verified value and drop with CIs;
* :func:`protect_trace_lines`: the search rounds;
* :func:`certify_flips_table`: the MonDEQ certified variant (certified flips per ``msbK``).

Drops and values in percentage points for metrics whose values are fractions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

__all__ = ["protect_layers_table", "protect_summary_table", "protect_trace_lines", "certify_flips_table"]

Result = Mapping[str, Any]


def _scale(res: Result) -> float:
    return 100.0 if (res.get("metric") or {}).get("fraction", True) else 1.0


def _f(v: Any, k: float) -> str:
    return "-" if v is None else f"{k * float(v):.2f}"


def _pct(x: float) -> str:
    """A share as a percentage, three significant digits (``25%``, ``0.00444%``)."""
    return f"{100 * float(x):.3g}%"


def _ci(lo: Any, hi: Any, k: float) -> str:
    return "-" if lo is None else f"[{_f(lo, k)}, {_f(hi, k)}]"


def protect_layers_table(res: Result, *, title: str | None = None) -> Table:
    """Measured drop per layer and scheme (mean and 95% CI) and its cost in bits; ``*`` marks the
    plan's choice."""
    k = _scale(res)
    unit = " (pp)" if k == 100.0 else ""
    plan = res.get("plan") or res.get("best_attempt") or {}
    chosen = plan.get("schemes", {})
    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    table.add_column("data bits", justify="right")
    for scheme in res["choices"]:
        table.add_column(scheme, justify="right")
    for layer in res["layers"]:
        cells = []
        for entry in layer["schemes"]:
            if not entry["available"]:
                cells.append("n/a")
                continue
            mark = "*" if chosen.get(layer["layer"]) == entry["scheme"] else " "
            cells.append(
                f"{mark}{_f(entry['mean_drop'], k)} {_ci(entry['ci_low'], entry['ci_high'], k)} "
                f"/ {entry['cost_bits']:g}"
            )
        table.add_row(layer["layer"], str(layer["n_bits"]), *cells)
    table.caption = (
        f"cells: drop{unit} [95% CI] / cost bits; clean {_f(res['clean_value'], k)}; BER {res['ber']:g}; "
        "errors in one layer only; "
        f"{res['patterns']} paired patterns "
        f"(seeds {res['base_seed']}..{res['base_seed'] + res['patterns'] - 1}); "
        f"cost = extra bits + {res['hardened_cost']:g} x hardened bits; * = plan"
    )
    return table


def protect_summary_table(res: Result, *, title: str | None = None) -> Table:
    """The plan, the unprotected and the fully protected model: spec, overhead, hardened share, cost,
    verified value and drop (mean, 95% CI)."""
    k = _scale(res)
    unit = " (pp)" if k == 100.0 else ""
    table = Table(title=title, title_justify="left")
    for col, right in (
        ("", False),
        ("protection (--protect)", False),
        ("overhead", True),
        ("hardened", True),
        ("cost", True),
        (f"value{unit} [95% CI]", True),
        (f"drop{unit} [95% CI]", True),
    ):
        table.add_column(col, justify="right" if right else "left")
    refs = res["references"]
    plan = res.get("plan")
    rows = [
        ("plan" if plan is not None else "best attempt (misses the target)", plan or res.get("best_attempt"))
    ]
    rows += [("unprotected", refs["unprotected"]), ("full protection", refs.get("full_protection"))]
    for label, r in rows:
        if r is None:
            continue
        v, d = r["value"], r["drop"]
        table.add_row(
            label,
            r["spec"],
            _pct(r["overhead"]),
            _pct(r["hardened_share"]),
            _pct(r["cost"]),
            f"{_f(v['mean'], k)} {_ci(v['ci_low'], v['ci_high'], k)}",
            f"{_f(d['mean'], k)} {_ci(d['ci_low'], d['ci_high'], k)}",
        )
    limit = _f(res["max_drop"], k)
    what = "95% CI upper end of the" if res.get("strict") else "mean"
    gain = (plan or {}).get("gain_vs_unprotected")
    paired = ""
    if gain is not None:
        paired = (
            f"plan - unprotected (paired): {_f(gain['mean'], k)} {_ci(gain['ci_low'], gain['ci_high'], k)}; "
        )
    table.caption = (
        f"target: {what} drop <= {limit}{unit} at BER {res['ber']:g} (verified on the whole model, "
        f"{res['patterns']} paired patterns); {paired}overhead = extra stored bits / data bits; hardened = "
        "bits in hardened memory / data bits; cost = overhead + hardened-cost x hardened"
    )
    return table


def protect_trace_lines(res: Result) -> list[str]:
    """One line per search round: budget, knapsack method, spec, estimated and verified drop."""
    k = _scale(res)
    out = []
    for t in res["trace"]:
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(
            f"round {t['round']}: budget {_f(t['budget'], k)}, {t['method']}{note}: {t['spec']}: "
            f"sum of layer drops {_f(t['estimated_drop'], k)}, verified {_f(t['verified_drop'], k)} -> "
            + ("meets the target" if t["meets_target"] else "misses the target")
        )
    return out


def certify_flips_table(res: Result, *, title: str | None = None) -> Table:
    """Per number ``K`` of hardened top bits of ``W``: certified flips, hardened bits, cost."""
    table = Table(title=title, title_justify="left")
    for col in ("msbK", "certified flips", "hardened bits", "cost", f">= {res['flips']}"):
        table.add_column(col, justify="right")
    for row in res["rows"]:
        flips = "all (no bit exposed)" if row["all_bits_hardened"] else str(row["max_flips"])
        if row.get("every_exposed_bit"):
            flips += " (every exposed bit)"
        table.add_row(
            f"K={row['k']}",
            flips,
            str(row["hardened_bits"]),
            _pct(row["cost"]),
            "yes" if row["certified"] else "no",
        )
    table.caption = (
        f"{res['layer']}.W: {res['bits']}-bit codes ({res['numel']} words); "
        "certified = mu(W~) - beta(flips) > 0 "
        "for every pattern of that many arbitrary flips in the exposed bits"
    )
    return table
