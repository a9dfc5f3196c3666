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

Bit errors in the stored codes (beyond the paper) are certified in :mod:`qmargin.deq.bit_certificates`.
The formulas of ``mu``, ``L``, ``||.||_2`` and the per-frequency blocks live once, in
:mod:`qmargin.deq.spectral`; the functions here check their arguments and run them in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from qmargin.deq import spectral
from qmargin.deq.operators import ConvOperator

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
    "conv_displacement_bound",
    "conv_residual_error_bound",
]


# --------------------------------------------------------------------------------------------------
# Operators: dense matrices and stacks of per-frequency blocks
# --------------------------------------------------------------------------------------------------
def as_operator(W: Tensor, name: str = "W") -> Tensor:
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


def check_same_form(W: Tensor, W_q: Tensor) -> None:
    if W.shape != W_q.shape:
        raise ValueError(
            f"W and W_q must have the same form and shape, got {tuple(W.shape)} and {tuple(W_q.shape)}"
        )


def monotonicity_margin(W: Tensor) -> Tensor:
    """Monotonicity margin ``mu(W) = lambda_min((I - W + (I - W)^H) / 2)`` (design.md §5).

    ``W`` is a dense ``(n, n)`` matrix or a ``(F, c, c)`` stack of per-frequency blocks; for blocks
    ``mu = min_f lambda_min(Herm(I - W_f))``. :func:`qmargin.deq.spectral.margin` in float64 /
    complex128 on a checked operator. Returns a 0-d float64 tensor (differentiable where the smallest
    eigenvalue is simple). ``mu(W) > 0`` means ``F(z) = (I - W) z - (U x + b)`` is ``mu``-strongly
    monotone.
    """
    return spectral.margin(as_operator(W))


def sym_max_eigenvalue(D: Tensor) -> Tensor:
    """``lambda_max(Herm(D))`` (max over blocks): by how much the perturbation ``D`` can lower a margin.

    Weyl: ``mu(W + D) >= mu(W) - lambda_max(Herm(D))`` and ``lambda_max(Herm(D)) <= ||D||_2``.
    """
    return spectral.sym_max_eigenvalue(as_operator(D, "D"))


def spectral_norm(D: Tensor) -> Tensor:
    """Spectral norm ``||D||_2`` (largest singular value) as a 0-d float64 tensor.

    * 1-D: the Euclidean norm of the vector;
    * 2-D ``(m, n)``: the largest singular value (any shape, e.g. ``dU``);
    * 3-D ``(F, m, n)``: block-diagonal operator, the max over blocks of their largest singular values
      (:func:`qmargin.deq.spectral.spectral_norm`).
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
    return spectral.spectral_norm(D)


def lipschitz_constant(W: Tensor) -> Tensor:
    """Lipschitz constant ``L(W) = ||I - W||_2`` (max over blocks for a per-frequency stack)."""
    return spectral.lipschitz(as_operator(W))


def conv_frequency_blocks(
    kernel: Tensor, spatial_shape: tuple[int, int], *, onesided: bool = False
) -> Tensor:
    """Per-frequency blocks of one circular 2-D convolution: a complex128 ``(F, C_out, C_in)`` stack.

    :func:`qmargin.deq.spectral.conv_blocks` (the one block builder, kernel centred at
    ``(kh // 2, kw // 2)`` as :func:`qmargin.deq.operators.circular_conv2d` applies it) in complex128,
    checked and flattened to ``F = H * W`` blocks ordered ``f = u * W + v``. The unitary DFT is the
    same on input and output, so singular values (and, for ``C_out == C_in``, the spectrum of the
    Hermitian part of ``I - W``) of the ``(C H W)``-dimensional operator are those of the blocks taken
    together. Kernels larger than the image wrap around (taps add up).

    Args:
        kernel: ``(C_out, C_in, kh, kw)`` tensor.
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
    if onesided and kernel.is_complex():
        raise ValueError("onesided=True needs a real kernel")
    k = kernel.to(torch.complex128) if kernel.is_complex() else kernel.to(torch.float64)
    blocks = spectral.conv_blocks(k, (H, Wd), half=onesided)
    return blocks.reshape(-1, kernel.shape[0], kernel.shape[1])


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
    Wf = as_operator(W, "W")
    Wq = as_operator(W_q, "W_q")
    check_same_form(Wf, Wq)
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
    Wf = as_operator(W, "W")
    Wq = as_operator(W_q, "W_q")
    check_same_form(Wf, Wq)
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


def residual_error_bound(W: Tensor, U: Tensor | None, b: Tensor | None, x: Tensor, z: Tensor) -> Tensor:
    """A-posteriori bound on ``||z - z*||`` for an approximate equilibrium ``z`` (per sample, ``(N,)``).

    With the fixed-point residual ``r = z - relu(W z + U x + b)`` and ``mu(W) > 0``:

        ||z - z*|| <= ||r|| + ||W r|| / mu(W).

    Proof: ``w = relu(W z + U x + b)`` satisfies ``(W z + U x + b) - w in N_K(w)`` and ``z = w + r``, so
    ``(W w + U x + b) - w + W r in N_K(w)``; monotonicity of ``N_K`` against the equilibrium's
    ``(W z* + U x + b) - z* in N_K(z*)`` gives ``<W r - (I - W)(w - z*), w - z*> >= 0``, i.e.
    ``mu ||w - z*||^2 <= ||W r|| ||w - z*||``. It turns a solver's stopping residual into a rigorous
    distance, e.g. to account for solver tolerance when checking :func:`displacement_bound`.
    """
    Wf = as_operator(W, "W")
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
# Convolutional W: displacement and solver error with per-frequency (exact) mu and ||dW||_2
# --------------------------------------------------------------------------------------------------
def _conv_check(kernel: Tensor, grid: tuple[int, int], z: Tensor, name: str) -> None:
    if kernel.dim() != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{name} must be a (c, c, kh, kw) kernel, got shape {tuple(kernel.shape)}")
    if z.dim() != 4 or tuple(z.shape[1:]) != (kernel.shape[0], *grid):
        raise ValueError(f"states must be (N, {kernel.shape[0]}, {grid[0]}, {grid[1]}), got {tuple(z.shape)}")


def _conv_margin(kernel: Tensor, grid: tuple[int, int]) -> float:
    return float(monotonicity_margin(conv_frequency_blocks(kernel, grid, onesided=True)))


def conv_displacement_bound(
    kernel: Tensor,
    kernel_q: Tensor,
    grid: tuple[int, int],
    z_q: Tensor,
    dv: Tensor,
    *,
    input_norm_bound: Tensor | None = None,
) -> DisplacementBound:
    """:func:`displacement_bound` for a circular convolution ``W`` (kernel ``K``, quantized ``K~``).

    With ``e = dW z~* + dU x + db`` (``dW`` the circular convolution with ``dK = K~ - K``,
    ``dv = dU x + db = v~ - v`` the change of the injection, given per sample in the state's shape):

        ||z* - z~*|| <= ||e|| / mu(W)                                                    (full)
                     <= (||dW||_2 ||z~*|| + n_in) / mu(W)                                (norm form)

    with ``n_in = input_norm_bound`` (e.g. ``||dU||_2 ||x|| + ||db||``) or ``||dv||`` when not given,
    and the paper's form ``||dW||_2 ||z~*|| / mu(W)``. ``mu(W) = min_f lambda_min(Herm(I - K_f))`` and
    ``||dW||_2 = max_f ||dK_f||_2`` are exact per-frequency quantities (the DFT is unitary), the proof
    is that of :func:`displacement_bound` word for word. Multi-tier networks pass their polyphase
    kernel, coarse grid and polyphase states (a permutation of coordinates: norms unchanged).
    """
    _conv_check(kernel, grid, z_q, "kernel")
    if kernel_q.shape != kernel.shape:
        raise ValueError(
            f"kernel_q must have the shape of kernel {tuple(kernel.shape)}, got {tuple(kernel_q.shape)}"
        )
    if dv.shape != z_q.shape:
        raise ValueError(f"dv must have the shape of z_q {tuple(z_q.shape)}, got {tuple(dv.shape)}")
    K = kernel.to(torch.float64)
    dK = kernel_q.to(torch.float64) - K
    mu = _conv_margin(K, grid)
    if not mu > 0.0:
        raise ValueError(f"the float operator is not strongly monotone (mu(W) = {mu:.3g} <= 0): no bound")
    z = z_q.to(torch.float64)
    d = dv.to(torch.float64)
    e = ConvOperator(dK, grid).matvec(z) + d
    dw = float(spectral_norm(conv_frequency_blocks(dK, grid, onesided=True)))
    z_norm = torch.linalg.vector_norm(z.flatten(1), dim=1)
    n_in = (
        torch.linalg.vector_norm(d.flatten(1), dim=1)
        if input_norm_bound is None
        else input_norm_bound.to(torch.float64).reshape(-1)
    )
    return DisplacementBound(
        full=torch.linalg.vector_norm(e.flatten(1), dim=1) / mu,
        norm_form=(dw * z_norm + n_in) / mu,
        paper=dw * z_norm / mu,
        margin=mu,
    )


def conv_residual_error_bound(kernel: Tensor, grid: tuple[int, int], v: Tensor, z: Tensor) -> Tensor:
    """:func:`residual_error_bound` for a circular ``W``: ``||z - z*|| <= ||r|| + ||W r|| / mu(W)``.

    ``r = z - relu(W z + v)`` per sample (``v`` the injection ``U x + b`` in the state's shape),
    ``mu(W)`` exact per frequency. Returns ``(N,)`` float64.
    """
    _conv_check(kernel, grid, z, "kernel")
    K = kernel.to(torch.float64)
    mu = _conv_margin(K, grid)
    if not mu > 0.0:
        raise ValueError(f"W is not strongly monotone (mu(W) = {mu:.3g} <= 0): no bound")
    zz = z.to(torch.float64)
    op = ConvOperator(K, grid)
    r = zz - torch.relu(op.matvec(zz) + v.to(torch.float64))
    return (
        torch.linalg.vector_norm(r.flatten(1), dim=1)
        + torch.linalg.vector_norm(op.matvec(r).flatten(1), dim=1) / mu
    )
