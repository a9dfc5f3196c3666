"""``qmargin reproduce mondeq``: quantization robustness of a fully connected MonDEQ on mnist5k.

(``--preset conv``: the single-convolution experiment of :mod:`qmargin.experiments.mondeq_conv`.)

1. Train the float FC MonDEQ (n = 100, r = 25, learnable m starting at 0.2, PR solver).
2. PTQ sweep at 3..12 bits, per-tensor and per-row (per-channel) scales, W, U, b and the head
   quantized: ``||dW||_2``, ``mu(W)``, exact ``mu(W~)``, certified, monotone, FB and PR iterations on
   the test set, converged, accuracy.
3. Displacement validation at 6, 8, 12 bits: the share of test samples on which each bound form of
   ``||z* - z~*||`` holds (full, norm form, the paper's dW-only form), solved in float64 at tight
   tolerance, the solver error accounted for by :func:`qmargin.deq.residual_error_bound`.
4. QAT at 4 and 3 bits: plain QAT (per-tensor, m0 = 0.2), QAT with per-row scales, and the certified
   (margin-aware) QAT of :mod:`qmargin.deq.qat` (per-row, m0 = 1, penalty on ``||dW||_2 - mu``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmargin.deq import (
    MonDEQClassifier,
    MonotoneParameterization,
    certify,
    displacement_bound,
    monotonicity_margin,
    residual_error_bound,
    solve,
    spectral_norm,
)
from qmargin.deq.operators import DenseOperator
from qmargin.errors import ConfigError
from qmargin.experiments.mondeq_conv import CONV_PRESETS, ConvPreset, run_mondeq_conv_reproduction
from qmargin.experiments.progress import StepProgress, Steps
from qmargin.experiments.runs import TrainConfig, load_dataset, train_run
from qmargin.files import copy_file_atomic, holds_lock, write_text_atomic
from qmargin.models.mondeq import build_mondeq
from qmargin.quant import QuantSpec
from qmargin.report import mondeq_markdown, plot_mondeq_displacement, plot_mondeq_margin_vs_bits

__all__ = [
    "MonDEQPreset",
    "ConvPreset",
    "PRESETS",
    "FC_PRESETS",
    "run_mondeq_reproduction",
    "ptq_certificates",
]


@dataclass(frozen=True)
class MonDEQPreset:
    epochs: int
    qat_epochs: int
    seeds: tuple[int, ...]
    ptq_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 10, 12)
    displacement_bits: tuple[int, ...] = (6, 8, 12)
    qat_bits: tuple[int, ...] = (4, 3)
    model_kwargs: dict[str, Any] | None = None  # default: BASE_KWARGS


FC_PRESETS = {
    "fast": MonDEQPreset(epochs=15, qat_epochs=15, seeds=(0,)),
    "full": MonDEQPreset(epochs=30, qat_epochs=30, seeds=(0, 1, 2)),
}
PRESETS: dict[str, MonDEQPreset | ConvPreset] = {**FC_PRESETS, **CONV_PRESETS}
"""Every preset of ``qmargin reproduce mondeq``: the fully connected ones and the convolutional ones
(:mod:`qmargin.experiments.mondeq_conv`)."""

BASE_KWARGS = {"n": 100, "r": 25, "m": 0.2, "learn_m": True, "solver": "pr"}


def _mondeq(model: torch.nn.Module) -> MonDEQClassifier:
    """``model`` as the MonDEQ classifier it is (every model of this experiment is one)."""
    if not isinstance(model, MonDEQClassifier):
        raise TypeError(f"expected a MonDEQ classifier, got {type(model).__name__}")
    return model


def _quantized_copy(
    float_model: torch.nn.Module,
    spec: QuantSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    kwargs: dict[str, Any],
) -> MonDEQClassifier:
    q = build_mondeq(input_shape=input_shape, num_classes=num_classes, spec=spec, **kwargs)
    q.load_state_dict(float_model.state_dict())
    q.eval()
    return _mondeq(q)


def _tensors(core: MonotoneParameterization) -> dict[str, torch.Tensor]:
    """Float and quantized W, U, b of a parameterization (quantized = what the stored codes hold)."""
    out = {}
    for name in ("W", "U", "b"):
        out[name] = core.float_tensor(name).detach().double()
        out[name + "_q"] = (
            core.quantized_tensor(name) if name in core.quant_specs else core.float_tensor(name)
        )
        out[name + "_q"] = out[name + "_q"].detach().double()
    return out


def ptq_certificates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Certificate, solver behaviour and accuracy of a quantized MonDEQ classifier on ``(x, y)``."""
    model = _mondeq(model)
    core = model.core
    t = _tensors(core)
    cert = certify(t["W"], t["W_q"], U=t["U"], U_q=t["U_q"], b=t["b"], b_q=t["b_q"]).to_dict()
    with torch.no_grad():
        v = core.injection(x)
        op = core.operator(quantized=True)
        _, fb = solve(op, v, "fb", tol=1e-4, max_iter=3000)
        _, pr = solve(op, v, "pr", tol=1e-4, max_iter=500)
        logits = model(x)
        converged = model.converged
        assert converged is not None  # set by the forward pass just run
        ok = (logits.argmax(1) == y) & converged
    cert.update(
        fb_iterations=fb.iterations,
        fb_converged=bool(fb.converged),
        pr_iterations=pr.iterations,
        pr_converged=bool(pr.converged),
        accuracy=float(ok.double().mean()),
        nonconverged_samples=int((~converged).sum()),
    )
    return cert


def _displacement(q_model: MonDEQClassifier, x: torch.Tensor) -> dict[str, Any]:
    """Share of samples where each displacement bound holds (float64, tolerance accounted for)."""
    t = _tensors(q_model.core)
    xx = x.double().flatten(1)
    with torch.no_grad():
        v_f = xx @ t["U"].T + t["b"]
        v_q = xx @ t["U_q"].T + t["b_q"]
        z_f, st_f = solve(DenseOperator(t["W"]), v_f, "pr", tol=1e-12, max_iter=20000)
        z_q, st_q = solve(DenseOperator(t["W_q"]), v_q, "pr", tol=1e-12, max_iter=20000)
    bound = displacement_bound(t["W"], t["W_q"], t["U"], t["U_q"], t["b"], t["b_q"], xx, z_q)
    # The solves are approximate: ||z_f - z*|| <= eps_f and ||z_q - z~*|| <= eps_q (a-posteriori bounds),
    # and the full bound evaluated at z_q moves by at most ||dW||_2 eps_q / mu(W). A sample passes if
    # ||z_f - z_q|| <= bound(z_q) + eps_f + eps_q (1 + ||dW||_2 / mu(W)).
    eps_f = residual_error_bound(t["W"], t["U"], t["b"], xx, z_f)
    rigorous = float(monotonicity_margin(t["W_q"])) > 0
    eps_q = (
        residual_error_bound(t["W_q"], t["U_q"], t["b_q"], xx, z_q) if rigorous else torch.zeros_like(eps_f)
    )
    dw = float(spectral_norm(t["W_q"] - t["W"]))
    slack = eps_f + eps_q * (1 + dw / bound.margin)
    dist = torch.linalg.vector_norm(z_f - z_q, dim=1)
    out: dict[str, Any] = {
        "solver_converged": bool(st_f.converged and st_q.converged),
        "max_solver_allowance": float(slack.max()),
        "allowance_rigorous": rigorous,
        "mean_distance": float(dist.mean()),
    }
    for form in ("full", "norm_form", "paper"):
        b = getattr(bound, form)
        out[f"share_{form}"] = float((dist <= b + slack).double().mean())
        out[f"mean_{form}"] = float(b.mean())
        out[f"ratio_{form}"] = float((dist / b.clamp_min(1e-300)).max())
    out["distances"] = dist.tolist()
    out["bound_full"] = bound.full.tolist()
    out["bound_paper"] = bound.paper.tolist()
    return out


@holds_lock("out_dir", also_check={"results_dir": "dir"})  # one process per --out, whole run
def run_mondeq_reproduction(
    *,
    preset: str = "fast",
    out_dir: str | Path = "runs/reproduce-mondeq",
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: None,
    preset_override: MonDEQPreset | ConvPreset | None = None,
    dataset: str = "mnist5k",
    progress: StepProgress | None = None,
) -> dict[str, Any]:
    """Run the MonDEQ experiment; returns ``{"summary": ..., "markdown": ...}`` (resumable runs).

    A convolutional preset (``conv``, or a :class:`ConvPreset` override) runs
    :func:`qmargin.experiments.mondeq_conv.run_mondeq_conv_reproduction` under the same lock.
    """
    if preset_override is None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(preset_override, ConvPreset) or (preset_override is None and preset in CONV_PRESETS):
        conv = preset_override if isinstance(preset_override, ConvPreset) else None
        return run_mondeq_conv_reproduction(
            preset=preset,
            out_dir=out_dir,
            results_dir=results_dir,
            log=log,
            preset_override=conv,
            dataset=dataset,
            progress=progress,
        )
    p = preset_override if isinstance(preset_override, MonDEQPreset) else FC_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(dataset)
    shape, ncls = data.info.input_shape, data.info.num_classes
    x, y = data.x_test, data.y_test
    base = dict(p.model_kwargs or BASE_KWARGS)
    summary: dict[str, Any] = {
        "preset": preset,
        "dataset": dataset,
        "model": base,
        "float": [],
        "ptq": [],
        "displacement": [],
        "qat": [],
    }
    floats = {}
    cases = [(f"{b}", b, b) for b in p.displacement_bits] + [
        (f"W {max(p.displacement_bits)}, U/b 4", max(p.displacement_bits), 4)
    ]
    steps = Steps(
        len(p.seeds) + 2 * len(p.ptq_bits) + len(cases) + 3 * len(p.qat_bits) * len(p.seeds), progress
    )
    for seed in p.seeds:
        cfg = TrainConfig(
            dataset=dataset,
            model="mondeq",
            bits=32,
            epochs=p.epochs,
            seed=seed,
            device="cpu",
            model_kwargs=dict(base),
        )
        res = train_run(cfg, dataset=data, out_dir=out / f"float-s{seed}")
        fm = _mondeq(res.model.eval())
        floats[seed] = fm
        mu, L = (float(v) for v in fm.core.margin_and_norm(quantized=False))
        summary["float"].append(
            {
                "seed": seed,
                "accuracy": res.test_acc,
                "m": float(fm.core.m.detach()),
                "mu": mu,
                "L": L,
                "train_time_s": res.train_time_s,
            }
        )
        log(
            f"float MonDEQ seed {seed}: accuracy {res.test_acc:.4f}, m {float(fm.core.m.detach()):.3f}, "
            f"mu {mu:.3f}"
        )
        steps.done(f"float seed {seed}")
    fm = floats[p.seeds[0]]
    kwargs = dict(base)
    for pc in (False, True):
        for bits in p.ptq_bits:
            q = _quantized_copy(fm, QuantSpec(bits, per_channel=pc), shape, ncls, kwargs)
            row = {"bits": bits, "per_channel": pc, **ptq_certificates(q, x, y)}
            summary["ptq"].append(row)
            log(
                f"PTQ {bits:>2}-bit {'per-row' if pc else 'per-tensor'}: |dW| {row['delta_w_norm']:.3f} "
                f"mu {row['margin']:.3f} mu~ {row['margin_quantized']:.3f} certified {row['certified']} "
                f"acc {row['accuracy']:.4f}"
            )
            steps.done(f"PTQ {bits}-bit")
    # W, U, b at the same bits; then W fine and U, b coarse (a mixed-precision deployment), where the
    # paper's dW-only form has nothing to account for the input-side error.
    for label, w_bits, ub_bits in cases:
        q = _quantized_copy(fm, QuantSpec(w_bits), shape, ncls, kwargs)
        q.core.unfreeze()
        q.core.quant_specs["U"] = QuantSpec(ub_bits)
        q.core.quant_specs["b"] = QuantSpec(ub_bits)
        d = _displacement(q, x)
        summary["displacement"].append({"bits": label, "w_bits": w_bits, "ub_bits": ub_bits, **d})
        log(
            f"displacement {label}-bit: full {d['share_full']:.3f} norm {d['share_norm_form']:.3f} "
            f"paper {d['share_paper']:.3f}"
        )
        steps.done(f"displacement {label}-bit")
    recipes = [
        ("QAT", False, {**base}),
        ("QAT per-row", True, {**base}),
        ("certified QAT", True, {k: v for k, v in base.items() if k != "m"} | {"certify": True}),
    ]
    for bits in p.qat_bits:
        for name, pc, mk in recipes:
            for seed in p.seeds:
                cfg = TrainConfig(
                    dataset=dataset,
                    model="mondeq",
                    bits=bits,
                    per_channel=pc,
                    epochs=p.qat_epochs,
                    seed=seed,
                    device="cpu",
                    model_kwargs=mk,
                )
                res = train_run(
                    cfg, dataset=data, out_dir=out / f"{name.replace(' ', '-').lower()}-{bits}bit-s{seed}"
                )
                qm = _mondeq(res.model.eval())
                row = {
                    "method": name,
                    "bits": bits,
                    "seed": seed,
                    "per_channel": pc,
                    "m": float(qm.core.m.detach()),
                    "train_time_s": res.train_time_s,
                    **ptq_certificates(qm, x, y),
                }
                summary["qat"].append(row)
                log(
                    f"{name} {bits}-bit seed {seed}: acc {row['accuracy']:.4f} certified {row['certified']} "
                    f"|dW| {row['delta_w_norm']:.3f} mu {row['margin']:.3f} m {row['m']:.3f}"
                )
                steps.done(f"{name} {bits}-bit seed {seed}")
    md = mondeq_markdown(summary)
    plot_mondeq_margin_vs_bits(summary, out / "mondeq_margin_vs_bits.png")
    plot_mondeq_displacement(summary, out / "mondeq_displacement.png")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", md)
    if results_dir is not None:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        slim = {k: v for k, v in summary.items() if k != "displacement"}
        slim["displacement"] = [
            {k: v for k, v in d.items() if k not in ("distances", "bound_full", "bound_paper")}
            for d in summary["displacement"]
        ]
        write_text_atomic(rd / f"mondeq_{preset}.md", md)
        write_text_atomic(rd / f"mondeq_{preset}.json", json.dumps(slim, indent=2))
        for name in ("mondeq_margin_vs_bits.png", "mondeq_displacement.png"):
            copy_file_atomic(out / name, rd / name.replace("mondeq_", f"mondeq_{preset}_"))
    return {"summary": summary, "markdown": md}
