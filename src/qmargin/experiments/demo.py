"""``qmargin demo``: the main job on the built-in digits data, in well under a minute on 2 CPU cores.

1. Train a quantized MLP (64-256-256-10) on scikit-learn's digits with CE and with MCEL.
2. Stress both with random bit errors in the stored weight codes (same seeded patterns for both).
3. Train a small MonDEQ on the same data and certify it across bit widths from the weights alone.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmargin.experiments.certify import demo_mondeq_certificates
from qmargin.experiments.evaluate import error_model_for
from qmargin.experiments.runs import TrainConfig, TrainResult, load_dataset, train_and_stress
from qmargin.files import holds_lock

__all__ = ["run_demo", "DEMO_BITS"]

DEMO_BITS = (3, 4, 5, 6, 8)
"""Bit widths at which the demo certifies its MonDEQ."""


@holds_lock("out_dir")  # one process per output directory, for the whole run
def run_demo(
    *,
    bits: int = 4,
    epochs: int = 30,
    bers: Sequence[float] = (0.0, 1e-3, 1e-2, 5e-2),
    repeats: int = 10,
    seed: int = 0,
    out_dir: str | Path | None = None,
    mondeq: bool = True,
    mondeq_epochs: int = 8,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run the demo and return ``{"campaigns": [(label, result)], "train_time_s": {...},
    "certificates": [...], "out_dir": ...}``. Runs are kept in ``out_dir`` (resumable)."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="qmargin-demo-"))
    data = load_dataset("digits")
    campaigns: list[tuple[str, dict[str, Any]]] = []
    times: dict[str, float] = {}
    template = error_model_for()
    for loss in ("ce", "mcel"):
        cfg = TrainConfig(
            dataset="digits", model="mlp", bits=bits, loss=loss, epochs=epochs, seed=seed, device="cpu"
        )
        label = f"{loss.upper()} {bits}-bit"
        t0 = time.perf_counter()

        def trained(result: TrainResult, label: str = label, t0: float = t0) -> None:
            times[label] = result.train_time_s
            elapsed = time.perf_counter() - t0
            log(f"trained {label}: clean test accuracy {result.test_acc:.4f} ({elapsed:.1f} s)")

        stressed = train_and_stress(
            cfg,
            data,
            out / f"{loss}{bits}",
            bers=bers,
            repeats=repeats,
            error_model=template,
            on_trained=trained,
        )
        campaigns.append((label, stressed.campaign))
    summary: dict[str, Any] = {"campaigns": campaigns, "train_time_s": times, "out_dir": str(out)}
    if mondeq:
        certs, title = demo_mondeq_certificates(
            data, out / "mondeq", seed=seed, bits=DEMO_BITS, epochs=mondeq_epochs, log=log
        )
        summary["certificates"] = certs
        summary["mondeq_title"] = title
    return summary
