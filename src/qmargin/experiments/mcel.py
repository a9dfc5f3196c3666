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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmargin.errors import ConfigError
from qmargin.experiments.campaign import run_ber_campaign
from qmargin.experiments.evaluate import error_model_for
from qmargin.files import copy_file_atomic, write_text_atomic

__all__ = ["Method", "Preset", "PRESETS", "METHODS", "run_mcel_reproduction", "mcel_markdown"]

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


def run_mcel_reproduction(
    *,
    preset: str = "fast",
    out_dir: str | Path = "runs/reproduce-mcel",
    data_dir: str | Path | None = None,
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    preset_override: Preset | None = None,
) -> dict[str, Any]:
    """Train every method at every bit width of ``preset``, run the paired campaigns, write results.

    Writes into ``out_dir``: one run directory per (method, bits) with its ``ber.json``, and
    ``summary.json``, ``summary.md`` and ``accuracy_vs_ber_{bits}bit.png``. Everything resumes.
    Returns ``{"summary": ..., "markdown": ...}``.
    """
    if preset == "full" and preset_override is None:
        parts = [
            run_mcel_reproduction(preset=p, out_dir=Path(out_dir) / p, data_dir=data_dir, log=log)
            for p in ("fashion", "cifar10")
        ]
        return {
            "summary": [p["summary"] for p in parts],
            "markdown": "\n\n".join(p["markdown"] for p in parts),
        }
    if preset_override is None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join([*PRESETS, 'full'])}")
    p = preset_override or PRESETS[preset]
    from qmargin.data import load_dataset
    from qmargin.report import plot_accuracy_vs_ber
    from qmargin.training import TrainConfig, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(p.dataset, data_dir=data_dir)
    template = error_model_for()
    rows: list[dict[str, Any]] = []
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
            result = train(cfg, dataset=data, out_dir=run_dir)
            log(
                f"{method.name:>10} {bits}-bit: clean {result.test_acc:.4f}, "
                f"train {result.train_time_s:.1f} s"
                f"{' (stored)' if result.skipped else ''} [{time.perf_counter() - t0:.0f} s]"
            )
            campaign = run_ber_campaign(
                result.model,
                data.x_test,
                data.y_test,
                bers=p.bers,
                repeats=p.repeats,
                base_seed=100,
                error_model=template,
                out_path=run_dir / "ber.json",
                config=result.config.to_dict(),
            )
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
        "base_seed": 100,
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


def mcel_markdown(summary: dict[str, Any]) -> str:
    """Markdown table: one row per (bits, method), mean ± std accuracy (%) per BER, time vs CE."""
    bers: Sequence[float] = summary["bers"]
    head = ["bits", "method", *[("clean" if b == 0 else f"{b:g}") for b in bers], "train time vs CE"]
    lines = [
        f"Accuracy (%) under random bit errors in the stored weight codes, mean ± std over "
        f"{summary['repeats']} paired patterns (seeds {summary['base_seed']}..). "
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
