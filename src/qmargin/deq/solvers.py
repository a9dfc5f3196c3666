"""Operator-splitting solvers for the equilibrium ``z* = relu(W z* + U x + b)`` (design.md §5).

With ``v = U x + b`` the equilibrium is the zero of ``(I - W) z - v + N(z)`` (``N`` the normal cone of
the nonnegative orthant, whose resolvent is ``relu``). Three splittings, all with step ``a``, each a
fixed-point iteration ``x <- T(x)`` on its own variable ``x`` with ``z = P(x)``:

* forward-backward (FB), ``x = z``: ``T(z) = relu(z - a((I - W) z - v))``; converges for
  ``0 < a < 2 mu / L^2`` at rate ``sqrt(1 - 2 a mu + a^2 L^2)``; default ``a = mu / L^2``.
* Peaceman-Rachford (PR), ``x = u``, ``z = relu(u)``: with ``V = (I + a (I - W))^{-1}``::

      u_h = 2 z - u;   z_h = V (u_h + a v);   u = 2 z_h - u_h;   z = relu(u)

  i.e. ``T = R_A R_B`` with the reflected resolvents ``R_B(u) = 2 relu(u) - u`` (nonexpansive) and
  ``R_A(w) = 2 V (w + a v) - w`` (contracts by ``sqrt(1 - 4 a mu / (1 + a L)^2)``); converges for every
  ``a > 0`` when ``mu > 0`` at that rate; default ``a = 1 / L``.
* Douglas-Rachford (DR): PR averaged with the identity, ``u <- u + z_h - z`` (``T_DR = (I + T_PR) / 2``,
  rate ``(1 + rho_PR) / 2``); default ``a = 1 / L``.

The splittings live in a registry (:data:`SPLITTINGS`, :func:`register_splitting`), and so do the
accelerators (:data:`ACCELERATORS`, :func:`register_accelerator`): ``"none"`` (the plain iteration)
and ``"anderson"`` (:class:`AndersonAccelerator`). A new splitting or accelerator is one registered
class; :func:`solve` and its callers do not change.

**Safeguard** (every accelerator other than ``"none"``): per sample, with ``r(x) = ||T(x) - x||``
the splitting's fixed-point residual, an accelerated candidate ``x_c`` is accepted only if
``r(x_c) <= rho r(x_k)``, where ``rho`` is the splitting's guaranteed contraction factor at this
``(a, mu, L)`` (1 when none is known: then ``T`` is only nonexpansive). Otherwise that sample takes
the plain step ``x_{k+1} = T(x_k)``, whose residual is ``<= rho r(x_k)`` because ``T`` contracts by
``rho``. Hence ``r(x_k) <= rho^k r(x_0)`` for every sample: the accelerated solve is never behind the
plain splitting's guaranteed rate (a rejected step costs one extra evaluation of ``T``).

``mu = mu(W)`` and ``L = L(W)`` are the exact margin and Lipschitz constant of the operator
(:meth:`margin_and_norm` of :mod:`qmargin.deq.operators`). ``V`` is formed once per operator and step
(cached on the operator, see :class:`qmargin.deq.operators.DenseOperator`).

Step sizes: ``alpha=None`` takes the default above; ``alpha="auto"`` picks the step among a few
multiples of the default by a short probe solve on a few samples (:func:`tune_alpha`; the 2020
reference code tuned ``alpha`` by halving it while the iteration count dropped).

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
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from qmargin.deq.certificates import fb_rate, pr_rate
from qmargin.deq.operators import Operator
from qmargin.errors import ConfigError

__all__ = [
    "METHODS",
    "SPLITTINGS",
    "ACCELERATORS",
    "Splitting",
    "PreparedSplitting",
    "Accelerator",
    "AndersonAccelerator",
    "register_splitting",
    "register_accelerator",
    "RealizesOperator",
    "SolverStats",
    "ConvergenceError",
    "default_alpha",
    "fixed_point_residual",
    "tune_alpha",
    "solve",
    "solve_adjoint",
]

METHODS = ("fb", "pr", "dr")
"""The built-in splittings (:data:`SPLITTINGS` holds every registered one)."""
Method = Literal["fb", "pr", "dr"]
Alpha = float | str | None


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
        method: the splitting's name (``"fb"``, ``"pr"``, ``"dr"``, or a registered one).
        tol: the tolerance it was run with.
        mu, L: the operator's exact margin and Lipschitz constant when they were computed (default
            step, ``"auto"`` step or an accelerator's safeguard), else ``None``.
        finite: the final iterate is finite.
        sample_residual: per-sample ``r_i`` (tensor ``(N,)``, on the state's device).
        sample_converged: per-sample ``r_i <= tol`` (bool tensor ``(N,)``).
        accelerator: ``"none"`` or the accelerator's name.
        evaluations: evaluations of the splitting map ``T`` (iterations plus safeguard fallbacks).
        rejected: accelerated candidates replaced by the plain step (summed over samples).
        iterate: the splitting's variable ``x`` at exit (a warm start for the next solve).
        trace: per iteration, the per-sample splitting residual ``||T(x_k) - x_k||`` (only with
            ``trace=True``).
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
    accelerator: str = "none"
    evaluations: int = 0
    rejected: int = 0
    iterate: Tensor | None = field(default=None, repr=False)
    trace: list[Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-sample tensors reduced to a count of non-converged samples)."""
        d = {
            k: getattr(self, k)
            for k in (
                "iterations",
                "residual",
                "converged",
                "time_s",
                "alpha",
                "method",
                "tol",
                "mu",
                "L",
                "finite",
            )
        }
        if not math.isfinite(d["residual"]):
            d["residual"] = None
        if self.sample_converged is not None:
            d["samples"] = int(self.sample_converged.numel())
            d["samples_not_converged"] = int((~self.sample_converged).sum())
        if self.accelerator != "none":
            d.update(accelerator=self.accelerator, evaluations=self.evaluations, rejected=self.rejected)
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


# --------------------------------------------------------------------------------------------------
# Splittings (registry)
# --------------------------------------------------------------------------------------------------
class PreparedSplitting(Protocol):
    """A splitting bound to one operator, step, injection ``v`` and nonlinearity ``prox``.

    ``step(x, z)`` is ``T(x)`` given ``z = P(x)`` (passing ``z`` saves recomputing it); ``project(x)``
    is ``P(x)``.
    """

    def step(self, x: Tensor, z: Tensor) -> Tensor: ...

    def project(self, x: Tensor) -> Tensor: ...


class Splitting(Protocol):
    """A registered splitting: its default step, guaranteed rate and how to bind it to a problem."""

    name: str
    needs_resolvent: bool

    def default_alpha(self, mu: float, L: float) -> float: ...

    def rate(self, a: float, mu: float, L: float) -> float | None:
        """Guaranteed contraction factor of ``T`` (``None`` when there is none, e.g. ``mu <= 0``)."""
        ...

    def alpha_candidates(self, mu: float, L: float) -> tuple[float, ...]:
        """Steps tried by :func:`tune_alpha`."""
        ...

    def prepare(
        self,
        apply_W: Callable[[Tensor], Tensor],
        apply_V: Callable[[Tensor], Tensor] | None,
        prox: Callable[[Tensor], Tensor],
        v: Tensor,
        a: float,
    ) -> PreparedSplitting: ...


@dataclass
class _FBPrepared:
    matvec: Callable[[Tensor], Tensor]
    prox: Callable[[Tensor], Tensor]
    av: Tensor
    a: float

    def step(self, x: Tensor, z: Tensor) -> Tensor:
        a = self.a
        return self.prox((1.0 - a) * z + a * self.matvec(z) + self.av)

    def project(self, x: Tensor) -> Tensor:
        return x


@dataclass
class _RachfordPrepared:
    resolve: Callable[[Tensor], Tensor]
    prox: Callable[[Tensor], Tensor]
    av: Tensor
    averaged: bool

    def step(self, x: Tensor, z: Tensor) -> Tensor:
        u_h = 2 * z - x
        z_h = self.resolve(u_h + self.av)
        return x + z_h - z if self.averaged else 2 * z_h - u_h

    def project(self, x: Tensor) -> Tensor:
        return self.prox(x)


class ForwardBackward:
    """FB: ``z <- relu((1 - a) z + a (W z + v))``; rate :func:`~qmargin.deq.certificates.fb_rate`."""

    name = "fb"
    needs_resolvent = False

    def default_alpha(self, mu: float, L: float) -> float:
        return mu / L**2 if mu > 0 else 1.0 / L**2

    def rate(self, a: float, mu: float, L: float) -> float | None:
        rho = fb_rate(a, mu, L) if mu > 0 else 1.0
        return rho if rho < 1.0 else None

    def alpha_candidates(self, mu: float, L: float) -> tuple[float, ...]:
        a0 = self.default_alpha(mu, L)
        return tuple(c * a0 for c in (0.5, 1.0, 1.5, 1.9))

    def prepare(self, apply_W, apply_V, prox, v, a) -> PreparedSplitting:
        return _FBPrepared(apply_W, prox, a * v, a)


class PeacemanRachford:
    """PR (``averaged=False``) or DR (``averaged=True``); rate: :func:`qmargin.deq.certificates.pr_rate`."""

    needs_resolvent = True

    def __init__(self, name: str = "pr", averaged: bool = False) -> None:
        self.name, self.averaged = name, averaged

    def default_alpha(self, mu: float, L: float) -> float:
        return 1.0 / L

    def rate(self, a: float, mu: float, L: float) -> float | None:
        if not mu > 0:
            return None
        rho = pr_rate(a, mu, L)
        return 0.5 * (1.0 + rho) if self.averaged else rho

    def alpha_candidates(self, mu: float, L: float) -> tuple[float, ...]:
        return tuple(c / L for c in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0))

    def prepare(self, apply_W, apply_V, prox, v, a) -> PreparedSplitting:
        assert apply_V is not None
        return _RachfordPrepared(apply_V, prox, a * v, self.averaged)


SPLITTINGS: dict[str, Splitting] = {}
"""Registered splittings by name (:func:`register_splitting`)."""


def register_splitting(splitting: Splitting, replace: bool = False) -> Splitting:
    """Make ``splitting`` available as ``solve(..., method=splitting.name)``."""
    name = splitting.name.lower()
    if name in SPLITTINGS and not replace:
        raise ValueError(f"a splitting named {name!r} is already registered")
    SPLITTINGS[name] = splitting
    return splitting


register_splitting(ForwardBackward())
register_splitting(PeacemanRachford("pr", averaged=False))
register_splitting(PeacemanRachford("dr", averaged=True))


# --------------------------------------------------------------------------------------------------
# Accelerators (registry)
# --------------------------------------------------------------------------------------------------
class Accelerator(Protocol):
    """Proposes a candidate from the accepted pairs ``(x_k, T(x_k))`` (flattened to ``(N, D)``).

    ``propose`` is called once per iteration with the accepted iterate and its image; it returns a
    candidate ``x_c`` (rows may simply be ``T(x_k)``). The solver safeguards every candidate.
    """

    def propose(self, x: Tensor, f: Tensor) -> Tensor: ...


class AndersonAccelerator:
    """Type-II Anderson acceleration with memory ``m`` (Walker & Ni, SIAM J. Numer. Anal. 2011).

    With residuals ``g_j = T(x_j) - x_j`` of the last ``m + 1`` accepted iterates and the differences
    ``dG = [g_{j+1} - g_j]``, ``dF = [T(x_{j+1}) - T(x_j)]``, per sample::

        gamma = argmin ||g_k - dG gamma||^2 + lam ||dG||_F^2 ||gamma||^2 / m
        x_c   = T(x_k) - dF gamma        (beta = 1; beta < 1 mixes in (1 - beta)(x_k - dX gamma))

    The small ``m x m`` systems are solved batched with ``torch.linalg.solve_ex``; a singular or
    non-finite system gives ``gamma = 0`` (the plain step) for that sample, never an exception.
    """

    def __init__(self, memory: int = 5, lam: float = 1e-8, beta: float = 1.0) -> None:
        if memory < 1:
            raise ConfigError(f"Anderson memory must be >= 1, got {memory}")
        self.memory, self.lam, self.beta = memory, lam, beta
        self._x: Tensor | None = None
        self._f: Tensor | None = None
        self._g: Tensor | None = None
        self._dX: Tensor | None = None  # (m, N, D) ring buffers
        self._dF: Tensor | None = None
        self._dG: Tensor | None = None
        self._H: Tensor | None = None  # (N, m, m) Gram matrix of dG, updated one row per step
        self._rhs: Tensor | None = None  # (N, m): <dG_i, g_k>, updated incrementally
        self._count = 0

    def propose(self, x: Tensor, f: Tensor) -> Tensor:
        g = f - x
        if self._x is None or self._f is None or self._g is None:
            self._x, self._f, self._g = x, f, g
            return f
        m = self.memory
        if self._dG is None or self._dG.shape[1] != x.shape[0]:
            N, D = x.shape
            self._dX = x.new_zeros(m, N, D) if self.beta != 1.0 else None
            self._dF, self._dG = x.new_zeros(m, N, D), x.new_zeros(m, N, D)
            self._H = x.new_zeros(N, m, m)
        assert self._dF is not None and self._H is not None
        j = self._count % m
        self._count += 1
        dg = g - self._g
        self._dF[j] = f - self._f
        self._dG[j] = dg
        if self._dX is not None:
            self._dX[j] = x - self._x
        k = min(self._count, m)
        dG, dF = self._dG[:k], self._dF[:k]  # (k, N, D), contiguous slot writes
        row = (dG * dg).sum(-1).T  # (N, k): <dG_i, dg>
        self._H[:, j, :k] = row
        self._H[:, :k, j] = row
        # rhs_i = <dG_i, g_k> = <dG_i, g_{k-1}> + <dG_i, dg>: last step's rhs, its slot j renewed, plus row
        if self._rhs is None or self._rhs.shape[0] != x.shape[0]:
            self._rhs = x.new_zeros(x.shape[0], m)
        self._rhs[:, j] = (dg * self._g).sum(-1)
        self._rhs[:, :k] += row
        rhs = self._rhs[:, :k].unsqueeze(-1)
        self._x, self._f, self._g = x, f, g
        H = self._H[:, :k, :k]
        scale = H.diagonal(dim1=-2, dim2=-1).sum(-1) / k
        reg = (self.lam * scale + torch.finfo(H.dtype).tiny).reshape(-1, 1, 1)
        eye = torch.eye(k, dtype=H.dtype, device=H.device)
        gamma, info = torch.linalg.solve_ex(H + reg * eye, rhs)
        ok = (info == 0).reshape(-1, 1, 1) & torch.isfinite(gamma).all(dim=(-2, -1), keepdim=True)
        gamma = torch.where(ok, gamma, torch.zeros_like(gamma)).squeeze(-1).T.unsqueeze(-1)  # (k, N, 1)
        xc = f - (gamma * dF).sum(0)
        if self._dX is not None:
            xc = self.beta * xc + (1.0 - self.beta) * (x - (gamma * self._dX[:k]).sum(0))
        return xc


ACCELERATORS: dict[str, Callable[..., Accelerator] | None] = {"none": None}
"""Registered accelerator factories by name; ``"none"`` is the plain iteration."""


def register_accelerator(name: str, factory: Callable[..., Accelerator], replace: bool = False) -> None:
    """Make ``factory(**accelerator_options)`` available as ``solve(..., accelerator=name)``."""
    name = name.lower()
    if name in ACCELERATORS and not replace:
        raise ValueError(f"an accelerator named {name!r} is already registered")
    ACCELERATORS[name] = factory


register_accelerator("anderson", AndersonAccelerator)


# --------------------------------------------------------------------------------------------------
# Arguments, step sizes, residuals
# --------------------------------------------------------------------------------------------------
def _check_args(
    method: str, tol: float, max_iter: int, check_every: int, alpha: Alpha, accelerator: str = "none"
) -> str:
    method = method.lower()
    if method not in SPLITTINGS:
        raise ConfigError(f"unknown solver {method!r}; choose one of {', '.join(SPLITTINGS)}")
    if accelerator.lower() not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if not (tol >= 0):
        raise ConfigError(f"tol must be >= 0, got {tol}")
    if max_iter < 1 or check_every < 1:
        raise ConfigError(f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}")
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ConfigError(f"alpha must be a positive step size, None or 'auto', got {alpha!r}")
    elif alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive finite step size, got {alpha}")
    return method


def default_alpha(method: str, mu: float, L: float) -> float:
    """Step size from ``(mu, L)``: FB ``mu / L^2``, PR/DR ``1 / L`` (design.md §5).

    For a non-monotone operator (``mu <= 0``) FB has no convergent step; ``1 / L^2`` is returned so the
    solve still runs and reports its (non-)convergence.
    """
    if not (L > 0 and math.isfinite(L)):
        return 1.0
    return SPLITTINGS[method.lower()].default_alpha(mu, L)


def fixed_point_residual(z: Tensor, Tz: Tensor) -> Tensor:
    """Per-sample relative residual ``||z_i - T z_i|| / max(||z_i||, ||T z_i||)`` (0 when both are 0).

    NaN/inf iterates give a non-finite residual.
    """
    num = (z - Tz).flatten(1).norm(dim=1)
    den = torch.maximum(z.flatten(1).norm(dim=1), Tz.flatten(1).norm(dim=1))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


# --------------------------------------------------------------------------------------------------
# The iteration
# --------------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    matvec: Callable[[Tensor], Tensor]
    prox: Callable[[Tensor], Tensor]
    v: Tensor


def _plain(
    sp: PreparedSplitting,
    pb: _Problem,
    x: Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    trace: list[Tensor] | None,
) -> tuple[Tensor, Tensor, int, Tensor, float]:
    """The plain splitting ``x <- T(x)``; returns ``(x, z, iterations, r, max r)``."""
    z = sp.project(x)
    r = torch.full(pb.v.shape[:1], math.inf, dtype=pb.v.dtype, device=pb.v.device)
    rmax = math.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        x_new = sp.step(x, z)
        if trace is not None:
            trace.append((x_new - x).flatten(1).norm(dim=1))
        x = x_new
        z = sp.project(x)
        if it % check_every == 0 or it == max_iter:
            r = fixed_point_residual(z, pb.prox(pb.matvec(z) + pb.v))
            rmax = float(r.max())  # the one host sync per check
            if not math.isfinite(rmax) or rmax <= tol:
                break
    return x, z, it, r, rmax


def _accelerated(
    sp: PreparedSplitting,
    pb: _Problem,
    acc: Accelerator,
    rho: float,
    x: Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    trace: list[Tensor] | None,
) -> tuple[Tensor, Tensor, int, Tensor, float, int, int]:
    """Safeguarded accelerated iteration (module docstring): ``(x, z, it, r, max r, evals, rejected)``.

    Invariant: ``x`` is the accepted iterate, ``f = T(x)``, ``rx = ||f - x||`` per sample.
    """
    shape = x.shape
    N = shape[0]
    z = sp.project(x)
    f = sp.step(x, z)
    evals = 1
    rx = (f - x).flatten(1).norm(dim=1)
    r = torch.full((N,), math.inf, dtype=pb.v.dtype, device=pb.v.device)
    rmax = math.inf
    rejected = 0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        if trace is not None:
            trace.append(rx)
        xc = acc.propose(x.reshape(N, -1), f.reshape(N, -1)).reshape(shape)
        zc = sp.project(xc)
        fc = sp.step(xc, zc)
        evals += 1
        rc = (fc - xc).flatten(1).norm(dim=1)
        bad = ~(rc <= rho * rx)  # NaN candidates are rejected too
        if bool(bad.any()):  # plain step T(x) for those samples, and its image
            rejected += int(bad.sum())
            sel = bad.reshape(N, *([1] * (len(shape) - 1)))
            xc = torch.where(sel, f, xc)
            zc = sp.project(xc)
            fc2 = sp.step(xc, zc)
            evals += 1
            fc = torch.where(sel, fc2, fc)
            rc = torch.where(bad, (fc2 - xc).flatten(1).norm(dim=1), rc)
        x, f, rx = xc, fc, rc
        if it % check_every == 0 or it == max_iter:
            z = sp.project(f)  # the image is one plain step ahead of x: return it
            r = fixed_point_residual(z, pb.prox(pb.matvec(z) + pb.v))
            rmax = float(r.max())
            if not math.isfinite(rmax) or rmax <= tol:
                break
    return f, sp.project(f), it, r, rmax, evals, rejected


def _margin(op: Operator) -> tuple[float, float]:
    mu_t, L_t = op.margin_and_norm()
    return float(mu_t), float(L_t)


def tune_alpha(
    op: Operator | RealizesOperator,
    x_injection: Tensor,
    method: Method | str = "pr",
    probe_samples: int = 16,
    probe_iters: int = 20,
) -> float:
    """Pick a step by a short probe: the candidate with the smallest residual after ``probe_iters``.

    Candidates are the splitting's :meth:`Splitting.alpha_candidates` (PR/DR: ``c / L`` for
    ``c = 1/2 .. 16``; FB: ``c mu / L^2`` for ``c = 1/2 .. 1.9``, all inside FB's convergent range), each
    run plainly from zero on the first ``probe_samples`` samples. Ties go to the default step. The
    2020 reference code tuned ``alpha`` by halving it while the iteration count dropped; this probe
    costs about ``len(candidates) * probe_iters * probe_samples`` sample-iterations.
    """
    method = method.lower()
    with torch.no_grad():
        realized = _as_operator(op)
        mu, L = _margin(realized)
        spl = SPLITTINGS[method]
        a0 = default_alpha(method, mu, L)
        if not (L > 0 and math.isfinite(L)):
            return a0
        v = x_injection.detach()[:probe_samples]
        pb = _Problem(realized.matvec, torch.relu, v)
        best, best_r = a0, math.inf
        for a in (a0, *spl.alpha_candidates(mu, L)):
            apply_V = realized.resolvent(a).apply if spl.needs_resolvent else None
            sp = spl.prepare(realized.matvec, apply_V, torch.relu, v, a)
            _, _, _, _, rmax = _plain(sp, pb, torch.zeros_like(v), 0.0, probe_iters, probe_iters, None)
            if rmax < best_r * (1 - 1e-3):
                best, best_r = a, rmax
        return best


def _run(
    op: Operator | RealizesOperator,
    v: Tensor,
    transpose: bool,
    prox: Callable[[Tensor], Tensor],
    method: str,
    alpha: Alpha,
    tol: float,
    max_iter: int,
    check_every: int,
    accelerator: str = "none",
    accelerator_options: dict[str, Any] | None = None,
    init: Tensor | None = None,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    method = _check_args(method, tol, max_iter, check_every, alpha, accelerator)
    accelerator = accelerator.lower()
    t0 = time.perf_counter()
    with torch.no_grad():
        realized = _as_operator(op)
        v = v.detach()
        mu = L = None
        if alpha == "auto":
            alpha = tune_alpha(realized, v if not transpose else v, method)
            mu, L = _margin(realized)
        elif alpha is None:
            mu, L = _margin(realized)
            alpha = default_alpha(method, mu, L)
        a = float(alpha)
        spl = SPLITTINGS[method]
        apply_W = realized.rmatvec if transpose else realized.matvec
        apply_V = None
        if spl.needs_resolvent:
            res = realized.resolvent(a)
            apply_V = res.apply_T if transpose else res.apply
        sp = spl.prepare(apply_W, apply_V, prox, v, a)
        pb = _Problem(apply_W, prox, v)
        x0 = torch.zeros_like(v) if init is None or init.shape != v.shape else init.detach().to(v)
        tr: list[Tensor] | None = [] if trace else None
        factory = ACCELERATORS[accelerator]
        if factory is None:
            x, z, it, r, rmax = _plain(sp, pb, x0, tol, max_iter, check_every, tr)
            evals, rejected = it, 0
        else:
            if mu is None or L is None:
                mu, L = _margin(realized)
            rho = spl.rate(a, mu, L) if L > 0 and math.isfinite(L) else None
            x, z, it, r, rmax, evals, rejected = _accelerated(
                sp,
                pb,
                factory(**(accelerator_options or {})),
                1.0 if rho is None else rho,
                x0,
                tol,
                max_iter,
                check_every,
                tr,
            )
    finite = math.isfinite(rmax)
    stats = SolverStats(
        iterations=it,
        residual=rmax if finite else math.inf,
        converged=finite and rmax <= tol,
        time_s=time.perf_counter() - t0,
        alpha=a,
        method=method,
        tol=tol,
        mu=mu,
        L=L,
        finite=finite,
        sample_residual=r,
        sample_converged=r <= tol,
        accelerator=accelerator,
        evaluations=evals,
        rejected=rejected,
        iterate=x,
        trace=tr,
    )
    return z, stats


def solve(
    op: Operator | RealizesOperator,
    x_injection: Tensor,
    method: Method | str = "pr",
    alpha: Alpha = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    check_every: int = 5,
    accelerator: str = "none",
    accelerator_options: dict[str, Any] | None = None,
    init: Tensor | None = None,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Solve ``z = relu(W z + v)`` for ``v = x_injection`` (shape ``(N, *op.state_shape)``).

    Args:
        op: a realized operator (the :class:`~qmargin.deq.operators.Operator` protocol:
            :class:`~qmargin.deq.operators.DenseOperator`, :class:`~qmargin.deq.operators.ConvOperator`)
            or a parameterization module (:class:`RealizesOperator`: its :meth:`operator`, i.e. the
            ``W`` its forward pass uses).
        x_injection: ``v = U x + b`` (no gradient is tracked through the iterations).
        method: a registered splitting: ``"fb"``, ``"pr"``, ``"dr"`` (:data:`SPLITTINGS`).
        alpha: step size; ``None`` takes it from the exact ``(mu, L)`` (:func:`default_alpha`);
            ``"auto"``: :func:`tune_alpha`.
        tol: tolerance on the per-sample relative fixed-point residual (max over the batch).
        max_iter: iteration cap.
        check_every: test convergence every ``k`` iterations (and at ``max_iter``).
        accelerator: a registered accelerator: ``"none"`` (default, the plain splitting) or
            ``"anderson"`` (safeguarded, module docstring); ``accelerator_options`` go to its factory
            (Anderson: ``memory``, ``lam``, ``beta``).
        init: the splitting's variable to start from (``stats.iterate`` of an earlier solve: a warm
            start); ignored when its shape differs from ``v``'s. Default: zeros.
        trace: record the per-iteration splitting residuals in ``stats.trace``.

    Returns ``(z, stats)``. Non-convergence and NaN/inf are reported in ``stats`` (module docstring).
    """
    return _run(
        op,
        x_injection,
        False,
        torch.relu,
        method,
        alpha,
        tol,
        max_iter,
        check_every,
        accelerator,
        accelerator_options,
        init,
        trace,
    )


def solve_adjoint(
    op: Operator | RealizesOperator,
    grad: Tensor,
    active: Tensor,
    method: Method | str = "pr",
    alpha: Alpha = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    check_every: int = 5,
    accelerator: str = "none",
    accelerator_options: dict[str, Any] | None = None,
    init: Tensor | None = None,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Solve the adjoint system ``u = D (W^T u + g)`` of the implicit backward, ``D = diag(active)``.

    ``active`` is ``relu'(W z* + v)`` (bool or 0/1, the state's shape). The projection ``u -> D u`` is
    the resolvent of the indicator of the subspace ``{u : u_j = 0 where D_jj = 0}``, so the same
    splitting with ``W^T``, ``V^T`` and the same ``a`` applies (and the same accelerators). Then
    ``dL/dv = u`` and ``dL/dW = sum_i u_i z*_i^T`` (for a dense ``W``).
    """
    D = active.to(grad.dtype)
    return _run(
        op,
        grad,
        True,
        lambda t: t * D,
        method,
        alpha,
        tol,
        max_iter,
        check_every,
        accelerator,
        accelerator_options,
        init,
        trace,
    )
