"""The MCEL ablation that sets the library's default (bound T, margin M): ``qmargin reproduce mcel-ablation``.

Grid on mnist5k (MLP 784-256-256-10, Adam 1e-3, symmetric per-tensor max-scaled weights) at 2 and 4
bits, several training seeds: CE, and MCEL over (T, M) with a fixed logit scale s as a third axis.
Each model gets a paired bit-error campaign at BER {1e-2, 5e-2} (same patterns for every model).

Selection rule (documented in ``docs/results/mcel_ablation.md``): among the MCEL points whose clean
accuracy, averaged over seeds, stays within ``clean_tolerance`` (1 point) of CE's at *every* bit
width, take the one with the highest robustness score: the mean accuracy over bit widths {2, 4} and
BERs {1e-2, 5e-2}, averaged over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmargin.experiments.evaluate import error_model_for
from qmargin.experiments.progress import StepProgress, Steps
from qmargin.experiments.runs import TrainConfig, load_dataset, train_and_stress
from qmargin.files import holds_lock, write_text_atomic
from qmargin.report import ablation_markdown

__all__ = ["AblationPoint", "default_grid", "run_mcel_ablation", "select_default"]


@dataclass(frozen=True)
class AblationPoint:
    """A loss setting: ``loss='ce'`` or MCEL with bound T (``None`` = no clamp), margin M, scale s."""

    loss: str
    bound: float | None = None
    margin: float | None = None
    logit_scale: float | None = None

    @property
    def label(self) -> str:
        if self.loss == "ce":
            return "CE"
        t = "inf" if self.bound is None else f"{self.bound:g}"
        s = "" if self.logit_scale in (None, 1.0) else f", s={self.logit_scale:g}"
        return f"MCEL T={t}, M={self.margin:g}{s}"

    def fields(self) -> dict[str, Any]:
        if self.loss == "ce":
            return {"loss": "ce"}
        kw: dict[str, Any] = {"margin": self.margin, "logit_scale": self.logit_scale}
        # no clamp: a bound so large that tanh is the identity to float precision
        kw["bound"] = 1e9 if self.bound is None else self.bound
        return {"loss": "mcel", "loss_kwargs": {k: v for k, v in kw.items() if v is not None}}


def default_grid() -> list[AblationPoint]:
    """CE; MCEL over T in {inf, 10, 30, 100} x M in {0, 3, 10, 30} (M < 2T); s in {0.25, 4} at two points."""
    pts = [AblationPoint("ce")]
    for bound in (None, 10.0, 30.0, 100.0):
        for margin in (0.0, 3.0, 10.0, 30.0):
            if bound is not None and margin >= 2 * bound:
                continue
            if bound is None and margin == 0.0:
                continue  # equals CE
            pts.append(AblationPoint("mcel", bound, margin))
    for s in (0.25, 4.0):
        pts.append(AblationPoint("mcel", 100.0, 30.0, s))
        pts.append(AblationPoint("mcel", 10.0, 3.0, s))
    return pts


@holds_lock("out_dir", also_check={"results_dir": "dir"})  # one process per --out, whole run
def run_mcel_ablation(
    *,
    out_dir: str | Path = "runs/mcel-ablation",
    grid: Sequence[AblationPoint] | None = None,
    bits: Sequence[int] = (2, 4),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 30,
    bers: Sequence[float] = (1e-2, 5e-2),
    repeats: int = 20,
    dataset: str = "mnist5k",
    model: str = "mlp",
    clean_tolerance: float = 0.01,
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    progress: StepProgress | None = None,
) -> dict[str, Any]:
    """Train and stress every grid point; return ``{"rows", "selected", "markdown"}`` (resumable)."""
    grid = list(grid) if grid is not None else default_grid()
    out = Path(out_dir)
    data = load_dataset(dataset)
    template = error_model_for()
    grid_bers = [0.0, *[b for b in bers if b != 0.0]]
    rows: list[dict[str, Any]] = []
    steps = Steps(len(grid) * len(bits) * len(seeds), progress)
    for point in grid:
        for b in bits:
            per_seed = []
            for seed in seeds:
                cfg = TrainConfig(
                    dataset=dataset,
                    model=model,
                    bits=b,
                    epochs=epochs,
                    seed=seed,
                    device="cpu",
                    **point.fields(),
                )
                run_dir = out / f"{_slug(point.label)}-{b}bit-s{seed}"
                camp = train_and_stress(
                    cfg, data, run_dir, bers=grid_bers, repeats=repeats, error_model=template
                ).campaign
                steps.done(f"{point.label} {b}-bit seed {seed}")
                per_seed.append(
                    {r["ber"]: r["mean"] for r in camp["results"]} | {"clean": camp["clean_accuracy"]}
                )
            row: dict[str, Any] = {
                "label": point.label,
                "point": point.__dict__,
                "bits": b,
                "seeds": list(seeds),
                "clean": [s["clean"] for s in per_seed],
            }
            for ber in bers:
                row[f"ber_{ber:g}"] = [s[ber] for s in per_seed]
            rows.append(row)
            log(
                f"{point.label:<28} {b}-bit: clean {100 * np.mean(row['clean']):.1f}  "
                + "  ".join(f"{ber:g}: {100 * np.mean(row[f'ber_{ber:g}']):.1f}" for ber in bers)
            )
    selected = select_default(rows, bits=bits, bers=bers, clean_tolerance=clean_tolerance)
    md = ablation_markdown(
        rows,
        selected,
        bits=bits,
        bers=bers,
        seeds=seeds,
        epochs=epochs,
        repeats=repeats,
        clean_tolerance=clean_tolerance,
    )
    result = {"rows": rows, "selected": selected, "markdown": md}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "ablation.json", json.dumps(result, indent=2))
    if results_dir is not None:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        write_text_atomic(rd / "mcel_ablation.md", md)
        write_text_atomic(
            rd / "mcel_ablation.json", json.dumps({k: result[k] for k in ("rows", "selected")}, indent=2)
        )
    return result


_EPS = 1e-9
"""Accuracies are multiples of 1/N_test averaged over seeds: the tolerance boundary is inclusive."""


def select_default(
    rows: list[dict[str, Any]], *, bits: Sequence[int], bers: Sequence[float], clean_tolerance: float
) -> dict[str, Any] | None:
    """The most robust MCEL point whose mean clean accuracy is within tolerance (inclusive) of CE
    at every bit width."""
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], {})[r["bits"]] = r
    ce = by_label.get("CE")
    best = None
    for label, per_bits in by_label.items():
        if label == "CE" or any(b not in per_bits for b in bits):
            continue
        ok = ce is None or all(
            np.mean(per_bits[b]["clean"]) >= np.mean(ce[b]["clean"]) - clean_tolerance - _EPS for b in bits
        )
        score = float(np.mean([np.mean(per_bits[b][f"ber_{ber:g}"]) for b in bits for ber in bers]))
        if ok and (best is None or score > best["score"]):
            best = {"label": label, "point": per_bits[bits[0]]["point"], "score": score}
    return best


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")
