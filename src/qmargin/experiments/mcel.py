"""``qmargin reproduce mcel``: CE vs MCEL vs MHL vs RandBET vs CE + clipping under bit errors.

For every bit width and method: train (resumable run directory), then a paired bit-error campaign
(the same seeded patterns for every model), then one table and one plot per bit width. Training
time is reported relative to CE at the same bit width, measured in the same process.

Presets (``PRESETS``):

* ``fast`` — mnist5k, MLP 784-256-256-10, Adam 1e-3, 30 epochs, 2/4/8 bits, 20 patterns; the
  symmetric max-scaled quantizer plus the asymmetric quantizer for CE and MCEL. Minutes on 2 CPU
  cores; its results are committed in ``docs/results/``.
* ``fashion`` — Fashion-MNIST (files in ``--data-dir``), VGG3, 30 epochs, 50 patterns.
* ``cifar10`` — CIFAR-10 binary (files in ``--data-dir``), VGG7, 60 epochs, 50 patterns.
* ``full`` — ``fashion`` then ``cifar10``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmargin.errors import ConfigError
from qmargin.experiments.evaluate import error_model_for
from qmargin.experiments.progress import StepProgress, Steps
from qmargin.experiments.runs import (
    PATTERN_BASE_SEED,
    TrainConfig,
    TrainResult,
    load_dataset,
    train_and_stress,
)
from qmargin.files import copy_file_atomic, holds_lock, write_text_atomic
from qmargin.report import mcel_markdown, plot_accuracy_vs_ber

__all__ = ["Method", "Preset", "PRESETS", "METHODS", "run_mcel_reproduction"]

BERS = (0.0, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2)


@dataclass(frozen=True)
class Method:
    """One training recipe: a name and the ``TrainConfig`` fields it sets."""

    name: str
    fields: dict[str, Any]


METHODS: tuple[Method, ...] = (
    Method("CE", {"loss": "ce"}),
    Method("MCEL", {"loss": "mcel"}),
    Method("MHL", {"loss": "mhl"}),
    # Stutz et al.'s RandBET trains with clipping and random bit errors together.
    Method("RandBET", {"loss": "ce", "train_ber": 0.01, "w_max": 0.1}),
    Method("CE+clip", {"loss": "ce", "w_max": 0.1}),
    Method("MCEL+clip", {"loss": "mcel", "w_max": 0.1}),
    Method("CE asym", {"loss": "ce", "quant": "asym"}),
    Method("MCEL asym", {"loss": "mcel", "quant": "asym"}),
)


@dataclass(frozen=True)
class Preset:
    dataset: str
    model: str
    epochs: int
    bits: tuple[int, ...] = (2, 4, 8)
    repeats: int = 20
    bers: tuple[float, ...] = BERS
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "none"
    methods: tuple[Method, ...] = METHODS
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "fast": Preset(
        "mnist5k", "mlp", 30, description="mnist5k, MLP 784-256-256-10, Adam 1e-3, 30 epochs, 20 patterns"
    ),
    "fashion": Preset(
        "fashion-mnist", "vgg3", 30, repeats=50, description="Fashion-MNIST, VGG3, 30 epochs, 50 patterns"
    ),
    "cifar10": Preset(
        "cifar10",
        "vgg7",
        60,
        repeats=50,
        schedule="cosine",
        description="CIFAR-10 (binary), VGG7, Adam 1e-3 cosine, 60 epochs, 50 patterns",
    ),
}


@holds_lock("out_dir", also_check={"results_dir": "dir"})  # one process per --out, whole run
def run_mcel_reproduction(
    *,
    preset: str = "fast",
    out_dir: str | Path = "runs/reproduce-mcel",
    data_dir: str | Path | None = None,
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    preset_override: Preset | None = None,
    progress: StepProgress | None = None,
) -> dict[str, Any]:
    """Train every method at every bit width of ``preset``, run the paired campaigns, write results.

    Writes into ``out_dir``: one run directory per (method, bits) with its ``ber.json``, and
    ``summary.json``, ``summary.md`` and ``accuracy_vs_ber_{bits}bit.png``. Everything resumes.
    Returns ``{"summary": ..., "markdown": ...}``.
    """
    if preset == "full" and preset_override is None:
        parts = [
            run_mcel_reproduction(
                preset=p, out_dir=Path(out_dir) / p, data_dir=data_dir, log=log, progress=progress
            )
            for p in ("fashion", "cifar10")
        ]
        return {
            "summary": [p["summary"] for p in parts],
            "markdown": "\n\n".join(p["markdown"] for p in parts),
        }
    if preset_override is None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join([*PRESETS, 'full'])}")
    p = preset_override or PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(p.dataset, data_dir=data_dir)
    template = error_model_for()
    rows: list[dict[str, Any]] = []
    steps = Steps(len(p.bits) * len(p.methods), progress)
    for bits in p.bits:
        labelled: list[tuple[str, dict[str, Any]]] = []
        for method in p.methods:
            cfg = TrainConfig(
                dataset=p.dataset,
                model=p.model,
                bits=bits,
                epochs=p.epochs,
                batch_size=p.batch_size,
                lr=p.lr,
                schedule=p.schedule,
                seed=0,
                device="auto",
                data_dir=str(data_dir) if data_dir else None,
                model_kwargs=dict(p.model_kwargs),
                **method.fields,
            )
            run_dir = out / f"{_slug(method.name)}-{bits}bit"
            t0 = time.perf_counter()

            def trained(
                result: TrainResult, name: str = method.name, bits: int = bits, t0: float = t0
            ) -> None:
                log(
                    f"{name:>10} {bits}-bit: clean {result.test_acc:.4f}, "
                    f"train {result.train_time_s:.1f} s"
                    f"{' (stored)' if result.skipped else ''} [{time.perf_counter() - t0:.0f} s]"
                )

            stressed = train_and_stress(
                cfg, data, run_dir, bers=p.bers, repeats=p.repeats, error_model=template, on_trained=trained
            )
            result, campaign = stressed.result, stressed.campaign
            steps.done(f"{method.name} {bits}-bit")
            labelled.append((method.name, campaign))
            rows.append(
                {
                    "method": method.name,
                    "bits": bits,
                    "train_time_s": result.train_time_s,
                    "clean_accuracy": campaign["clean_accuracy"],
                    "results": [
                        {k: r[k] for k in ("ber", "mean", "std", "min", "max")} for r in campaign["results"]
                    ],
                    "config": result.config.to_dict(),
                }
            )
        plot_accuracy_vs_ber(
            labelled,
            out / f"accuracy_vs_ber_{bits}bit.png",
            title=f"{p.dataset}, {p.model}, {bits}-bit weights ({p.repeats} patterns)",
        )
    _add_time_ratios(rows)
    summary = {
        "preset": preset,
        "description": p.description,
        "bers": list(p.bers),
        "repeats": p.repeats,
        "base_seed": PATTERN_BASE_SEED,
        "rows": rows,
    }
    md = mcel_markdown(summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", md)
    if results_dir is not None:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        write_text_atomic(rd / f"mcel_{preset}.md", md)
        write_text_atomic(rd / f"mcel_{preset}.json", json.dumps(summary, indent=2))
        for bits in p.bits:
            src = out / f"accuracy_vs_ber_{bits}bit.png"
            copy_file_atomic(src, rd / f"mcel_{preset}_{bits}bit.png")
    return {"summary": summary, "markdown": md}


def _slug(name: str) -> str:
    return name.lower().replace("+", "-").replace(" ", "-")


def _add_time_ratios(rows: list[dict[str, Any]]) -> None:
    ce = {r["bits"]: r["train_time_s"] for r in rows if r["method"] == "CE"}
    for r in rows:
        base = ce.get(r["bits"])
        r["time_vs_ce"] = r["train_time_s"] / base if base else None
