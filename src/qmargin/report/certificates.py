"""Tables of MonDEQ quantization certificates (plain dicts from :func:`qmargin.deq.Certificate.to_dict`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

__all__ = ["certificate_table"]


def _f(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def certificate_table(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> Table:
    """One row per bit width: ||dW||_2, mu(W), exact mu(W~), certified, monotone, rates, bit-flip budget.

    With BER rows: the certified / monotone shares; with ``displacement`` (``certify --samples``): the
    samples checked, ``max ||z* - z~*|| / bound`` (full form) and the share on which it holds.
    """
    t = Table(title=title)
    cols = [
        "bits",
        "‖dW‖₂",
        "μ(W)",
        "exact μ(W~)",
        "certified",
        "monotone",
        "PR rate",
        "FB rate",
        "max flips",
        "max flips, 2 MSBs protected",
    ]
    has_ber = any("ber_certified_share" in r for r in rows)
    if has_ber:
        cols += ["BER certified", "BER monotone"]
    has_disp = any("displacement" in r for r in rows)
    if has_disp:
        cols += ["samples", "max ‖z*−z~*‖ / bound", "bound holds"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        cells = [
            str(r["bits"]),
            _f(r["delta_w_norm"]),
            _f(r["margin"]),
            _f(r["margin_quantized"]),
            "yes" if r["certified"] else "no",
            "yes" if r["monotone"] else "no",
            _f(r.get("pr_rate")),
            _f(r.get("fb_rate")),
            _f(r.get("max_certified_bit_flips"), "d"),
            _f(r.get("max_certified_bit_flips_msb2_protected"), "d"),
        ]
        if has_ber:
            cells += [_f(r.get("ber_certified_share"), ".2%"), _f(r.get("ber_monotone_share"), ".2%")]
        if has_disp:
            d = r.get("displacement") or {}
            cells += [_f(d.get("samples"), "d"), _f(d.get("ratio_full")), _f(d.get("share_full"), ".2%")]
        t.add_row(*cells)
    return t
