"""``qmargin reproduce mondeq --preset conv``: a certified low-bit single-convolution MonDEQ.

1. Train the float single-convolution MonDEQ (``mondeq-conv``: ``C`` channels, 3 x 3 factors, circular
   padding, learnable m starting at 0.2, PR, head on the 4 x 4 average-pooled state; Adam, lr 3e-3).
2. Post-training quantization at 3..8 bits (per-output-channel scales for ``W`` and ``U``, one scale
   for ``b``; the head too): the certificate *exact per frequency* (``||dW||_2``, ``mu(W)``,
   ``mu(W~)`` over the ``H (W // 2 + 1)`` blocks ``c x c`` of the circular convolution), the bit-flip
   budget of the kernel codes, accuracy with every non-converged solve counted as an error, and the
   displacement bound ``||z* - z~*|| <= ||dW z~* + dU x + db|| / mu(W)`` checked on every test sample
   (the largest ratio of the measured distance to the bound must be <= 1).
3. Certified QAT at 4 and 3 bits (:mod:`qmargin.deq.qat`, the exact per-frequency objective
   ``relu(||dW||_2 + delta - mu(W))``, m0 = 1): the same rows for the trained models (the displacement
   of the stored network against its latent float weights).

Resumable: the runs resume (``train_run``), and every analysis step is stored in
``OUT/analysis/<name>.json`` keyed by the SHA-256 of the weights it was computed from, so a rerun
skips what is done and recomputes what a retrained run changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmargin.deq import MonDEQClassifier, MonotoneMultiConv
from qmargin.errors import ConfigError
from qmargin.experiments.campaign import file_sha256
from qmargin.experiments.certify import (
    ConvReference,
    certify_conv_weights,
    conv_displacement,
    conv_float_reference,
)
from qmargin.experiments.progress import StepProgress, Steps
from qmargin.experiments.runs import TrainConfig, load_dataset, train_run
from qmargin.files import copy_file_atomic, write_text_atomic
from qmargin.models.mondeq import build_mondeq_conv
from qmargin.quant import QuantSpec
from qmargin.report import (
    mondeq_conv_markdown,
    plot_mondeq_conv_certificates,
    plot_mondeq_conv_displacement,
)
from qmargin.training import MODEL_FILE

__all__ = ["ConvPreset", "CONV_PRESETS", "run_mondeq_conv_reproduction", "conv_model_row"]


@dataclass(frozen=True)
class ConvPreset:
    """One configuration of the conv experiment (``CONV_PRESETS``; tests pass their own)."""

    epochs: int
    qat_epochs: int
    seed: int = 0
    channels: int = 8
    ptq_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    qat_bits: tuple[int, ...] = (4, 3)
    per_channel: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"tol": 1e-3, "max_iter": 200})
    displacement_samples: int | None = None  # None: every test sample
    displacement_max_iter: int = 500  # cap of the displacement solves (a non-monotone W~ may not converge)
    batch_size: int = 128
    lr: float = 3e-3
    qat_m: float = 1.0  # initial m of the certified QAT runs (a margin to spend on quantization)


CONV_PRESETS = {"conv": ConvPreset(epochs=4, qat_epochs=4)}
"""``conv``: 8.4 minutes measured on one (shared) CPU core, 1 thread; see docs/results/mondeq_conv.md."""


def _mondeq(model: torch.nn.Module) -> MonDEQClassifier:
    if not isinstance(model, MonDEQClassifier) or not isinstance(model.core, MonotoneMultiConv):
        raise TypeError(f"expected a convolutional MonDEQ classifier, got {type(model).__name__}")
    return model


def _accuracy(model: MonDEQClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> dict[str, Any]:
    """Top-1 accuracy with every non-converged solve an error; PR iterations (mean over batches)."""
    model.eval()
    correct = nonconv = 0
    iters: list[int] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            logits = model(x[i : i + batch])
            conv = model.converged
            stats = model.solver_stats
            assert conv is not None and stats is not None  # set by the forward just run
            correct += int(((logits.argmax(1) == y[i : i + batch]) & conv).sum())
            nonconv += int((~conv).sum())
            iters.append(stats.iterations)
    return {
        "accuracy": correct / x.shape[0],
        "nonconverged_samples": nonconv,
        "solver_iterations": sum(iters) / len(iters),
    }


def conv_model_row(
    model: MonDEQClassifier,
    bits: int,
    per_channel: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    reference: ConvReference | None,
    x_displacement: torch.Tensor,
    max_iter: int = 500,
) -> dict[str, Any]:
    """Certificate (exact per frequency), bit-flip budget, accuracy and displacement of a quantized model.

    ``model`` computes with ``bits``-bit ``W``, ``U``, ``b`` quantized as
    :func:`qmargin.experiments.certify.certify_conv_weights` quantizes them (the same codes), so the
    certificate, the accuracy and the displacement refer to one network.
    """
    core = model.core
    assert isinstance(core, MonotoneMultiConv)
    t0 = time.perf_counter()
    row = certify_conv_weights(core, bits, per_channel)
    row["certificate_time_s"] = time.perf_counter() - t0
    row.update(_accuracy(model, x, y))
    t0 = time.perf_counter()
    if reference is None:
        reference = conv_float_reference(core, x_displacement, max_iter=max_iter)
    d = conv_displacement(core, bits, per_channel, reference=reference, keep_samples=True, max_iter=max_iter)
    d["time_s"] = time.perf_counter() - t0
    row["displacement"] = d
    return row


class _Cache:
    """``OUT/analysis/<name>.json``: a step's result, valid while the weights' SHA-256 is unchanged."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str, sha: str) -> dict[str, Any] | None:
        p = self.root / f"{name}.json"
        if not p.is_file():
            return None
        try:
            stored = json.loads(p.read_text())
        except ValueError:
            return None
        if not isinstance(stored, dict) or stored.get("weights_sha256") != sha:
            return None
        result = stored.get("result")
        return result if isinstance(result, dict) else None

    def put(self, name: str, sha: str, result: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / f"{name}.json", json.dumps({"weights_sha256": sha, "result": result}))


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the per-sample lists (what docs/results keeps)."""
    out = dict(row)
    if isinstance(out.get("displacement"), dict):
        out["displacement"] = {
            k: v
            for k, v in out["displacement"].items()
            if k not in ("distances", "bound_full", "bound_paper")
        }
    return out


def run_mondeq_conv_reproduction(
    *,
    preset: str = "conv",
    out_dir: str | Path = "runs/reproduce-mondeq-conv",
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    preset_override: ConvPreset | None = None,
    dataset: str = "mnist5k",
    progress: StepProgress | None = None,
) -> dict[str, Any]:
    """Run the conv experiment (module doc); returns ``{"summary": ..., "markdown": ...}``.

    The caller holds the lock of ``out_dir`` (:func:`qmargin.experiments.mondeq.run_mondeq_reproduction`).
    """
    if preset_override is None and preset not in CONV_PRESETS:
        raise ConfigError(f"unknown conv preset {preset!r}; choose one of {', '.join(CONV_PRESETS)}")
    p = preset_override or CONV_PRESETS[preset]
    t_start = time.perf_counter()
    steps = Steps(1 + len(p.ptq_bits) + len(p.qat_bits), progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out / "analysis")
    data = load_dataset(dataset)
    shape, ncls = tuple(data.info.input_shape), data.info.num_classes
    x, y = data.x_test, data.y_test
    x_disp = x if p.displacement_samples is None else x[: p.displacement_samples]
    base: dict[str, Any] = {"channels": p.channels, "m": 0.2, "learn_m": True, **p.model_kwargs}
    summary: dict[str, Any] = {
        "preset": preset,
        "dataset": dataset,
        "model": "mondeq-conv",
        "model_kwargs": base,
        "config": {k: v for k, v in asdict(p).items() if k != "model_kwargs"},
        "test_samples": int(x.shape[0]),
        "displacement_samples": int(x_disp.shape[0]),
        "threads": torch.get_num_threads(),
        "float": {},
        "ptq": [],
        "qat": [],
    }

    def train(
        name: str, bits: int, kwargs: dict[str, Any], epochs: int
    ) -> tuple[MonDEQClassifier, str, float]:
        cfg = TrainConfig(
            dataset=dataset,
            model="mondeq-conv",
            bits=bits,
            per_channel=p.per_channel and bits != 32,
            epochs=epochs,
            seed=p.seed,
            device="cpu",
            batch_size=p.batch_size,
            lr=p.lr,
            model_kwargs=kwargs,
        )
        res = train_run(cfg, dataset=data, out_dir=out / name)
        return _mondeq(res.model.eval()), file_sha256(out / name / MODEL_FILE), res.train_time_s

    # 1. float
    fm, fsha, ftime = train("float", 32, base, p.epochs)
    fcore = fm.core
    assert isinstance(fcore, MonotoneMultiConv)
    row = cache.get("float", fsha)
    if row is None:
        mu, L = (float(v) for v in fcore.margin_and_norm(quantized=False))
        row = {"m": float(fcore.m.detach()), "mu": mu, "L": L, "train_time_s": ftime, **_accuracy(fm, x, y)}
        cache.put("float", fsha, row)
    summary["float"] = row
    log(
        f"float conv MonDEQ: accuracy {row['accuracy']:.4f}, m {row['m']:.3f}, mu {row['mu']:.3f}, "
        f"L {row['L']:.3f}"
    )
    steps.done("float")

    # 2. PTQ sweep (one float reference solve shared by every bit width)
    reference: ConvReference | None = None
    for bits in p.ptq_bits:
        name = f"ptq-{bits}bit"
        prow = cache.get(name, fsha)
        if prow is None:
            if reference is None:
                reference = conv_float_reference(fcore, x_disp, max_iter=p.displacement_max_iter)
            spec = QuantSpec(bits, per_channel=p.per_channel)
            q = build_mondeq_conv(input_shape=shape, num_classes=ncls, spec=spec, **base)
            q.load_state_dict(fm.state_dict())
            prow = {
                "method": "PTQ",
                **conv_model_row(
                    _mondeq(q.eval()),
                    bits,
                    p.per_channel,
                    x,
                    y,
                    reference=reference,
                    x_displacement=x_disp,
                    max_iter=p.displacement_max_iter,
                ),
            }
            cache.put(name, fsha, prow)
        summary["ptq"].append(prow)
        d = prow["displacement"]
        log(
            f"PTQ {bits}-bit: |dW| {prow['delta_w_norm']:.4f} mu {prow['margin']:.4f} "
            f"mu~ {prow['margin_quantized']:.4f} certified {prow['certified']} acc {prow['accuracy']:.4f} "
            f"max dist/bound {d['ratio_full']:.3f}"
        )
        steps.done(f"PTQ {bits}-bit")

    # 3. certified QAT
    qkw = {**base, "m": p.qat_m, "certify": True}
    for bits in p.qat_bits:
        name = f"certified-qat-{bits}bit"
        qm, qsha, qtime = train(name, bits, qkw, p.qat_epochs)
        qrow = cache.get(name, qsha)
        if qrow is None:
            qrow = {
                "method": "certified QAT",
                "m": float(qm.core.m.detach()),
                "train_time_s": qtime,
                **conv_model_row(
                    qm,
                    bits,
                    p.per_channel,
                    x,
                    y,
                    reference=None,
                    x_displacement=x_disp,
                    max_iter=p.displacement_max_iter,
                ),
            }
            cache.put(name, qsha, qrow)
        summary["qat"].append(qrow)
        log(
            f"certified QAT {bits}-bit: acc {qrow['accuracy']:.4f} certified {qrow['certified']} "
            f"|dW| {qrow['delta_w_norm']:.4f} mu {qrow['margin']:.4f} m {qrow['m']:.3f}"
        )
        steps.done(f"certified QAT {bits}-bit")
    summary["wall_time_s"] = time.perf_counter() - t_start
    md = mondeq_conv_markdown(summary)
    plot_mondeq_conv_certificates(summary, out / "mondeq_conv_certificates.png")
    plot_mondeq_conv_displacement(summary, out / "mondeq_conv_displacement.png")
    write_text_atomic(out / "summary_conv.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary_conv.md", md)
    if results_dir is not None:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        slim = {
            **summary,
            "ptq": [_slim(r) for r in summary["ptq"]],
            "qat": [_slim(r) for r in summary["qat"]],
        }
        write_text_atomic(rd / f"mondeq_{preset}.md", md)
        write_text_atomic(rd / f"mondeq_{preset}.json", json.dumps(slim, indent=2))
        for fig in ("mondeq_conv_certificates.png", "mondeq_conv_displacement.png"):
            copy_file_atomic(out / fig, rd / fig.replace("mondeq_conv_", f"mondeq_{preset}_"))
    return {"summary": summary, "markdown": md}
