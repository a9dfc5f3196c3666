"""``qmargin reproduce mcel``: CE vs MCEL vs MHL vs RandBET vs CE + clipping under bit errors.

For every bit width and method: train (resumable run directory), then a paired bit-error campaign
(the same seeded patterns for every model), then one table and one plot per bit width. Training
time is reported relative to CE at the same bit width, measured in the same process.

Presets (``PRESETS``):

* ``fast`` — mnist5k, MLP 784-256-256-10, Adam 1e-3, 30 epochs, 2/4/8 bits, 20 patterns; the
  symmetric max-scaled quantizer plus the asymmetric quantizer for CE and MCEL. Minutes on 2 CPU
  cores; its results are committed in ``docs/results/``.
* ``fast-vgg3``, ``fast-resnet20`` — the convolutional path on real data: mnist5k, CE vs MCEL at 2
  and 4 bits, 10 epochs, 20 patterns.
* ``fashion`` — Fashion-MNIST (found without ``--data-dir`` where Debian's ``dataset-fashion-mnist``
  puts it, ``/usr/share/datasets/fashion-mnist``; or ``--data-dir`` / ``$QMARGIN_DATA``),
  VGG3, Adam 1e-3, 5 epochs (about 20 minutes per model on one core); the paper's grid (issue 9):
  CE, MCEL, MHL, RandBET, CE + clipping, MCEL + clipping at 2 and 4 bits, a second training seed for
  CE and MCEL at 4 bits, CE and MCEL at 8 bits, binary VGG3s (1-bit sign weights, scale mean |w|,
  straight-through gradient) with CE, MCEL and MHL with b = 128 (in code units, see ``MHL_BINARY``),
  then every 2- and 4-bit model again with offset-binary storage; BERs 0 to 2e-2; 20 to 50 paired
  patterns per BER on the 10,000 test images (sequential stopping at ±0.5 points). Hours on CPU;
  resumable run by run, and the summary is rewritten after every run.
* ``cifar10`` — CIFAR-10 binary (files in ``--data-dir``), MobileNetV2 as in the MCEL paper (CIFAR
  strides, quantized depthwise convolutions), CE, MCEL, MHL, RandBET and clipping at 2, 4 and 8 bits,
  60 epochs, 20 to 50 patterns. Not run here (no CIFAR-10 offline; a GPU's job).
* ``imagenette`` — Imagenette (fast.ai's ImageFolder release in ``--data-dir``, 64x64,
  :mod:`qmargin.data.imagenette`), ResNet-18, CE vs MCEL at 2, 4 and 8 bits, 30 epochs cosine, 20 to 50
  patterns. Not run here (no Imagenette offline).
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
from qmargin.training.factory import resolve_device

__all__ = ["Method", "Preset", "PRESETS", "METHODS", "MHL_BINARY", "run_mcel_reproduction"]

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

MHL_BINARY = Method("MHL b=128", {"loss": "mhl", "loss_kwargs": {"b": 128.0, "units": "codes"}})
"""The margin hinge loss as the BNN bit-error work uses it (Buschjäger et al., DATE 2021: b = 128), on
outputs in code units ``z / Δ`` (the popcount scale of a BNN; :mod:`qmargin.training.code_units`). On
raw logits (``z = Δ · popcount``, ``Δ`` = mean |w| ~ 1e-2) a hinge at 128 is never reached, the loss is
linear and a 1-bit VGG3 trained to 31 % (MLP) or chance; in code units it trains (1-bit VGG3, mnist5k,
5 epochs: 97.6 %)."""


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
    plan: tuple[tuple[int, str, int], ...] | None = None
    """``(bits, method name, training seed)`` in run order; ``None``: every method at every bit width,
    seed 0 (bit width by bit width)."""
    storages: tuple[tuple[int, str], ...] = ()
    """``(bits, storage)``: every model of that bit width is also evaluated with that word format
    (same weights, another campaign, after the plan)."""
    ci_halfwidth: float | None = None
    """Sequential stopping (fraction units) with ``min_patterns``; ``repeats`` is then the cap."""
    min_patterns: int = 5

    def runs(self) -> list[tuple[int, Method, int]]:
        """The training runs, in order."""
        if self.plan is None:
            return [(b, m, 0) for b in self.bits for m in self.methods]
        by_name = {m.name: m for m in self.methods}
        unknown = [name for _, name, _ in self.plan if name not in by_name]
        if unknown:
            raise ConfigError(f"the preset's plan names unknown methods: {', '.join(unknown)}")
        return [(b, by_name[name], seed) for b, name, seed in self.plan]


def _fashion_plan() -> tuple[tuple[int, str, int], ...]:
    """The paper's grid on Fashion-MNIST (issue 9), the most telling runs first."""
    first = [(4, "CE", 0), (4, "MCEL", 0), (2, "CE", 0), (2, "MCEL", 0)]
    rest = [(b, m, 0) for b in (4, 2) for m in ("MHL", "RandBET", "CE+clip", "MCEL+clip")]
    binary = [(1, "CE", 0), (1, "MCEL", 0), (1, MHL_BINARY.name, 0)]
    return (*first, *rest, (4, "CE", 1), (4, "MCEL", 1), (8, "CE", 0), (8, "MCEL", 0), *binary)


PRESETS: dict[str, Preset] = {
    "fast": Preset(
        "mnist5k", "mlp", 30, description="mnist5k, MLP 784-256-256-10, Adam 1e-3, 30 epochs, 20 patterns"
    ),
    "fashion": Preset(
        "fashion-mnist",
        "vgg3",
        5,
        bits=(1, 2, 4, 8),
        repeats=50,
        bers=(0.0, 1e-3, 5e-3, 1e-2, 1.5e-2, 2e-2),
        methods=(*METHODS, MHL_BINARY),
        plan=_fashion_plan(),
        storages=((4, "offset"), (2, "offset")),
        ci_halfwidth=0.005,
        min_patterns=20,
        description="Fashion-MNIST (60,000 / 10,000), VGG3, Adam 1e-3, batch 128, 5 epochs; at least 20 "
        "and up to 50 paired patterns per BER on the 10,000 test images (until the 95% CI is ±0.5 points)",
    ),
    "fast-vgg3": Preset(
        "mnist5k",
        "vgg3",
        10,
        bits=(2, 4),
        methods=METHODS[:2],
        description="mnist5k, VGG3 (64-64 conv, fc 2048), Adam 1e-3, 10 epochs, CE vs MCEL, 20 patterns",
    ),
    "fast-resnet20": Preset(
        "mnist5k",
        "resnet20",
        10,
        bits=(2, 4),
        methods=METHODS[:2],
        description="mnist5k, ResNet-20, Adam 1e-3, 10 epochs, CE vs MCEL, 20 patterns",
    ),
    "cifar10": Preset(
        "cifar10",
        "mobilenetv2",
        60,
        bits=(2, 4, 8),
        repeats=50,
        schedule="cosine",
        methods=METHODS[:6],
        ci_halfwidth=0.005,
        min_patterns=20,
        description="CIFAR-10 (binary), MobileNetV2 (CIFAR strides, quantized depthwise convolutions), "
        "Adam 1e-3 cosine, 60 epochs, 20 to 50 patterns",
    ),
    "imagenette": Preset(
        "imagenette",
        "resnet18",
        30,
        bits=(2, 4, 8),
        repeats=50,
        schedule="cosine",
        methods=METHODS[:2],
        ci_halfwidth=0.005,
        min_patterns=20,
        description="Imagenette (9,469 / 3,925, 64x64), ResNet-18 (CIFAR stem), Adam 1e-3 cosine, 30 epochs, "
        "CE vs MCEL, 20 to 50 patterns",
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
    runs = p.runs()
    storages = [(b, s) for b, s in p.storages if any(rb == b for rb, _, _ in runs)]
    steps = Steps(len(runs) + sum(1 for b, _ in storages for rb, _, _ in runs if rb == b), progress)
    labelled: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    campaign_kw: dict[str, Any] = (
        {} if p.ci_halfwidth is None else {"ci_halfwidth": p.ci_halfwidth, "min_patterns": p.min_patterns}
    )
    campaign_kw["device"] = str(resolve_device("auto"))  # campaigns where training ran (a GPU if any)
    summary: dict[str, Any] = {}
    md = ""

    def write_summary() -> None:
        nonlocal summary, md
        _add_time_ratios(rows)
        summary = {
            "preset": preset,
            "description": p.description,
            "bers": list(p.bers),
            "repeats": p.repeats,
            **(
                {}
                if p.ci_halfwidth is None
                else {"min_patterns": p.min_patterns, "ci_halfwidth": p.ci_halfwidth}
            ),
            "base_seed": PATTERN_BASE_SEED,
            "rows": rows,
        }
        md = mcel_markdown(summary)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        write_text_atomic(out / "summary.md", md)

    def publish() -> None:
        """The summary (and with ``results_dir`` its copies and plots) of the rows done so far."""
        write_summary()
        if results_dir is None:
            return
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        write_text_atomic(rd / f"mcel_{preset}.md", md)
        write_text_atomic(rd / f"mcel_{preset}.json", json.dumps(summary, indent=2))
        for b in sorted(labelled):
            copy_file_atomic(out / f"accuracy_vs_ber_{b}bit.png", rd / f"mcel_{preset}_{b}bit.png")

    variants = [(bits, method, seed, None) for bits, method, seed in runs] + [
        (bits, method, seed, storage) for b, storage in storages for bits, method, seed in runs if bits == b
    ]
    for bits, method, seed, storage in variants:
        cfg = TrainConfig(
            dataset=p.dataset,
            model=p.model,
            bits=bits,
            epochs=p.epochs,
            batch_size=p.batch_size,
            lr=p.lr,
            schedule=p.schedule,
            seed=seed,
            device="auto",
            data_dir=str(data_dir) if data_dir else None,
            model_kwargs=dict(p.model_kwargs),
            **method.fields,
        )
        run_dir = out / (f"{_slug(method.name)}-{bits}bit" + (f"-s{seed}" if seed else ""))
        label = method.name + (f" seed {seed}" if seed else "") + (f" ({storage})" if storage else "")
        t0 = time.perf_counter()

        def trained(result: TrainResult, name: str = label, bits: int = bits, t0: float = t0) -> None:
            log(
                f"{name:>10} {bits}-bit: clean {result.test_acc:.4f}, "
                f"train {result.train_time_s:.1f} s"
                f"{' (stored)' if result.skipped else ''} [{time.perf_counter() - t0:.0f} s]"
            )

        stressed = train_and_stress(
            cfg,
            data,
            run_dir,
            bers=p.bers,
            repeats=p.repeats,
            error_model=template if storage is None else error_model_for(storage=storage),
            on_trained=trained,
            result_name="ber.json" if storage is None else f"ber-{storage}.json",
            **campaign_kw,
        )
        result, campaign = stressed.result, stressed.campaign
        steps.done(f"{label} {bits}-bit")
        if storage is None:  # the storage variants go in the table; under random flips offset binary
            labelled.setdefault(bits, []).append((label, campaign))  # equals two's complement exactly
        rows.append(
            {
                "method": label,
                "bits": bits,
                **({} if p.plan is None and not p.storages else {"seed": seed, "storage": storage or "twos"}),
                "train_time_s": result.train_time_s,
                "clean_accuracy": campaign["clean_accuracy"],
                "results": [
                    {k: r[k] for k in ("ber", "mean", "std", "min", "max")}
                    | ({"patterns": len(r["accuracies"])} if p.ci_halfwidth is not None else {})
                    for r in campaign["results"]
                ],
                "config": result.config.to_dict(),
            }
        )
        plot_accuracy_vs_ber(
            labelled[bits],
            out / f"accuracy_vs_ber_{bits}bit.png",
            title=f"{p.dataset}, {p.model}, {bits}-bit weights ({_patterns_text(p)})",
        )
        publish()  # partial results are usable while the rest runs (hours for the fashion preset)
    publish()
    return {"summary": summary, "markdown": md}


def _patterns_text(p: Preset) -> str:
    if p.ci_halfwidth is None:
        return f"{p.repeats} patterns"
    return f"{p.min_patterns} to {p.repeats} patterns, until the 95% CI is ±{100 * p.ci_halfwidth:g} points"


def _slug(name: str) -> str:
    return name.lower().replace("+", "-").replace(" ", "-")


def _add_time_ratios(rows: list[dict[str, Any]]) -> None:
    ce = {r["bits"]: r["train_time_s"] for r in rows if r["method"] == "CE"}
    for r in rows:
        base = ce.get(r["bits"])
        r["time_vs_ce"] = r["train_time_s"] / base if base else None
