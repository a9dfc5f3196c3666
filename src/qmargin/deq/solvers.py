"""Operator-splitting solvers for the equilibrium ``z* = relu(W z* + U x + b)`` (design.md §5).

With ``v = U x + b`` the equilibrium is the zero of ``(I - W) z - v + N(z)`` (``N`` the normal cone of
the nonnegative orthant, whose resolvent is ``relu``). Three splittings, all with step ``a``:

* forward-backward (FB): ``z <- relu(z - a((I - W) z - v))``; converges for ``0 < a < 2 mu / L^2``
  at rate ``sqrt(1 - 2 a mu + a^2 L^2)``; default ``a = mu / L^2``.
* Peaceman-Rachford (PR): with ``V = (I + a (I - W))^{-1}``::

      u_h = 2 z - u;   z_h = V (u_h + a v);   u = 2 z_h - u_h;   z = relu(u)

  converges for every ``a > 0`` when ``mu > 0`` at rate ``sqrt(1 - 4 a mu / (1 + a L)^2)``; default
  ``a = 1 / L``.
* Douglas-Rachford (DR): PR averaged with the identity, ``u <- u + z_h - z``; default ``a = 1 / L``.

``mu = mu(W)`` and ``L = L(W)`` are the exact margin and Lipschitz constant of the operator
(:meth:`margin_and_norm` of :mod:`qmargin.deq.operators`). ``V`` is formed once per solve.

Convergence test: every ``check_every`` iterations (one host sync per check, not per iteration) the
per-sample relative fixed-point residual ``r_i = ||z_i - T(z_i)|| / max(||z_i||, ||T(z_i)||)`` with
``T(z) = relu(W z + v)`` is computed; the solve stops when ``max_i r_i <= tol``.

Failure is reported, never hidden: a solve that hits ``max_iter`` returns ``converged=False`` with
its residual; a solve whose iterates become NaN/inf stops at the next check and returns
``converged=False, finite=False, residual=inf`` (the returned iterate is then not finite). The
solvers never raise on non-convergence; :class:`qmargin.deq.layer.MonDEQLayer` can
(``on_failure="raise"`` raises :class:`ConvergenceError`).

:func:`solve_adjoint` runs the same splitting (same ``a``) on the adjoint system of the implicit
backward, ``u = D (W^T u + g)`` with ``D = diag(relu'(W z* + v))``: ``I - W^T`` has the same ``mu``
and ``L`` as ``I - W``, so it converges whenever the forward solve does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from qmargin.deq.operators import Operator
from qmargin.errors import ConfigError

__all__ = [
    "METHODS",
    "RealizesOperator",
    "SolverStats",
    "ConvergenceError",
    "default_alpha",
    "fixed_point_residual",
    "solve",
    "solve_adjoint",
]

METHODS = ("fb", "pr", "dr")
Method = Literal["fb", "pr", "dr"]


class ConvergenceError(RuntimeError):
    """An equilibrium solve did not converge (raised only where a caller asked for it)."""


@dataclass
class SolverStats:
    """What one solve did.

    Attributes:
        iterations: iterations performed.
        residual: ``max_i r_i`` at the last check (``inf`` when the iterates became non-finite).
        converged: ``residual <= tol`` (all samples) and finite.
        time_s: wall time of the solve (forming ``V`` included), seconds.
        alpha: step size ``a`` used.
        method: ``"fb"``, ``"pr"`` or ``"dr"``.
        tol: the tolerance it was run with.
        mu, L: the operator's exact margin and Lipschitz constant when they were computed (default
            step), else ``None``.
        finite: the final iterate is finite.
        sample_residual: per-sample ``r_i`` (tensor ``(N,)``, on the state's device).
        sample_converged: per-sample ``r_i <= tol`` (bool tensor ``(N,)``).
    """

    iterations: int
    residual: float
    converged: bool
    time_s: float
    alpha: float
    method: str
    tol: float = 0.0
    mu: float | None = None
    L: float | None = None
    finite: bool = True
    sample_residual: Tensor | None = None
    sample_converged: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-sample tensors reduced to a count of non-converged samples)."""
        d = {k: getattr(self, k) for k in ("iterations", "residual", "converged", "time_s", "alpha",
                                           "method", "tol", "mu", "L", "finite")}
        if not math.isfinite(d["residual"]):
            d["residual"] = None
        if self.sample_converged is not None:
            d["samples"] = int(self.sample_converged.numel())
            d["samples_not_converged"] = int((~self.sample_converged).sum())
        return d


@runtime_checkable
class RealizesOperator(Protocol):
    """Something that realizes the ``W`` its forward pass uses (a monotone parameterization)."""

    def operator(self) -> Operator: ...


def _as_operator(op: Operator | RealizesOperator) -> Operator:
    """Accept a realized operator or a parameterization module (which realizes its forward ``W``)."""
    if isinstance(op, Operator):
        return op
    if isinstance(op, RealizesOperator):
        return op.operator()
    raise TypeError(f"solve needs a realized operator or a MonotoneParameterization, got {type(op).__name__}")


def _check_args(method: str, tol: float, max_iter: int, check_every: int, alpha: float | None) -> str:
    method = method.lower()
    if method not in METHODS:
        raise ConfigError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")
    if not (tol >= 0):
        raise ConfigError(f"tol must be >= 0, got {tol}")
    if max_iter < 1 or check_every < 1:
        raise ConfigError(f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive finite step size, got {alpha}")
    return method


def default_alpha(method: str, mu: float, L: float) -> float:
    """Step size from ``(mu, L)``: FB ``mu / L^2``, PR/DR ``1 / L`` (design.md §5).

    For a non-monotone operator (``mu <= 0``) FB has no convergent step; ``1 / L^2`` is returned so the
    solve still runs and reports its (non-)convergence.
    """
    if not (L > 0 and math.isfinite(L)):
        return 1.0
    if method == "fb":
        return mu / L**2 if mu > 0 else 1.0 / L**2
    return 1.0 / L


def fixed_point_residual(z: Tensor, Tz: Tensor) -> Tensor:
    """Per-sample relative residual ``||z_i - T z_i|| / max(||z_i||, ||T z_i||)`` (0 when both are 0).

    NaN/inf iterates give a non-finite residual.
    """
    num = (z - Tz).flatten(1).norm(dim=1)
    den = torch.maximum(z.flatten(1).norm(dim=1), Tz.flatten(1).norm(dim=1))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _iterate(
    apply_W: Callable[[Tensor], Tensor],
    apply_V: Callable[[Tensor], Tensor] | None,
    prox: Callable[[Tensor], Tensor],
    v: Tensor,
    method: str,
    a: float,
    tol: float,
    max_iter: int,
    check_every: int,
) -> tuple[Tensor, int, Tensor, float]:
    """Run one splitting on ``z = prox(W z + v)``; returns ``(z, iterations, r, max r)``."""
    z = torch.zeros_like(v)
    u = torch.zeros_like(v)
    av = a * v
    r = torch.full(v.shape[:1], math.inf, dtype=v.dtype, device=v.device)
    rmax = math.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        if method == "fb":
            z = prox((1.0 - a) * z + a * apply_W(z) + av)
        else:
            assert apply_V is not None
            u_h = 2 * z - u
            z_h = apply_V(u_h + av)
            u = 2 * z_h - u_h if method == "pr" else u + z_h - z
            z = prox(u)
        if it % check_every == 0 or it == max_iter:
            r = fixed_point_residual(z, prox(apply_W(z) + v))
            rmax = float(r.max())  # the one host sync per check
            if not math.isfinite(rmax) or rmax <= tol:
                break
    return z, it, r, rmax


def _run(
    op: Operator | RealizesOperator,
    v: Tensor,
    transpose: bool,
    prox: Callable[[Tensor], Tensor],
    method: str,
    alpha: float | None,
    tol: float,
    max_iter: int,
    check_every: int,
) -> tuple[Tensor, SolverStats]:
    method = _check_args(method, tol, max_iter, check_every, alpha)
    with torch.no_grad():
        realized = _as_operator(op)
        return _run_no_grad(realized, v.detach(), transpose, prox, method, alpha, tol, max_iter, check_every)


def _run_no_grad(
    op: Operator,
    v: Tensor,
    transpose: bool,
    prox: Callable[[Tensor], Tensor],
    method: str,
    alpha: float | None,
    tol: float,
    max_iter: int,
    check_every: int,
) -> tuple[Tensor, SolverStats]:
    t0 = time.perf_counter()
    mu = L = None
    if alpha is None:
        mu_t, L_t = op.margin_and_norm()
        mu, L = float(mu_t), float(L_t)
        alpha = default_alpha(method, mu, L)
    alpha = float(alpha)
    apply_W = op.rmatvec if transpose else op.matvec
    apply_V = None
    if method != "fb":
        res = op.resolvent(alpha)
        apply_V = res.apply_T if transpose else res.apply
    z, it, r, rmax = _iterate(apply_W, apply_V, prox, v, method, alpha, tol, max_iter, check_every)
    finite = math.isfinite(rmax)
    stats = SolverStats(
        iterations=it,
        residual=rmax if finite else math.inf,
        converged=finite and rmax <= tol,
        time_s=time.perf_counter() - t0,
        alpha=alpha,
        method=method,
        tol=tol,
        mu=mu,
        L=L,
        finite=finite,
        sample_residual=r,
        sample_converged=r <= tol,
    )
    return z, stats


def solve(
    op: Operator | RealizesOperator,
    x_injection: Tensor,
    method: Method | str = "pr",
    alpha: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    check_every: int = 5,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = relu(W z + v)`` for ``v = x_injection`` (shape ``(N, *op.state_shape)``).

    Args:
        op: a realized operator (the :class:`~qmargin.deq.operators.Operator` protocol:
            :class:`~qmargin.deq.operators.DenseOperator`, :class:`~qmargin.deq.operators.ConvOperator`)
            or a parameterization module (:class:`RealizesOperator`: its :meth:`operator`, i.e. the
            ``W`` its forward pass uses).
        x_injection: ``v = U x + b`` (no gradient is tracked through the iterations).
        method: ``"fb"``, ``"pr"`` or ``"dr"``.
        alpha: step size; ``None`` takes it from the exact ``(mu, L)`` (:func:`default_alpha`).
        tol: tolerance on the per-sample relative fixed-point residual (max over the batch).
        max_iter: iteration cap.
        check_every: test convergence every ``k`` iterations (and at ``max_iter``).

    Returns ``(z, stats)``. Non-convergence and NaN/inf are reported in ``stats`` (module docstring).
    """
    return _run(op, x_injection, False, torch.relu, method, alpha, tol, max_iter, check_every)


def solve_adjoint(
    op: Operator | RealizesOperator,
    grad: Tensor,
    active: Tensor,
    method: Method | str = "pr",
    alpha: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    check_every: int = 5,
) -> tuple[Tensor, SolverStats]:
    """Solve the adjoint system ``u = D (W^T u + g)`` of the implicit backward, ``D = diag(active)``.

    ``active`` is ``relu'(W z* + v)`` (bool or 0/1, the state's shape). The projection ``u -> D u`` is
    the resolvent of the indicator of the subspace ``{u : u_j = 0 where D_jj = 0}``, so the same
    splitting with ``W^T``, ``V^T`` and the same ``a`` applies. Then ``dL/dv = u`` and
    ``dL/dW = sum_i u_i z*_i^T`` (for a dense ``W``).
    """
    D = active.to(grad.dtype)
    return _run(op, grad, True, lambda t: t * D, method, alpha, tol, max_iter, check_every)
