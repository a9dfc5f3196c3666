"""Markdown reports of the paper reproductions and the MCEL ablation (plain result dicts in, text out).

The experiments (`qmargin.experiments.mcel`, `.ablation`, `.mondeq`) compute and return plain dicts,
the same ones they store as JSON (``docs/results/*.json``); these functions turn them into the
committed markdown (``docs/results/*.md``), byte for byte: rendering a stored JSON again gives the
stored table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mcel_markdown", "ablation_markdown", "mondeq_markdown", "mondeq_conv_markdown"]


def mcel_markdown(summary: dict[str, Any]) -> str:
    """Markdown table: one row per (bits, method), mean ± std accuracy (%) per BER, time vs CE."""
    bers: Sequence[float] = summary["bers"]
    head = ["bits", "method", *[("clean" if b == 0 else f"{b:g}") for b in bers], "train time vs CE"]
    lines = [
        "Accuracy (%) under random bit errors in the stored weight codes, mean ± std over "
        + (
            f"{summary['repeats']} paired patterns"
            if summary.get("ci_halfwidth") is None
            else f"{summary['min_patterns']} to {summary['repeats']} paired patterns per BER (sequential "
            f"stopping at a 95% CI of ±{100 * summary['ci_halfwidth']:g} points; the count per cell in "
            "the JSON)"
        )
        + f" (seeds {summary['base_seed']}..). "
        f"{summary.get('description', '')}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in summary["rows"]:
        cells = [str(r["bits"]), r["method"]]
        for res in r["results"]:
            cells.append(
                f"{100 * res['mean']:.1f}"
                if res["ber"] == 0
                else f"{100 * res['mean']:.1f} ± {100 * res['std']:.1f}"
            )
        t = r.get("time_vs_ce")
        cells.append(f"{t:.2f}x" if t is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_markdown(
    rows: list[dict[str, Any]],
    selected: dict[str, Any] | None,
    *,
    bits: Sequence[int],
    bers: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    repeats: int,
    clean_tolerance: float,
) -> str:
    head = ["loss", *[f"{b}-bit {c}" for b in bits for c in ("clean", *[f"{x:g}" for x in bers])], "score"]
    lines = [
        f"MCEL ablation on mnist5k (MLP 784-256-256-10, Adam 1e-3, {epochs} epochs, symmetric per-tensor "
        f"weights). Accuracy (%), mean ± std over training seeds {list(seeds)}; each BER value is the mean "
        f"over {repeats} paired error patterns. score = mean accuracy over {list(bits)} bits x BER "
        f"{[float(b) for b in bers]}. Eligible: clean accuracy within "
        f"{100 * clean_tolerance:g} point(s) of CE "
        "at every bit width.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        cells = [label]
        per = {r["bits"]: r for r in rows if r["label"] == label}
        scores = []
        for b in bits:
            r = per.get(b)
            for key in ("clean", *[f"ber_{x:g}" for x in bers]):
                v = r[key] if r else None
                cells.append("" if v is None else f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}")
                if v is not None and key != "clean":
                    scores.append(np.mean(v))
        cells.append(f"{100 * np.mean(scores):.1f}" if scores else "")
        mark = selected is not None and selected["label"] == label
        lines.append("| " + " | ".join(f"**{c}**" if mark and c else c for c in cells) + " |")
    if selected is not None:
        lines += ["", f"Selected default: **{selected['label']}** (score {100 * selected['score']:.1f})."]
    else:
        lines += ["", "No MCEL point met the clean-accuracy criterion."]
    return "\n".join(lines) + "\n"


def _yn(v: bool | None) -> str:
    return "yes" if v else "no"


def mondeq_markdown(s: dict[str, Any]) -> str:
    lines = ["### Float model", "", "| seed | accuracy (%) | m | mu(W) | L(W) |", "|---|---|---|---|---|"]
    for f in s["float"]:
        lines.append(
            f"| {f['seed']} | {100 * f['accuracy']:.1f} | {f['m']:.3f} | {f['mu']:.3f} | {f['L']:.3f} |"
        )
    lines += [
        "",
        "### Post-training quantization (W, U, b and head at the same bits)",
        "",
        "| scales | bits | ‖dW‖₂ | μ(W) | exact μ(W~) | certified | certified (sym) | monotone | FB iters "
        "| PR iters | PR converged | accuracy (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["ptq"]:
        lines.append(
            f"| {'per-row' if r['per_channel'] else 'per-tensor'} | {r['bits']} | {r['delta_w_norm']:.4f} | "
            f"{r['margin']:.4f} | {r['margin_quantized']:.4f} | {_yn(r['certified'])} | "
            f"{_yn(r['certified_sym'])} | "
            f"{_yn(r['monotone'])} | {r['fb_iterations']}{'' if r['fb_converged'] else ' (no)'} | "
            f"{r['pr_iterations']}{'' if r['pr_converged'] else ' (no)'} | {_yn(r['pr_converged'])} | "
            f"{100 * r['accuracy']:.1f} |"
        )
    lines += [
        "",
        "### Displacement bounds (per-tensor PTQ; share of the test samples where the bound holds)",
        "",
        "| bits | full ‖dW z~ + dU x + db‖/μ | norm form | paper (dW only) | mean ‖z*−z~*‖ | mean full bound "
        "| mean paper bound | max dist/paper bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in s["displacement"]:
        lines.append(
            f"| {d['bits']} | {100 * d['share_full']:.1f}% | {100 * d['share_norm_form']:.1f}% | "
            f"{100 * d['share_paper']:.1f}% | {d['mean_distance']:.4g} | {d['mean_full']:.4g} | "
            f"{d['mean_paper']:.4g} | {d['ratio_paper']:.2f} |"
        )
    lines += [
        "",
        "### Quantization-aware training",
        "",
        "| method | bits | seed | scales | m | ‖dW‖₂ | μ(W) | exact μ(W~) | certified | PR converged "
        "| accuracy (%) "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["qat"]:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['seed']} | "
            f"{'per-row' if r['per_channel'] else 'per-tensor'} | "
            f"{r['m']:.3f} | {r['delta_w_norm']:.4f} | {r['margin']:.4f} | {r['margin_quantized']:.4f} | "
            f"{_yn(r['certified'])} | {_yn(r['pr_converged'])} | {100 * r['accuracy']:.1f} | "
            f"{r['train_time_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def mondeq_conv_markdown(s: dict[str, Any]) -> str:
    """Markdown of :func:`qmargin.experiments.mondeq_conv.run_mondeq_conv_reproduction`'s summary."""
    f = s["float"]
    rows = [*s["ptq"], *s["qat"]]
    first = rows[0] if rows else {}
    kw = s.get("model_kwargs", {})
    lines = [
        f"Single-convolution MonDEQ (`mondeq-conv`, {kw.get('channels')} channels, 3x3 factors, circular "
        f"padding) on {s['dataset']}; W, U, b and the head quantized, per-output-channel scales for W and U. "
        f"Certificates exact per frequency: {first.get('frequencies', '-')} blocks of "
        f"{first.get('block_size', '-')}x{first.get('block_size', '-')} (rfft half of the "
        f"{'x'.join(str(g) for g in first.get('grid', []))} grid). Accuracy counts every non-converged solve "
        f"as an error. The displacement bound ‖z*−z~*‖ ≤ ‖dW z~* + dU x + db‖/μ(W) is checked on "
        f"{s['displacement_samples']} of {s['test_samples']} test samples (solver error accounted for).",
        "",
        "### Float model",
        "",
        "| accuracy (%) | m | μ(W) | L(W) | PR iters | train time (s) |",
        "|---|---|---|---|---|---|",
        f"| {100 * f['accuracy']:.1f} | {f['m']:.3f} | {f['mu']:.4f} | {f['L']:.3f} | "
        f"{f['solver_iterations']:.0f} | {f['train_time_s']:.0f} |",
        "",
        "### PTQ and certified QAT",
        "",
        "| method | bits | ‖dW‖₂ | μ(W) | exact μ(W~) | certified | monotone | max certified flips "
        "| accuracy (%) | non-converged | PR iters | max ‖z*−z~*‖ / bound | bound holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.get("displacement", {})
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['delta_w_norm']:.4f} | {r['margin']:.4f} | "
            f"{r['margin_quantized']:.4f} | {_yn(r['certified'])} | {_yn(r['monotone'])} | "
            f"{_f(r.get('max_certified_bit_flips'), 'd')} | {100 * r['accuracy']:.1f} | "
            f"{r['nonconverged_samples']} | {r['solver_iterations']:.0f} | "
            f"{_f(d.get('ratio_full'), '.3f')}{'' if d.get('solver_converged', True) else ' †'} | "
            f"{_f(d.get('share_full'), '.1%')} |"
        )
    if any(not (r.get("displacement") or {}).get("solver_converged", True) for r in rows):
        lines += [
            "",
            "† a displacement solve of this network hit its iteration cap (a non-monotone W~ has no "
            "convergence guarantee): the check is then made at the last iterate, without a rigorous "
            "solver allowance.",
        ]
    qat = [r for r in s["qat"] if "train_time_s" in r]
    if qat:
        lines += [
            "",
            "| certified QAT | bits | m | train time (s) | certificate time (s) |",
            "|---|---|---|---|---|",
        ]
        for r in qat:
            lines.append(
                f"| | {r['bits']} | {r['m']:.3f} | {r['train_time_s']:.0f} | {r['certificate_time_s']:.3f} |"
            )
    if "wall_time_s" in s:
        threads = s.get("threads", "?")
        lines += ["", f"Wall time of this invocation: {s['wall_time_s']:.0f} s ({threads} thread(s))."]
    return "\n".join(lines) + "\n"
