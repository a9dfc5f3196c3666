"""``qmargin certify``: certificates of a MonDEQ quantized at several bit widths, from the weights alone.

Accepts a run directory of ``qmargin train --model mondeq`` (or ``mondeq-conv`` /
``mondeq-multitier``) or a ``.pt`` state dict of the two public reference implementations
(recognised by its keys, read with ``torch.load(weights_only=True)``). For each bit width b:
``W~ = Q_b(W)`` (the assembled matrix, or the assembled kernel of a convolutional ``W``), ``U~``,
``b~`` and :func:`qmargin.deq.certify`, plus the largest number of arbitrary bit flips in W's stored
codes that provably keeps W~ monotone and, with a BER, the share of random error patterns that stay
certified.

Convolutional networks (circular padding): the certificate is computed on the ``H (W // 2 + 1)``
per-frequency ``c x c`` blocks of ``W`` and ``W~`` (:func:`qmargin.deq.conv_frequency_blocks`), so
``mu(W)``, ``mu(W~)``, ``||dW||_2`` and ``L`` are exact, not bounds (design.md §5); ``||dU||_2`` is
the max over the input grid's frequencies of the blocks of ``dU``'s kernel and ``||db||`` the norm of
the bias change over the whole state. Bit flips hit the codes of the assembled kernel; a flip of
tap ``(o, c, p, q)`` by ``delta`` adds ``delta e_o e_c^T`` times a phase to *every* block, so one
flip moves ``||dW||_2`` by exactly its size and ``k`` flips by at most
:func:`qmargin.deq.bit_flip_perturbation_bounds` (kernel form).

With ``samples`` (run directories), the displacement bound is checked on that many test samples of
the run's dataset at each bit width: float and quantized equilibria solved in float64 (PR with
Anderson, tight tolerance), ``max ||z* - z~*|| / bound`` reported (it must be <= 1 up to the
solver's a-posteriori error, which is accounted for).

Error pattern ``r`` of ``--ber`` flips the bits ``qmargin.faults.inject`` flips with seed ``seed + r``
in the stored ``W`` of the MonDEQ's core (:func:`qmargin.deq.bit_error_pattern`), i.e. the patterns a
``qmargin evaluate`` campaign with the same base ``--seed`` evaluates: the certified share and the
campaign's accuracies refer to the same corrupted codes (for the same clean codes, i.e. the same
quantizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmargin.deq import MonDEQClassifier, MonotoneLinear, MonotoneMultiConv
from qmargin.deq.bit_certificates import MONDEQ_LAYER
from qmargin.errors import CheckpointError, ConfigError
from qmargin.quant import QuantSpec

__all__ = [
    "load_mondeq_for_certification",
    "certify_weights",
    "certify_conv_weights",
    "ConvReference",
    "conv_float_reference",
    "conv_displacement",
    "fc_displacement",
    "certify_checkpoint",
    "demo_mondeq_certificates",
]


def load_mondeq_for_certification(
    path: str | Path, *, m: float | None = None
) -> tuple[MonDEQClassifier, str]:
    """``(classifier, source format)`` from a run directory or an imported ``.pt`` state dict.

    ``m`` (a finite number > 0) is the constructor argument of a 2020-format checkpoint; given with a
    run directory or a 2026-format file (which store their ``m``) it is a ``ConfigError``, not ignored.
    """
    from qmargin.deq import check_m, detect_format, load_mondeq_checkpoint, read_state_dict

    p = Path(path)
    if m is not None:
        m = check_m(m)
    if p.is_dir():
        if m is not None:
            raise ConfigError(f"{p}: a qmargin run stores its m; m (--m) is for 2020-format .pt checkpoints")
        from qmargin.training import load_run

        model, config, _ = load_run(p)
        if not isinstance(model, MonDEQClassifier):
            raise CheckpointError(
                f"{p}: a {config.model!r} run, not a MonDEQ (train one with --model mondeq)"
            )
        return model, "qmargin run"
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or run directory")
    if m is None:
        return load_mondeq_checkpoint(p), "imported state dict"
    state_dict = read_state_dict(p)
    if detect_format(state_dict) == "companion2026":
        raise ConfigError(f"{p}: a 2026-format checkpoint stores its m; m (--m) is for the 2020 format")
    return load_mondeq_checkpoint(state_dict, m=m), "imported state dict"


def certify_weights(
    core: MonotoneLinear,
    bits: int,
    per_channel: bool,
    *,
    ber: float | None = None,
    patterns: int = 100,
    seed: int = 0,
    layer: str = MONDEQ_LAYER,
) -> dict[str, Any]:
    """Certificate of a fully connected monotone parameterization quantized at ``bits``.

    With ``ber``: ``patterns`` random error patterns, pattern ``r`` drawn as ``inject`` draws it with
    seed ``seed + r`` for the tensor ``W`` of the module named ``layer`` (the core's name in its model).
    """
    from qmargin.deq import certify, certify_under_bit_errors, max_certified_bit_flips
    from qmargin.quant import QuantSpec, dequantize, quantize

    spec = QuantSpec(bits, per_channel=per_channel)
    with torch.no_grad():
        W = core.assemble_W().detach().double()
        U = core.U.detach().double()
        b = core.b.detach().double()
        codes, scale, zp = quantize(W, spec)
        W_q = dequantize(codes, scale, zp, spec)
        U_q = dequantize(*quantize(U, spec), spec)
        b_spec = QuantSpec(bits)  # one scale for the bias vector (per-element scales would be exact)
        b_q = dequantize(*quantize(b, b_spec), b_spec)
    row: dict[str, Any] = {
        "bits": bits,
        "per_channel": per_channel,
        **certify(W, W_q, U=U, U_q=U_q, b=b, b_q=b_q).to_dict(),
    }
    if bits <= 8:
        flips = max_certified_bit_flips(W_q, codes, scale, spec).to_dict()
        row["max_certified_bit_flips"] = flips["max_flips"]
        if bits >= 3:  # the same with the two most significant bits protected (e.g. by ECC)
            prot = max_certified_bit_flips(W_q, codes, scale, spec, protected_bits=(-1, -2)).to_dict()
            row["max_certified_bit_flips_msb2_protected"] = prot["max_flips"]
        if ber is not None:
            be = certify_under_bit_errors(W_q, codes, scale, zp, spec, ber, patterns, seed, layer=layer)
            row["ber"] = ber
            row["ber_seed"] = seed
            row["ber_certified_share"] = be.certified_share
            row["ber_monotone_share"] = be.monotone_share
    return row


def _conv_quantized(core: MonotoneMultiConv, bits: int, per_channel: bool) -> dict[str, Any]:
    """Float and ``bits``-bit ``W`` kernel (with its codes), ``U`` kernel and ``b`` of a conv core."""
    from qmargin.quant import dequantize, quantize

    spec = QuantSpec(bits, per_channel=per_channel)
    b_spec = QuantSpec(bits)  # one scale for the bias vector, as the FC path and the model builders
    with torch.no_grad():
        K = core.float_tensor("W").detach().double()
        U = core.float_tensor("U").detach().double()
        b = core.float_tensor("b").detach().double()
        codes, scale, zp = quantize(K, spec)
        return {
            "spec": spec,
            "K": K,
            "K_q": dequantize(codes, scale, zp, spec),
            "codes": codes,
            "scale": scale,
            "zero_point": zp,
            "U": U,
            "U_q": dequantize(*quantize(U, spec), spec),
            "b": b,
            "b_q": dequantize(*quantize(b, b_spec), b_spec),
        }


def certify_conv_weights(
    core: MonotoneMultiConv,
    bits: int,
    per_channel: bool,
    *,
    ber: float | None = None,
    patterns: int = 100,
    seed: int = 0,
    layer: str = MONDEQ_LAYER,
) -> dict[str, Any]:
    """Exact per-frequency certificate of a convolutional monotone core quantized at ``bits``.

    ``W`` and ``W~ = Q_b(K_W)`` as ``H_c (W_c // 2 + 1)`` blocks ``c x c`` on the state's grid
    (``H_c x W_c``, the coarse grid of a multi-tier core); ``dU`` as the blocks of its kernel on the
    image grid (``C_0 x C_in`` each); ``b`` expanded over the state. Bit-flip budgets on the codes of
    the assembled kernel (:func:`qmargin.deq.max_certified_bit_flips`, kernel form), random patterns
    drawn as ``inject`` draws them for the tensor ``W`` of ``layer``.
    """
    from qmargin.deq import (
        certify,
        certify_under_bit_errors,
        conv_frequency_blocks,
        max_certified_bit_flips,
    )

    t = _conv_quantized(core, bits, per_channel)
    grid = core.grid
    Wb = conv_frequency_blocks(t["K"], grid, onesided=True)
    Wb_q = conv_frequency_blocks(t["K_q"], grid, onesided=True)
    Ub = conv_frequency_blocks(t["U"], core.image_size, onesided=True)
    Ub_q = conv_frequency_blocks(t["U_q"], core.image_size, onesided=True)
    c = certify(Wb, Wb_q, U=Ub, U_q=Ub_q, b=core.expanded_bias(t["b"]), b_q=core.expanded_bias(t["b_q"]))
    cert = c.to_dict()
    row: dict[str, Any] = {
        "bits": bits,
        "per_channel": per_channel,
        "form": "conv",
        "frequencies": int(Wb.shape[0]),
        "block_size": int(Wb.shape[-1]),
        "grid": list(grid),
        **cert,
    }
    # weights-only coefficients of the displacement bound's norm form:
    # ||z* - z~*|| <= (||dW||_2 ||z~*|| + ||dU||_2 ||x|| + ||db||) / mu(W)
    if c.margin > 0:
        row["displacement_per_state_norm"] = c.delta_w_norm / c.margin
        row["displacement_per_input_norm"] = (c.delta_u_norm or 0.0) / c.margin
        row["displacement_bias_term"] = (c.delta_b_norm or 0.0) / c.margin
    spec: QuantSpec = t["spec"]
    if bits <= 8:
        codes, scale = t["codes"], t["scale"]
        flips = max_certified_bit_flips(Wb_q, codes, scale, spec).to_dict()
        row["max_certified_bit_flips"] = flips["max_flips"]
        if bits >= 3:
            prot = max_certified_bit_flips(Wb_q, codes, scale, spec, protected_bits=(-1, -2)).to_dict()
            row["max_certified_bit_flips_msb2_protected"] = prot["max_flips"]
        if ber is not None:

            def blocks(kernel: torch.Tensor) -> torch.Tensor:
                return conv_frequency_blocks(kernel, grid, onesided=True)

            be = certify_under_bit_errors(
                Wb_q, codes, scale, t["zero_point"], spec, ber, patterns, seed, assemble=blocks, layer=layer
            )
            row["ber"] = ber
            row["ber_seed"] = seed
            row["ber_certified_share"] = be.certified_share
            row["ber_monotone_share"] = be.monotone_share
    return row


def _allowance_dict(
    dist: torch.Tensor, bound: Any, slack: torch.Tensor, rigorous: bool, converged: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "samples": int(dist.numel()),
        "solver_converged": converged,
        "max_solver_allowance": float(slack.max()),
        "allowance_rigorous": rigorous,
        "mean_distance": float(dist.mean()),
        "max_distance": float(dist.max()),
    }
    for form in ("full", "norm_form", "paper"):
        b = getattr(bound, form)
        out[f"share_{form}"] = float((dist <= b + slack).double().mean())
        out[f"mean_{form}"] = float(b.mean())
        out[f"ratio_{form}"] = float((dist / b.clamp_min(1e-300)).max())
        out[f"ratio_{form}_with_allowance"] = float((dist / (b + slack).clamp_min(1e-300)).max())
    return out


@dataclass(frozen=True)
class ConvReference:
    """The float network's equilibria on ``x`` (per batch), shared by the displacement checks of one core.

    ``batches``: ``(x, v_f, z_f, eps_f)`` per batch, float64; ``eps_f`` the a-posteriori error bound
    of ``z_f`` (:func:`qmargin.deq.conv_residual_error_bound`). ``converged``: every solve converged.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    converged: bool


def _solve_f32(kernel: torch.Tensor, grid: tuple[int, int], v: torch.Tensor, tol: float, max_iter: int):
    """PR with Anderson in float32 (fast); the iterate is returned in float64 for the rigorous bounds."""
    from qmargin.deq import solve
    from qmargin.deq.operators import ConvOperator

    op = ConvOperator(kernel.float(), grid)
    z, st = solve(op, v.float(), "pr", tol=tol, max_iter=max_iter, accelerator="anderson")
    return z.double(), st


def conv_float_reference(
    core: MonotoneMultiConv,
    x: torch.Tensor,
    *,
    tol: float = 1e-5,
    max_iter: int = 2000,
    batch_size: int = 250,
) -> ConvReference:
    """Float equilibria ``z*`` of ``core`` (float ``K_W``, ``U``, ``b``) on ``x``, per batch."""
    from qmargin.deq import conv_residual_error_bound

    with torch.no_grad():
        K = core.float_tensor("W").detach().double()
        U = core.float_tensor("U").detach().double()
        b = core.float_tensor("b").detach().double()
        batches = []
        converged = True
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(torch.float64)
            v_f = core.inject(xb, U, b)
            z_f, st = _solve_f32(K, core.grid, v_f, tol, max_iter)
            converged = converged and bool(st.converged)
            batches.append((xb, v_f, z_f, conv_residual_error_bound(K, core.grid, v_f, z_f)))
    return ConvReference(batches, converged)


def conv_displacement(
    core: MonotoneMultiConv,
    bits: int,
    per_channel: bool,
    x: torch.Tensor | None = None,
    *,
    reference: ConvReference | None = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
    batch_size: int = 250,
    keep_samples: bool = False,
    max_iter_nonmonotone: int = 100,
) -> dict[str, Any]:
    """The displacement bound checked on every sample of ``x`` for a conv core quantized at ``bits``.

    A quantized operator with ``mu(W~) <= 0`` has no convergence guarantee: its solve is capped at
    ``max_iter_nonmonotone`` iterations (the row says whether it converged).

    Float ``z*`` (``K_W``, ``U``, ``b``; or ``reference``, :func:`conv_float_reference`) and quantized
    ``z~*`` (``Q_b`` of all three) solved by PR with Anderson to the relative residual ``tol`` (in
    float32, for speed); everything after the solve is float64: the bound
    :func:`qmargin.deq.conv_displacement_bound` at ``z~*`` with ``n_in = ||dU||_2 ||x|| + ||db||`` and
    the solvers' errors, accounted for with the a-posteriori bound
    :func:`qmargin.deq.conv_residual_error_bound` (``eps_f``, and ``eps_q`` when ``mu(W~) > 0``,
    rigorous for any iterate whatever its precision): a sample passes if
    ``||z_f - z_q|| <= bound(z_q) + eps_f + eps_q (1 + ||dW||_2 / mu(W))``. Reports the share of
    samples that pass and ``max ||z_f - z_q|| / bound`` per bound form.
    """
    from qmargin.deq import (
        DisplacementBound,
        conv_displacement_bound,
        conv_frequency_blocks,
        conv_residual_error_bound,
        monotonicity_margin,
        spectral_norm,
    )

    if reference is None:
        if x is None:
            raise ValueError("conv_displacement needs the inputs x or a float reference")
        reference = conv_float_reference(core, x, tol=tol, max_iter=max_iter, batch_size=batch_size)
    t = _conv_quantized(core, bits, per_channel)
    grid = core.grid
    mu = float(monotonicity_margin(conv_frequency_blocks(t["K"], grid, onesided=True)))
    mu_q = float(monotonicity_margin(conv_frequency_blocks(t["K_q"], grid, onesided=True)))
    dw = float(spectral_norm(conv_frequency_blocks(t["K_q"] - t["K"], grid, onesided=True)))
    du = float(spectral_norm(conv_frequency_blocks(t["U_q"] - t["U"], core.image_size, onesided=True)))
    db = float(torch.linalg.vector_norm(core.expanded_bias(t["b_q"] - t["b"])))
    rigorous = mu_q > 0
    dists, fulls, norms, papers, slacks = [], [], [], [], []
    converged = reference.converged
    with torch.no_grad():
        for xb, v_f, z_f, eps_f in reference.batches:
            v_q = core.inject(xb, t["U_q"], t["b_q"])
            z_q, st_q = _solve_f32(t["K_q"], grid, v_q, tol, max_iter if rigorous else max_iter_nonmonotone)
            converged = converged and bool(st_q.converged)
            x_norm = torch.linalg.vector_norm(xb.flatten(1), dim=1)
            bound = conv_displacement_bound(
                t["K"], t["K_q"], grid, z_q, v_q - v_f, input_norm_bound=du * x_norm + db
            )
            eps_q = (
                conv_residual_error_bound(t["K_q"], grid, v_q, z_q) if rigorous else torch.zeros_like(eps_f)
            )
            slacks.append(eps_f + eps_q * (1 + dw / mu))
            dists.append(torch.linalg.vector_norm((z_f - z_q).flatten(1), dim=1))
            fulls.append(bound.full)
            norms.append(bound.norm_form)
            papers.append(bound.paper)
    dist = torch.cat(dists)
    full = DisplacementBound(torch.cat(fulls), torch.cat(norms), torch.cat(papers), mu)
    out = _allowance_dict(dist, full, torch.cat(slacks), rigorous, converged)
    out.update(bits=bits, per_channel=per_channel, margin=mu, margin_quantized=mu_q, delta_w_norm=dw)
    if keep_samples:
        out["distances"] = dist.tolist()
        out["bound_full"] = full.full.tolist()
        out["bound_paper"] = full.paper.tolist()
    return out


def fc_displacement(
    core: MonotoneLinear,
    bits: int,
    per_channel: bool,
    x: torch.Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 20000,
) -> dict[str, Any]:
    """:func:`conv_displacement` for a fully connected core (dense :func:`qmargin.deq.displacement_bound`)."""
    from qmargin.deq import (
        displacement_bound,
        monotonicity_margin,
        residual_error_bound,
        solve,
        spectral_norm,
    )
    from qmargin.deq.operators import DenseOperator
    from qmargin.quant import dequantize, quantize

    spec = QuantSpec(bits, per_channel=per_channel)
    b_spec = QuantSpec(bits)
    with torch.no_grad():
        W = core.float_tensor("W").detach().double()
        U = core.float_tensor("U").detach().double()
        b = core.float_tensor("b").detach().double()
        W_q = dequantize(*quantize(W, spec), spec)
        U_q = dequantize(*quantize(U, spec), spec)
        b_q = dequantize(*quantize(b, b_spec), b_spec)
        xx = x.to(torch.float64).flatten(1)
        v_f, v_q = xx @ U.T + b, xx @ U_q.T + b_q
        z_f, st_f = solve(DenseOperator(W), v_f, "pr", tol=tol, max_iter=max_iter, accelerator="anderson")
        z_q, st_q = solve(DenseOperator(W_q), v_q, "pr", tol=tol, max_iter=max_iter, accelerator="anderson")
    bound = displacement_bound(W, W_q, U, U_q, b, b_q, xx, z_q)
    mu_q = float(monotonicity_margin(W_q))
    rigorous = mu_q > 0
    eps_f = residual_error_bound(W, U, b, xx, z_f)
    eps_q = residual_error_bound(W_q, U_q, b_q, xx, z_q) if rigorous else torch.zeros_like(eps_f)
    dw = float(spectral_norm(W_q - W))
    slack = eps_f + eps_q * (1 + dw / bound.margin)
    dist = torch.linalg.vector_norm(z_f - z_q, dim=1)
    out = _allowance_dict(dist, bound, slack, rigorous, bool(st_f.converged and st_q.converged))
    out.update(
        bits=bits, per_channel=per_channel, margin=bound.margin, margin_quantized=mu_q, delta_w_norm=dw
    )
    return out


def certify_checkpoint(
    path: str | Path,
    *,
    bits: Sequence[int],
    per_channel: bool = False,
    m: float | None = None,
    ber: float | None = None,
    patterns: int = 100,
    seed: int = 0,
    samples: int | None = None,
) -> dict[str, Any]:
    """``{"source", "format", "form", "results": [one certificate dict per bit width]}``.

    ``seed``: base seed of the ``ber`` patterns (pattern ``r`` uses ``seed + r``, as campaigns do).
    ``samples``: check the displacement bound on the first ``samples`` test samples of a run
    directory's dataset at every bit width (``row["displacement"]``); not for imported state dicts,
    which name no dataset.
    """
    model, fmt = load_mondeq_for_certification(path, m=m)
    core = model.core
    layer = next(name for name, module in model.named_modules() if module is core)
    x = None
    if samples is not None:
        if not Path(path).is_dir():
            raise ConfigError(
                f"{path}: --samples needs a run directory (an imported state dict names no dataset)"
            )
        from qmargin.data import load_dataset
        from qmargin.training import load_run

        _, config, _ = load_run(Path(path))
        data = load_dataset(config.dataset, data_dir=config.data_dir)
        x = data.x_test[:samples]
    results = []
    ref: ConvReference | None = None
    for b in bits:
        if isinstance(core, MonotoneMultiConv):
            row = certify_conv_weights(
                core, b, per_channel, ber=ber, patterns=patterns, seed=seed, layer=layer
            )
            if x is not None:
                if ref is None:
                    ref = conv_float_reference(core, x)
                row["displacement"] = conv_displacement(core, b, per_channel, reference=ref)
        elif isinstance(core, MonotoneLinear):
            row = certify_weights(core, b, per_channel, ber=ber, patterns=patterns, seed=seed, layer=layer)
            row["form"] = "fc"
            if x is not None:
                row["displacement"] = fc_displacement(core, b, per_channel, x)
        else:
            raise CheckpointError(f"{path}: certify has no certificate for a {type(core).__name__} core")
        results.append(row)
    form = "conv" if isinstance(core, MonotoneMultiConv) else "fc"
    return {"source": str(path), "format": fmt, "form": form, "per_channel": per_channel, "results": results}


def demo_mondeq_certificates(
    data: Any,
    out_dir: str | Path,
    *,
    seed: int,
    bits: Sequence[int],
    epochs: int = 8,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[list[dict[str, Any]], str]:
    """Train a small float MonDEQ on the demo data and certify it at ``bits`` (per-row scales)."""
    from qmargin.training import TrainConfig, train

    cfg = TrainConfig(
        dataset=data.info.name,
        model="mondeq",
        bits=32,
        epochs=epochs,
        seed=seed,
        device="cpu",
        model_kwargs={"n": 64, "r": 16, "m": 0.5},
    )
    res = train(cfg, dataset=data, out_dir=Path(out_dir))
    log(f"trained float MonDEQ (n=64): clean test accuracy {res.test_acc:.4f}")
    core = res.model.core
    if not isinstance(core, MonotoneLinear):
        raise TypeError(f"the demo MonDEQ is fully connected, got {type(core).__name__}")
    rows = [certify_weights(core, b, True) for b in bits]
    return (
        rows,
        f"MonDEQ (n=64, m0=0.5) on {data.info.name}: certificates from the weights alone (per-row scales)",
    )
