"""Quantization certificates of monotone operator equilibrium networks (design.md §5).

Pure functions on plain tensors, so they serve any MonDEQ implementation. An *operator* ``W`` is given
in one of two forms:

* **dense**: a real (or complex) ``(n, n)`` matrix;
* **per-frequency blocks**: a ``(F, c, c)`` stack (complex for a circular convolution) of the blocks
  ``W_f`` of a block-diagonal operator. A circular convolution is block-diagonalised by the unitary
  DFT, so every spectral quantity of the operator is the min / max of that quantity over the blocks
  (:func:`conv_frequency_blocks` builds the stack of one convolution).

Symbols (design.md §5): ``mu(W) = lambda_min((I - W + (I - W)^T) / 2)`` is the monotonicity margin,
``L(W) = ||I - W||_2`` the Lipschitz constant, ``kappa = L / mu``. A quantized operator is written
``W~ = W + dW`` (likewise ``U~ = U + dU``, ``b~ = b + db``). All linear algebra runs in float64 /
complex128 (``torch.linalg.eigvalsh`` and ``torch.linalg.matrix_norm(ord=2)``, both batched and
exact, no power iteration).

What is certified:

* **a-priori convergence** (Weyl): ``mu(W~) >= mu(W) - lambda_max(sym(dW)) >= mu(W) - ||dW||_2``, so
  ``||dW||_2 < mu(W)`` certifies that the quantized network is strongly monotone, hence has a unique
  equilibrium that forward-backward and Peaceman-Rachford reach, without running a solver. Only the
  symmetric part of ``dW`` moves the margin, which gives a sharper (still a-priori) test
  ``lambda_max(sym(dW)) < mu(W)`` that :class:`Certificate` reports beside the paper's one.
* **equilibrium displacement** (:func:`displacement_bound`), valid for the full perturbation
  (``dW``, ``dU`` and ``db``), on every sample.
* **solver rates** with ``(mu(W~), L(W~))`` and the step sizes they imply (:func:`solver_rates`).
* **bit errors in the stored codes** (beyond the paper): the largest number of *arbitrary* bit flips
  that provably keep ``W~`` monotone (:func:`max_certified_bit_flips`), and the share of random error
  patterns at a bit error rate that stay certified / monotone (:func:`certify_under_bit_errors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from qmargin.quant import QuantSpec, dequantize

__all__ = [
    "monotonicity_margin",
    "lipschitz_constant",
    "spectral_norm",
    "sym_max_eigenvalue",
    "conv_frequency_blocks",
    "fb_rate",
    "pr_rate",
    "SolverRates",
    "solver_rates",
    "Certificate",
    "certify",
    "DisplacementBound",
    "displacement_bound",
    "residual_error_bound",
    "code_bit_deltas",
    "bit_flip_perturbation_bounds",
    "BitFlipCertificate",
    "max_certified_bit_flips",
    "BitErrorCertificate",
    "certify_under_bit_errors",
]


# --------------------------------------------------------------------------------------------------
# Operators: dense matrices and stacks of per-frequency blocks
# --------------------------------------------------------------------------------------------------
def _as_operator(W: Tensor, name: str = "W") -> Tensor:
    """``W`` as float64 / complex128, checked to be ``(n, n)`` or ``(F, c, c)``."""
    if not isinstance(W, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() not in (2, 3) or W.shape[-1] != W.shape[-2]:
        raise ValueError(
            f"{name} must be a square (n, n) matrix or a (F, c, c) stack of blocks, "
            f"got shape {tuple(W.shape)}"
        )
    if W.numel() == 0:
        raise ValueError(f"{name} is empty")
    W = W.to(torch.complex128) if W.is_complex() else W.to(torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} has non-finite entries")
    return W


def _i_minus(W: Tensor) -> Tensor:
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return eye - W


def _hermitian_part(M: Tensor) -> Tensor:
    return (M + M.mH) / 2


def _check_same_form(W: Tensor, W_q: Tensor) -> None:
    if W.shape != W_q.shape:
        raise ValueError(
            f"W and W_q must have the same form and shape, got {tuple(W.shape)} and {tuple(W_q.shape)}"
        )


def monotonicity_margin(W: Tensor) -> Tensor:
    """Monotonicity margin ``mu(W) = lambda_min((I - W + (I - W)^H) / 2)`` (design.md §5).

    ``W`` is a dense ``(n, n)`` matrix or a ``(F, c, c)`` stack of per-frequency blocks; for blocks
    ``mu = min_f lambda_min(Herm(I - W_f))``. Computed exactly with a (batched) ``eigvalsh`` in
    float64 / complex128. Returns a 0-d float64 tensor (differentiable where the smallest eigenvalue
    is simple). ``mu(W) > 0`` means ``F(z) = (I - W) z - (U x + b)`` is ``mu``-strongly monotone.
    """
    W = _as_operator(W)
    return torch.linalg.eigvalsh(_hermitian_part(_i_minus(W)))[..., 0].min()


def sym_max_eigenvalue(D: Tensor) -> Tensor:
    """``lambda_max(Herm(D))`` (max over blocks): by how much the perturbation ``D`` can lower a margin.

    Weyl: ``mu(W + D) >= mu(W) - lambda_max(Herm(D))`` and ``lambda_max(Herm(D)) <= ||D||_2``.
    """
    D = _as_operator(D, "D")
    return torch.linalg.eigvalsh(_hermitian_part(D))[..., -1].max()


def spectral_norm(D: Tensor) -> Tensor:
    """Spectral norm ``||D||_2`` (largest singular value) as a 0-d float64 tensor.

    * 1-D: the Euclidean norm of the vector;
    * 2-D ``(m, n)``: the largest singular value (any shape, e.g. ``dU``);
    * 3-D ``(F, m, n)``: block-diagonal operator, the max over blocks of their largest singular values.
    """
    if not isinstance(D, Tensor):
        raise TypeError(f"D must be a torch.Tensor, got {type(D).__name__}")
    D = D.to(torch.complex128) if D.is_complex() else D.to(torch.float64)
    if D.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    if D.dim() == 1:
        return torch.linalg.vector_norm(D)
    if D.dim() not in (2, 3):
        raise ValueError(f"spectral_norm expects a vector, a matrix or a stack of blocks, got {D.dim()}-D")
    return torch.linalg.matrix_norm(D, ord=2).max()


def lipschitz_constant(W: Tensor) -> Tensor:
    """Lipschitz constant ``L(W) = ||I - W||_2`` (max over blocks for a per-frequency stack)."""
    return spectral_norm(_i_minus(_as_operator(W)))


def conv_frequency_blocks(
    kernel: Tensor, spatial_shape: tuple[int, int], *, onesided: bool = False
) -> Tensor:
    """Per-frequency blocks of one circular 2-D convolution: a complex128 ``(F, C_out, C_in)`` stack.

    Convention (PyTorch's cross-correlation with circular padding, kernel centred at
    ``(ph, pw) = ((kh - 1) // 2, (kw - 1) // 2)``)::

        y = F.conv2d(F.pad(x, (pw, kw - 1 - pw, ph, kh - 1 - ph), mode="circular"), kernel)
        y[o, i, j] = sum_{c, p, q} kernel[o, c, p, q] * x[c, (i + p - ph) mod H, (j + q - pw) mod W]

    (for odd kernels this is ``F.pad(x, (k // 2,) * 4, mode="circular")``). With the DFT of every
    channel, ``X[c, u, v] = sum_{i, j} x[c, i, j] exp(-2 pi i (u i / H + v j / W))`` (``torch.fft.fft2``),
    the convolution acts frequency by frequency, ``Y[:, u, v] = K_(u, v) X[:, u, v]``, with the
    ``C_out x C_in`` block

        K_(u, v)[o, c] = sum_{p, q} kernel[o, c, p, q] exp(+2 pi i (u (p - ph) / H + v (q - pw) / W)).

    The unitary DFT is the same on input and output, so singular values (and, for ``C_out == C_in``,
    the spectrum of the Hermitian part of ``I - W``) of the ``(C H W)``-dimensional operator are those
    of the blocks taken together. Blocks are ordered ``f = u * W + v``. Kernels larger than the image
    wrap around (taps add up), exactly as the convolution of a circularly padded image would.

    Args:
        kernel: ``(C_out, C_in, kh, kw)`` real tensor.
        spatial_shape: ``(H, W)`` of the image the operator acts on.
        onesided: keep only ``v = 0 .. W // 2`` (``F = H * (W // 2 + 1)``). For a real kernel the
            dropped blocks are complex conjugates of kept ones, which have the same singular values
            and Hermitian-part eigenvalues, so margins and norms are unchanged at about half the cost.
    """
    if kernel.dim() != 4:
        raise ValueError(f"kernel must be (C_out, C_in, kh, kw), got shape {tuple(kernel.shape)}")
    H, Wd = (int(s) for s in spatial_shape)
    if H < 1 or Wd < 1:
        raise ValueError(f"spatial_shape must be positive, got {spatial_shape}")
    c_out, c_in, kh, kw = kernel.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    k = kernel.to(torch.complex128) if kernel.is_complex() else kernel.to(torch.float64)
    grid = torch.zeros((c_out, c_in, H, Wd), dtype=k.dtype, device=k.device)
    for p in range(kh):
        for q in range(kw):
            grid[:, :, (p - ph) % H, (q - pw) % Wd] += k[:, :, p, q]
    if onesided:
        if k.is_complex():
            raise ValueError("onesided=True needs a real kernel")
        khat = torch.fft.rfft2(grid).conj().resolve_conj()
    else:
        khat = torch.fft.ifft2(grid) * (H * Wd)
    return khat.permute(2, 3, 0, 1).reshape(-1, c_out, c_in)


# --------------------------------------------------------------------------------------------------
# Solver rates
# --------------------------------------------------------------------------------------------------
def fb_rate(a: float, mu: float, L: float) -> float:
    """Forward-backward contraction factor ``sqrt(1 - 2 a mu + a^2 L^2)`` (< 1 iff ``0 < a < 2 mu / L^2``).

    It bounds ``||I - a (I - W)||_2``; the projection (relu) is nonexpansive, so the FB map
    ``z -> relu(z - a((I - W) z - (U x + b)))`` contracts by this factor.
    """
    return math.sqrt(max(0.0, 1.0 - 2.0 * a * mu + a * a * L * L))


def pr_rate(a: float, mu: float, L: float) -> float:
    """Peaceman-Rachford contraction factor ``sqrt(1 - 4 a mu / (1 + a L)^2)``.

    It is < 1 for every step ``a > 0`` as soon as ``mu > 0``.
    """
    return math.sqrt(max(0.0, 1.0 - 4.0 * a * mu / (1.0 + a * L) ** 2))


@dataclass(frozen=True)
class SolverRates:
    """Best step sizes and contraction factors of FB and PR for a given ``(mu, L)``.

    FB: ``a = mu / L^2``, rate ``sqrt(1 - mu^2 / L^2)``. PR: ``a = 1 / L``, rate ``sqrt(1 - mu / L)``.
    All fields are ``None`` when ``mu <= 0``: the operator is not strongly monotone and neither
    splitting has a convergence guarantee (no rate exists, and none is made up).
    """

    fb_step: float | None
    fb_rate: float | None
    pr_step: float | None
    pr_rate: float | None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def solver_rates(mu: float, L: float) -> SolverRates:
    """Optimal FB / PR step sizes and their rates for margin ``mu`` and Lipschitz constant ``L``."""
    mu, L = float(mu), float(L)
    if not (mu > 0.0) or not (L > 0.0) or not math.isfinite(mu) or not math.isfinite(L):
        return SolverRates(None, None, None, None)
    a_fb = mu / (L * L)
    a_pr = 1.0 / L
    return SolverRates(a_fb, fb_rate(a_fb, mu, L), a_pr, pr_rate(a_pr, mu, L))


# --------------------------------------------------------------------------------------------------
# The certificate
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """A-priori quantization certificate of ``W~ = W + dW`` (design.md §5).

    Attributes:
        margin: ``mu(W)`` of the float operator.
        margin_quantized: exact ``mu(W~)``.
        delta_w_norm: ``||dW||_2``.
        delta_w_sym: ``lambda_max(sym(dW))`` (``<= ||dW||_2``): the most ``dW`` can lower the margin.
        delta_u_norm / delta_b_norm: ``||dU||_2`` / ``||db||_2``; ``None`` when not given.
        certified: ``||dW||_2 < mu(W)`` (the paper's sufficient condition; implies ``monotone``).
        certified_sym: ``lambda_max(sym(dW)) < mu(W)`` (sharper, still a-priori; implies ``monotone``).
        monotone: ``mu(W~) > 0`` (exact; the certificates are sufficient, not necessary).
        lipschitz / lipschitz_quantized: ``L(W)`` / ``L(W~)``.
        kappa: ``L(W~) / mu(W~)``; ``None`` when ``W~`` is not monotone.
        weyl_lower_bound: ``mu(W) - ||dW||_2 <= mu(W~)``.
        weyl_lower_bound_sym: ``mu(W) - lambda_max(sym(dW)) <= mu(W~)``.
        fb_step, fb_rate, pr_step, pr_rate: best FB / PR step sizes and rates with ``(mu(W~), L(W~))``;
            ``None`` when ``W~`` is not monotone (no guarantee, no NaN).
    """

    margin: float
    margin_quantized: float
    delta_w_norm: float
    delta_w_sym: float
    delta_u_norm: float | None
    delta_b_norm: float | None
    certified: bool
    certified_sym: bool
    monotone: bool
    lipschitz: float
    lipschitz_quantized: float
    kappa: float | None
    weyl_lower_bound: float
    weyl_lower_bound_sym: float
    fb_step: float | None
    fb_rate: float | None
    pr_step: float | None
    pr_rate: float | None

    def to_dict(self) -> dict[str, float | bool | None]:
        """JSON-safe dict (floats, bools and ``None`` only)."""
        return asdict(self)


def _delta(a: Tensor | None, a_q: Tensor | None, name: str) -> Tensor | None:
    """``a_q - a`` in float64 (complex128 if either is complex); ``None`` when neither is given."""
    if (a is None) != (a_q is None):
        raise ValueError(f"give both {name} and {name}_q, or neither")
    if a is None or a_q is None:
        return None
    if a.shape != a_q.shape:
        raise ValueError(f"{name} and {name}_q differ in shape: {tuple(a.shape)} vs {tuple(a_q.shape)}")
    if a.is_complex() or a_q.is_complex():
        return a_q.to(torch.complex128) - a.to(torch.complex128)
    return a_q.to(torch.float64) - a.to(torch.float64)


def _pair_norm(a: Tensor | None, a_q: Tensor | None, name: str) -> float | None:
    d = _delta(a, a_q, name)
    if d is None:
        return None
    if name == "b":
        return float(torch.linalg.vector_norm(d))
    return float(spectral_norm(d))


def certify(
    W: Tensor,
    W_q: Tensor,
    *,
    U: Tensor | None = None,
    U_q: Tensor | None = None,
    b: Tensor | None = None,
    b_q: Tensor | None = None,
) -> Certificate:
    """Certificate of the quantized operator ``W_q`` against the float operator ``W``.

    ``W`` and ``W_q`` are both dense ``(n, n)`` or both ``(F, c, c)`` stacks of per-frequency blocks
    (same frequency order). ``U``/``U_q`` (dense ``(n, d)`` or blocks ``(F, c, d)``) and ``b``/``b_q``
    (the full bias vector that is added, any shape, taken as one vector; for a convolutional layer
    expand the per-channel bias over space first) only enter ``delta_u_norm`` / ``delta_b_norm``.

    The certificate: ``mu(W~) >= mu(W) - lambda_max(sym(dW)) >= mu(W) - ||dW||_2`` (Weyl on the
    Hermitian part; per block for a stack), so ``||dW||_2 < mu(W)`` proves ``mu(W~) > 0`` without a
    solver. ``mu(W~)`` is reported exactly beside it.
    """
    Wf = _as_operator(W, "W")
    Wq = _as_operator(W_q, "W_q")
    _check_same_form(Wf, Wq)
    if Wf.is_complex() != Wq.is_complex():
        Wf, Wq = Wf.to(torch.complex128), Wq.to(torch.complex128)
    dW = Wq - Wf
    mu = float(monotonicity_margin(Wf))
    mu_q = float(monotonicity_margin(Wq))
    dw = float(spectral_norm(dW))
    dw_sym = float(sym_max_eigenvalue(dW))
    L = float(lipschitz_constant(Wf))
    L_q = float(lipschitz_constant(Wq))
    monotone = mu_q > 0.0
    rates = solver_rates(mu_q, L_q)
    return Certificate(
        margin=mu,
        margin_quantized=mu_q,
        delta_w_norm=dw,
        delta_w_sym=dw_sym,
        delta_u_norm=_pair_norm(U, U_q, "U"),
        delta_b_norm=_pair_norm(b, b_q, "b"),
        certified=dw < mu,
        certified_sym=dw_sym < mu,
        monotone=monotone,
        lipschitz=L,
        lipschitz_quantized=L_q,
        kappa=(L_q / mu_q) if monotone else None,
        weyl_lower_bound=mu - dw,
        weyl_lower_bound_sym=mu - dw_sym,
        fb_step=rates.fb_step,
        fb_rate=rates.fb_rate,
        pr_step=rates.pr_step,
        pr_rate=rates.pr_rate,
    )


# --------------------------------------------------------------------------------------------------
# Displacement of the equilibrium
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DisplacementBound:
    """Per-sample bounds on ``||z* - z~*||_2`` (each a float64 tensor of shape ``(N,)``).

    Attributes:
        full: ``||dW z~* + dU x + db|| / mu(W)`` (exact consequence of strong monotonicity; always holds).
        norm_form: ``(||dW||_2 ||z~*|| + ||dU||_2 ||x|| + ||db||) / mu(W)`` (>= ``full``; always holds).
        paper: ``||dW||_2 ||z~*|| / mu(W)`` (the paper's form, dW only; can fail when U or b are
            quantized too).
        margin: ``mu(W)``.
    """

    full: Tensor
    norm_form: Tensor
    paper: Tensor
    margin: float

    def to_dict(self) -> dict[str, list[float] | float]:
        return {
            "full": self.full.tolist(),
            "norm_form": self.norm_form.tolist(),
            "paper": self.paper.tolist(),
            "margin": self.margin,
        }


def displacement_bound(
    W: Tensor,
    W_q: Tensor,
    U: Tensor | None,
    U_q: Tensor | None,
    b: Tensor | None,
    b_q: Tensor | None,
    x: Tensor,
    z_q: Tensor,
) -> DisplacementBound:
    """Per-sample bound on the distance between the float and the quantized equilibria.

    Float network ``z* = relu(W z* + U x + b)``, quantized network ``z~* = relu(W~ z~* + U~ x + b~)``
    with ``W~ = W + dW``, ``U~ = U + dU``, ``b~ = b + db``. If ``mu(W) > 0``, then for every sample

        ||z* - z~*|| <= ||dW z~* + dU x + db|| / mu(W)                                   (full)
                     <= (||dW||_2 ||z~*|| + ||dU||_2 ||x|| + ||db||) / mu(W).             (norm form)

    Derivation. Let ``P = relu`` be the projection onto the cone ``K = {z >= 0}`` and ``N_K`` its normal
    cone, so ``w = P(v)  <=>  v - w in N_K(w)``; ``N_K`` is a monotone operator (equivalently, ``P`` is
    firmly nonexpansive): ``<n1 - n2, w1 - w2> >= 0`` for ``n_i in N_K(w_i)``. The two fixed points give

        (W z* + U x + b) - z* in N_K(z*),      (W~ z~* + U~ x + b~) - z~* in N_K(z~*).

    Put ``d = z~* - z*`` and ``e = dW z~* + dU x + db``, so ``W~ z~* + U~ x + b~ = W z~* + U x + b + e``.
    Monotonicity of ``N_K`` applied to the two normal vectors:

        0 <= <(W z~* + U x + b + e - z~*) - (W z* + U x + b - z*), d> = <e, d> - d^T (I - W) d.

    Strong monotonicity of the float operator ``F(z) = (I - W) z - (U x + b)``, i.e.
    ``d^T (I - W) d >= mu(W) ||d||^2``, and Cauchy-Schwarz give ``mu(W) ||d||^2 <= <e, d> <= ||e|| ||d||``,
    hence ``||d|| <= ||e|| / mu(W)``; the norm form is the triangle inequality on ``e``. Nothing is
    assumed about ``W~``: the bound holds for *every* equilibrium ``z~*`` of the quantized network
    (it need not be monotone or unique), and it needs ``z~*`` itself, not ``z*``. (Plain
    nonexpansiveness of ``P`` alone gives ``||d|| <= a ||e|| / (1 - r(a))`` with the FB factor
    ``r(a) = sqrt(1 - 2 a mu + a^2 L^2)`` for every step ``a``; that is larger than ``||e|| / mu`` for
    every ``a > 0`` and tends to it as ``a -> 0``.) The paper's form ``||dW||_2 ||z~*|| / mu(W)`` drops
    ``dU x + db`` and is therefore not a bound when ``U`` or ``b`` are quantized as well.

    When ``z_q`` comes from a solver, it is ``z~*`` only up to the solver's error ``eps``; the full form
    evaluated at ``z_q`` then moves by at most ``||dW||_2 eps / mu(W)`` (see :func:`residual_error_bound`
    for a rigorous ``eps``).

    Args:
        W, W_q: dense ``(n, n)`` float and quantized operators.
        U, U_q: dense ``(n, d)`` input weights (or both ``None``: not quantized).
        b, b_q: ``(n,)`` biases (or both ``None``).
        x: ``(N, d)`` inputs; z_q: ``(N, n)`` equilibria of the quantized network.

    Raises:
        ValueError: if ``mu(W) <= 0`` (no strong monotonicity, no bound) or shapes disagree.
    """
    Wf = _as_operator(W, "W")
    Wq = _as_operator(W_q, "W_q")
    _check_same_form(Wf, Wq)
    if Wf.dim() != 2:
        raise ValueError("displacement_bound needs dense (n, n) operators")
    n = Wf.shape[0]
    mu = float(monotonicity_margin(Wf))
    if not mu > 0.0:
        raise ValueError(f"the float operator is not strongly monotone (mu(W) = {mu:.3g} <= 0): no bound")
    z = z_q.to(torch.float64)
    if z.dim() != 2 or z.shape[1] != n:
        raise ValueError(f"z_q must be (N, {n}), got {tuple(z_q.shape)}")
    xx = x.to(torch.float64).reshape(z.shape[0], -1)
    dW = Wq - Wf
    e = z @ dW.T
    dw_norm = float(spectral_norm(dW))
    z_norm = torch.linalg.vector_norm(z, dim=1)
    norm_terms = dw_norm * z_norm
    dU = _delta(U, U_q, "U")
    if dU is not None:
        if dU.dim() != 2 or dU.shape != (n, xx.shape[1]):
            raise ValueError(f"U must be ({n}, {xx.shape[1]}), got {tuple(dU.shape)}")
        e = e + xx @ dU.T
        norm_terms = norm_terms + float(spectral_norm(dU)) * torch.linalg.vector_norm(xx, dim=1)
    db = _delta(b, b_q, "b")
    if db is not None:
        db = db.reshape(-1)
        if db.shape[0] != n:
            raise ValueError(f"b must have {n} entries, got {db.shape[0]}")
        e = e + db
        norm_terms = norm_terms + torch.linalg.vector_norm(db)
    return DisplacementBound(
        full=torch.linalg.vector_norm(e, dim=1) / mu,
        norm_form=norm_terms / mu,
        paper=dw_norm * z_norm / mu,
        margin=mu,
    )


def residual_error_bound(
    W: Tensor, U: Tensor | None, b: Tensor | None, x: Tensor, z: Tensor
) -> Tensor:
    """A-posteriori bound on ``||z - z*||`` for an approximate equilibrium ``z`` (per sample, ``(N,)``).

    With the fixed-point residual ``r = z - relu(W z + U x + b)`` and ``mu(W) > 0``:

        ||z - z*|| <= ||r|| + ||W r|| / mu(W).

    Proof: ``w = relu(W z + U x + b)`` satisfies ``(W z + U x + b) - w in N_K(w)`` and ``z = w + r``, so
    ``(W w + U x + b) - w + W r in N_K(w)``; monotonicity of ``N_K`` against the equilibrium's
    ``(W z* + U x + b) - z* in N_K(z*)`` gives ``<W r - (I - W)(w - z*), w - z*> >= 0``, i.e.
    ``mu ||w - z*||^2 <= ||W r|| ||w - z*||``. It turns a solver's stopping residual into a rigorous
    distance, e.g. to account for solver tolerance when checking :func:`displacement_bound`.
    """
    Wf = _as_operator(W, "W")
    if Wf.dim() != 2:
        raise ValueError("residual_error_bound needs a dense (n, n) operator")
    mu = float(monotonicity_margin(Wf))
    if not mu > 0.0:
        raise ValueError(f"W is not strongly monotone (mu(W) = {mu:.3g} <= 0): no bound")
    zz = z.to(torch.float64)
    pre = zz @ Wf.T
    if U is not None:
        pre = pre + x.to(torch.float64).reshape(zz.shape[0], -1) @ U.to(torch.float64).T
    if b is not None:
        pre = pre + b.to(torch.float64).reshape(-1)
    r = zz - torch.relu(pre)
    return torch.linalg.vector_norm(r, dim=1) + torch.linalg.vector_norm(r @ Wf.T, dim=1) / mu


# --------------------------------------------------------------------------------------------------
# Bit errors in the stored codes (beyond the paper)
# --------------------------------------------------------------------------------------------------
def _as_spec(spec: QuantSpec | int) -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise TypeError(f"spec must be a QuantSpec or a bit width, got {spec!r}")
    return QuantSpec(bits=spec)


def code_bit_deltas(codes: Tensor, spec: QuantSpec | int, protected_bits: Sequence[int] = ()) -> Tensor:
    """Signed change of every stored code when one of its bits flips: ``(*codes.shape, bits)`` float64.

    Bit ``j`` (bit 0 = least significant) of a word has weight ``w_j = 2^j``, except the most
    significant bit of a symmetric (two's complement) word, whose weight is ``-2^(b-1)``; the 1-bit
    sign code (``code = 2 * bit - 1``) has weight 2. Flipping bit ``j`` changes the code by
    ``w_j (1 - 2 bit_j)``: ``+w_j`` for 0 -> 1, ``-w_j`` for 1 -> 0. Flips in one word add up, so a set
    ``S`` of flips changes the code by ``sum_{j in S} w_j (1 - 2 bit_j)``; the dequantized weight
    changes by ``scale`` times that (the zero point cancels). Protected bits get a change of 0.
    """
    spec = _as_spec(spec)
    bits = spec.bits
    c = codes.to(torch.int64)
    if spec.symmetric and bits == 1:
        if bool(((c != 1) & (c != -1)).any()):
            raise ValueError("1-bit sign codes must be -1 or +1")
        bit_vals = ((c + 1) // 2).unsqueeze(-1)
        weights = torch.tensor([2.0], dtype=torch.float64)
    else:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if spec.symmetric else (0, 2**bits - 1)
        if bool(((c < lo) | (c > hi)).any()):
            raise ValueError(f"codes outside the {bits}-bit word range [{lo}, {hi}]")
        u = c & (2**bits - 1)  # two's complement bit pattern of a b-bit word
        shifts = torch.arange(bits, dtype=torch.int64)
        bit_vals = (u.unsqueeze(-1) >> shifts) & 1
        weights = 2.0 ** torch.arange(bits, dtype=torch.float64)
        if spec.symmetric:
            weights[-1] = -weights[-1]
    deltas = weights * (1 - 2 * bit_vals).to(torch.float64)
    for j in _protected(protected_bits, bits):
        deltas[..., j] = 0.0
    return deltas


def _protected(protected_bits: Sequence[int], bits: int) -> set[int]:
    """Protected positions as ``0..b-1`` (negative values count from the MSB: ``-1`` = bit ``b - 1``)."""
    out: set[int] = set()
    for j in protected_bits:
        if isinstance(j, bool) or not isinstance(j, int) or not -bits <= j < bits:
            raise ValueError(f"protected bit {j!r} does not exist in a {bits}-bit word")
        out.add(j % bits)
    return out


def _word_max_change(deltas: Tensor) -> Tensor:
    """``A(m) = max over <= m flips of |code change|`` for ``m = 0..b``: ``(..., b + 1)``.

    A set of flips changes a word by the sum of its bits' signed deltas; the absolute value is at most
    the larger of its positive and its negative parts, so the maximum over ``<= m`` flips is
    ``max(sum of the m largest positive deltas, sum of the m largest |negative| deltas)``, attained.
    """
    pos = torch.sort(deltas.clamp(min=0.0), dim=-1, descending=True).values
    neg = torch.sort((-deltas).clamp(min=0.0), dim=-1, descending=True).values
    zero = torch.zeros((*deltas.shape[:-1], 1), dtype=deltas.dtype)
    return torch.cat([zero, torch.maximum(pos.cumsum(-1), neg.cumsum(-1))], dim=-1)


def _concave_slopes(G: np.ndarray) -> np.ndarray:
    """Slopes of the least concave majorant of each row of ``G`` (rows start at 0 and are nondecreasing).

    Output ``(rows, M)``: slope ``i`` is ``G^(i + 1) - G^(i)`` of the majorant ``G^ >= G``, nonincreasing
    along a row (upper hull, monotone chain, one row at a time).
    """
    rows, L = G.shape
    out = np.empty((rows, L - 1), dtype=np.float64)
    for r in range(rows):
        g = G[r]
        hull = [0]
        for i in range(1, L):
            while len(hull) >= 2:
                i0, i1 = hull[-2], hull[-1]
                # drop i1 if it lies on or below the chord i0 -> i
                if (g[i1] - g[i0]) * (i - i0) <= (g[i] - g[i0]) * (i1 - i0):
                    hull.pop()
                else:
                    break
            hull.append(i)
        for a, c in zip(hull[:-1], hull[1:], strict=True):
            out[r, a:c] = (g[c] - g[a]) / (c - a)
    return out


def _scales_per_row(scale: Tensor, codes: Tensor) -> Tensor:
    s = scale.detach().to(torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(codes.shape[0])
    elif s.numel() != codes.shape[0]:
        raise ValueError(
            f"scale must be one value or one per output channel ({codes.shape[0]}), got {s.numel()}"
        )
    if bool((s < 0).any()):
        raise ValueError("scales must be nonnegative")
    return s.contiguous()


class _TopKSum:
    """``k -> sum of the k largest values`` of a multiset given as (values >= 0, multiplicities)."""

    def __init__(self, values: Tensor, counts: Tensor) -> None:
        values = values.reshape(-1).to(torch.float64)
        counts = counts.reshape(-1).to(torch.int64)
        keep = (counts > 0) & (values > 0)
        values, counts = values[keep], counts[keep]
        order = torch.argsort(values, descending=True)
        self.values = values[order]
        self.cum_count = torch.cumsum(counts[order], 0)
        self.cum_sum = torch.cumsum(self.values * counts[order].to(torch.float64), 0)

    def __call__(self, ks: Tensor) -> Tensor:
        ks = ks.to(torch.int64)
        out = torch.zeros(ks.shape, dtype=torch.float64)
        if self.values.numel() == 0:
            return out
        i = torch.searchsorted(self.cum_count, ks, right=False).clamp(max=self.values.numel() - 1)
        before_count = torch.where(i > 0, self.cum_count[(i - 1).clamp(min=0)], torch.zeros_like(i))
        before_sum = torch.where(i > 0, self.cum_sum[(i - 1).clamp(min=0)], torch.zeros_like(out))
        take = (ks - before_count).clamp(min=0)
        total = before_sum + take.to(torch.float64) * self.values[i]
        return torch.minimum(total, self.cum_sum[-1].expand_as(total))


class _FlipBound:
    """The bound ``beta(k)`` of :func:`bit_flip_perturbation_bounds`, evaluated at any ``k``."""

    def __init__(self, codes: Tensor, scale: Tensor, spec: QuantSpec, protected_bits: Sequence[int]) -> None:
        if codes.dim() not in (2, 4):
            raise ValueError(
                f"codes must be a dense (n, n) W or a (C_out, C_in, kh, kw) kernel, got {codes.dim()}-D"
            )
        s = _scales_per_row(scale, codes)
        rows = codes.shape[0]
        per_row = codes.numel() // rows
        # (1) single-bit changes: bit j of a word in row r changes it by |w_j| s_r (sign aside)
        probe = torch.ones(1, dtype=torch.int64) if spec.symmetric else torch.zeros(1, dtype=torch.int64)
        bit_sizes = code_bit_deltas(probe, spec, protected_bits).abs()[0]
        self.l1 = _TopKSum(s[:, None] * bit_sizes[None, :], torch.full((rows, spec.bits), per_row))
        if codes.dim() == 2:
            # word profiles A(m) depend only on the code: one per distinct code, scaled per row
            uniq, inverse = torch.unique(codes.to(torch.int64), return_inverse=True)
            prof = _word_max_change(code_bit_deltas(uniq, spec, protected_bits))  # (U, b+1)
            present = torch.zeros(rows, uniq.numel(), dtype=torch.int64)
            present.scatter_add_(1, inverse.reshape(rows, -1), torch.ones_like(inverse.reshape(rows, -1)))
            slopes = torch.from_numpy(_concave_slopes((prof**2).numpy()))  # (U, b)
            self.env = _TopKSum(
                (s**2)[:, None, None] * slopes[None, :, :], present[:, :, None].expand(-1, -1, spec.bits)
            )
            # largest single-word change per m: max over (row, code present in the row)
            best = (s[:, None, None] * prof[None, :, :]).masked_fill((present == 0)[:, :, None], 0.0)
            self.amax = best.amax(dim=(0, 1))  # (b+1,)
        else:
            # a group (o, c) of T = kh kw taps: a_g = sum_t |dK_t| <= scale_o * (sum of the m largest
            # single-bit sizes among its T words), one profile P(m) for every group of the row
            c_out, c_in, kh, kw = codes.shape
            sizes = torch.sort(bit_sizes.repeat(kh * kw), descending=True).values
            prof = torch.cat([torch.zeros(1, dtype=torch.float64), sizes.cumsum(0)])  # (T b + 1,)
            slopes = torch.from_numpy(_concave_slopes((prof**2)[None, :].numpy()))[0]  # (T b,)
            self.env = _TopKSum(
                (s**2)[:, None] * slopes[None, :], torch.full((rows, slopes.numel()), c_in)
            )
            self.amax = s.max() * prof

    def __call__(self, ks: Tensor) -> Tensor:
        ks = ks.to(torch.int64)
        env = self.env(ks).clamp(min=0.0).sqrt()
        amax = self.amax[ks.clamp(max=self.amax.numel() - 1)]
        mixed = (amax * self.l1(ks)).clamp(min=0.0).sqrt()
        return torch.minimum(env, mixed)


def bit_flip_perturbation_bounds(
    codes: Tensor,
    scale: Tensor,
    spec: QuantSpec | int,
    k_max: int,
    *,
    protected_bits: Sequence[int] = (),
) -> Tensor:
    """Upper bounds ``beta(k)`` on ``||dW||_2`` over *all* patterns of ``<= k`` bit flips, ``k = 0..k_max``.

    Stored form: ``codes`` of ``W`` itself (``(n, n)``: ``dW = scale * dcode`` entrywise) or of the
    kernel ``K`` (``(C_out, C_in, kh, kw)``) of a circular convolution that enters ``W`` linearly with
    coefficient +-1 (any image size). ``scale`` is per tensor or per output channel (dim 0). Protected
    bits never flip. Returns float64 ``(k_max + 1,)``, nondecreasing, ``beta(0) = 0``.

    Groups. Dense: a group is one word ``e`` and ``||dW||_2 <= ||dW||_F = sqrt(sum_e a_e^2)`` with
    ``a_e = |dW_e|``. Convolution: the block of every frequency is ``D_f = sum_t dK_t exp(i theta_t(f))``,
    so ``||D_f||_2 <= ||D_f||_F <= sqrt(sum_g a_g^2)`` with ``a_g = sum_t |dK_(o,c,t)|`` for the group
    ``g = (o, c)`` of ``kh kw`` taps. A group hit by ``m`` flips has ``a_g <= A_g(m)``: for one word,
    ``A(m) = scale * max(sum of its m largest positive bit deltas, sum of its m largest |negative|
    ones)`` (:func:`code_bit_deltas`; attained, at most ``(2^b - 1) scale`` for the whole word); for a
    group of taps ``A(m) = scale * (sum of the m largest single-bit sizes 2^j among its kh kw words)``
    (the same for every group of a row; signs across taps do not matter once ``|dK_t|`` is taken).
    With ``k`` flips in all:

    1. concave majorant: ``sum_g A_g(m_g)^2 <= sum_g G^_g(m_g)`` for the least concave majorant
       ``G^_g`` of ``A_g^2``; the greedy solves the relaxed knapsack exactly, so
       ``beta_1(k)^2`` = the sum of the ``k`` largest majorant slopes over all groups;
    2. mixed: ``sum_g a_g^2 <= (max_g a_g) (sum_g a_g) <= A_max(k) * l1(k)``, with ``A_max(k)`` the
       largest ``A_g(k)`` and ``l1(k)`` the sum of the ``k`` largest single-bit changes
       ``2^j scale`` (each flipped bit adds at most its own size to one ``a_g``).

    ``beta(k) = min(beta_1(k), sqrt(A_max(k) l1(k)))``. (1) is good for many flips spread over words,
    (2) for few flips (it is exact for ``k = 1``: one flip, one entry). For dense ``W`` whose worst
    words share a row (one scale per row), ``||dW||_2 = ||dW||_F`` and (1) is attained at its
    breakpoints; the bound is a proof, not an estimate.
    """
    spec = _as_spec(spec)
    if k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {k_max}")
    bound = _FlipBound(codes, scale, spec, protected_bits)
    return bound(torch.arange(k_max + 1))


@dataclass(frozen=True)
class BitFlipCertificate:
    """Largest number of arbitrary bit flips in the stored codes that provably keeps ``W~`` monotone.

    Attributes:
        max_flips: largest ``k`` with ``beta(k) < mu(W~)`` (:func:`bit_flip_perturbation_bounds`):
            *every* pattern of at most ``k`` flips, at any positions, leaves ``mu(W~_err) > 0``.
            ``None`` when the error-free ``W~`` is itself not monotone (``mu(W~) <= 0``).
        margin_quantized: ``mu(W~)`` of the error-free quantized operator.
        perturbation_bound: ``beta(max_flips)`` (``< margin_quantized``); ``None`` with ``max_flips``.
        next_bound: ``beta(max_flips + 1)`` (``>= margin_quantized``); ``None`` if every bit may flip.
        n_bits: number of stored bits that can flip (protected bits excluded).
        all_bits: ``True`` when even flipping every flippable bit is certified.
    """

    max_flips: int | None
    margin_quantized: float
    perturbation_bound: float | None
    next_bound: float | None
    n_bits: int
    all_bits: bool

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def max_certified_bit_flips(
    W_q: Tensor,
    codes: Tensor,
    scale: Tensor,
    spec: QuantSpec | int,
    *,
    protected_bits: Sequence[int] = (),
) -> BitFlipCertificate:
    """The largest number ``k`` of ARBITRARY bit flips in ``codes`` that provably keeps ``mu(W~_err) > 0``.

    ``W_q`` is the error-free quantized operator (dense ``(n, n)`` or ``(F, c, c)`` blocks) whose exact
    margin ``mu(W~)`` is the budget; ``codes``/``scale`` are the stored form of ``W`` itself (dense) or of
    a convolution kernel entering ``W`` linearly (``spec`` = its ``QuantSpec``, or a bit width for
    symmetric codes). Every pattern of ``<= k`` flips moves ``W~`` by ``||dW||_2 <= beta(k)``
    (:func:`bit_flip_perturbation_bounds`), and Weyl gives ``mu(W~_err) >= mu(W~) - beta(k) > 0``.
    If ``mu(W~) <= 0`` nothing can be certified and ``max_flips`` is ``None``.
    """
    spec = _as_spec(spec)
    mu_q = float(monotonicity_margin(W_q))
    bits_total = codes.numel() * spec.bits
    n_bits = bits_total - codes.numel() * len(_protected(protected_bits, spec.bits))
    if not mu_q > 0.0:
        return BitFlipCertificate(None, mu_q, None, None, n_bits, False)
    bound = _FlipBound(codes, scale, spec, protected_bits)

    def beta(k: int) -> float:
        return float(bound(torch.tensor([k]))[0])

    # beta is nondecreasing with beta(0) = 0 < mu_q: bisect for the last k with beta(k) < mu_q
    lo, hi = 0, n_bits
    if beta(hi) < mu_q:
        return BitFlipCertificate(n_bits, mu_q, beta(n_bits), None, n_bits, True)
    while hi - lo > 1:  # invariant: beta(lo) < mu_q <= beta(hi)
        mid = (lo + hi) // 2
        if beta(mid) < mu_q:
            lo = mid
        else:
            hi = mid
    return BitFlipCertificate(lo, mu_q, beta(lo), beta(hi), n_bits, False)


@dataclass(frozen=True)
class BitErrorCertificate:
    """Outcome of random bit-error patterns on the stored codes of ``W`` (design.md §2 error model).

    Attributes:
        ber: bit error rate p.
        n_patterns: number of sampled patterns (seeds ``seed, seed + 1, ...``).
        margin_quantized: ``mu(W~)`` of the error-free quantized operator.
        certified_share: share of patterns with ``||W~_err - W~||_2 < mu(W~)`` (a-priori certificate).
        monotone_share: share with exact ``mu(W~_err) > 0`` (>= ``certified_share``).
        delta_norms: ``||W~_err - W~||_2`` per pattern.
        margins: exact ``mu(W~_err)`` per pattern.
        flips: number of flipped bits per pattern.
    """

    ber: float
    n_patterns: int
    margin_quantized: float
    certified_share: float
    monotone_share: float
    delta_norms: list[float]
    margins: list[float]
    flips: list[int]

    def to_dict(self) -> dict[str, float | int | list[float] | list[int]]:
        return asdict(self)


def certify_under_bit_errors(
    W_q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    spec: QuantSpec,
    ber: float,
    n_patterns: int,
    seed: int,
    *,
    assemble: Callable[[Tensor], Tensor] | None = None,
    p01: float | None = None,
    p10: float | None = None,
    protected_bits: Sequence[int] = (),
    tensor_name: str = "W",
) -> BitErrorCertificate:
    """Share of random bit-error patterns at BER ``ber`` for which the corrupted operator stays certified.

    Pattern ``i`` (``i = 0 .. n_patterns - 1``) flips the stored bits of ``codes`` with
    ``qmargin.faults.flip_random_bits(codes, spec.bits, ber, seed=derive_seed(seed + i, tensor_name),
    p01=p01, p10=p10, protected_bits=protected_bits)`` (every bit independently, exact sparse
    sampling), so two models see the same patterns for the same ``seed`` (paired comparisons). The
    corrupted operator is ``W~_err = assemble(dequantize(codes_err))``; with ``assemble=None`` the codes
    are those of the dense ``W`` itself and ``W~_err = W_q + dequantize(codes_err) - dequantize(codes)``.
    A pattern is *certified* when ``||W~_err - W~||_2 < mu(W~)`` (no solver, Weyl) and *monotone* when
    the exact ``mu(W~_err) > 0``; certified implies monotone.
    """
    from qmargin.faults.functional import derive_seed, flip_random_bits
    from qmargin.quant.codes import bit_differences

    if not 0.0 <= float(ber) <= 1.0:
        raise ValueError(f"ber must be in [0, 1], got {ber}")
    if n_patterns < 1:
        raise ValueError(f"n_patterns must be >= 1, got {n_patterns}")
    Wq = _as_operator(W_q, "W_q")
    if assemble is None and tuple(codes.shape) != tuple(Wq.shape):
        raise ValueError(
            f"without assemble= the codes must be those of the dense W_q {tuple(Wq.shape)}, "
            f"got {tuple(codes.shape)}"
        )
    mu_q = float(monotonicity_margin(Wq))
    w_hat = dequantize(codes, scale.to(torch.float64), zero_point, spec)
    deltas: list[float] = []
    margins: list[float] = []
    flips: list[int] = []
    for i in range(n_patterns):
        corrupted = flip_random_bits(
            codes, spec.bits, float(ber), seed=derive_seed(seed + i, tensor_name),
            p01=p01, p10=p10, protected_bits=tuple(protected_bits),
        )
        flips.append(bit_differences(codes, corrupted, spec.bits))
        w_err = dequantize(corrupted, scale.to(torch.float64), zero_point, spec)
        W_err = Wq + (w_err - w_hat) if assemble is None else _as_operator(assemble(w_err), "assemble(W)")
        if W_err.is_complex() != Wq.is_complex():
            W_err, Wq = W_err.to(torch.complex128), Wq.to(torch.complex128)
        _check_same_form(Wq, W_err)
        deltas.append(float(spectral_norm(W_err - Wq)))
        margins.append(float(monotonicity_margin(W_err)))
    certified = [d < mu_q for d in deltas]
    monotone = [m > 0.0 for m in margins]
    return BitErrorCertificate(
        ber=float(ber),
        n_patterns=n_patterns,
        margin_quantized=mu_q,
        certified_share=sum(certified) / n_patterns,
        monotone_share=sum(monotone) / n_patterns,
        delta_norms=deltas,
        margins=margins,
        flips=flips,
    )

