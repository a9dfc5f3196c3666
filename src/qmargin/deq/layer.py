"""The MonDEQ layer: equilibrium forward by operator splitting, gradients by implicit differentiation.

Forward: ``z* = relu(W z* + v)``, ``v = U x + b``, solved by FB/PR/DR (:mod:`qmargin.deq.solvers`)
without tracking the iterations.

Backward (design.md §5): with ``D = diag(relu'(W z* + v))`` and the incoming gradient ``g = dL/dz*``,
differentiating the fixed point gives ``(I - D W) dz = D (dW z* + dv)``, hence

    u = D (W^T u + g)            (the adjoint system, solved with the same splitting and step a)
    dL/dv = u,   dL/dW = vjp of (W -> W z*) at u   (= sum_i u_i z*_i^T for a dense W).

``I - W^T`` has the margin and norm of ``I - W``, so the adjoint solve converges whenever the forward
one does.

Caches (:class:`MonDEQLayer`): the realized operator, with its resolvent ``V`` and ``(mu, L)``, is kept
while the realized ``W`` is bit-identical (checked with ``torch.equal``, so it can never be stale;
a weight update or a change of quantization state recomputes it), and ``alpha="auto"``'s tuned step
with it. Forward and backward of one training step share the operator (one factorisation per
weight update). ``warm_start=True`` starts each solve from the previous solve's splitting variable
when the shapes match.

Gradients reach ``A, B, m`` through the (fake-quantized, straight-through) assembled ``W`` and
``U, b, x`` through ``v``, by ordinary autograd outside the custom function.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from qmargin.deq.monotone import MonotoneParameterization
from qmargin.deq.operators import Operator
from qmargin.deq.solvers import (
    Alpha,
    ConvergenceError,
    SolverStats,
    _check_args,
    default_alpha,
    solve,
    solve_adjoint,
    tune_alpha,
)

__all__ = ["MonDEQLayer", "implicit_equilibrium"]

_FAILURE_MODES = ("record", "raise")


@dataclass
class _SolveConfig:
    method: str
    alpha: Alpha
    tol: float
    max_iter: int
    check_every: int
    backward_tol: float
    backward_max_iter: int
    accelerator: str = "none"
    accelerator_options: dict[str, Any] | None = None
    warm: dict[str, Tensor] | None = field(default=None, repr=False)  # warm-start store (or None)


class _Recorder:
    """Receives the stats of forward and backward solves (holds its layer weakly)."""

    def __init__(self, layer: MonDEQLayer | None = None) -> None:
        self._layer = weakref.ref(layer) if layer is not None else None
        self.forward: SolverStats | None = None
        self.backward: SolverStats | None = None

    def record(self, kind: str, stats: SolverStats) -> None:
        setattr(self, kind, stats)
        layer = self._layer() if self._layer is not None else None
        if layer is not None:
            layer._record(kind, stats)


class _ImplicitEquilibrium(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, weight: Tensor, op: Operator, cfg: _SolveConfig, rec: _Recorder):
        if op.weight.requires_grad:
            op = op.with_weight(weight.detach())
        z, stats = _forward_solve(op, v, cfg)
        rec.record("forward", stats)
        ctx.op, ctx.cfg, ctx.rec, ctx.alpha = op, cfg, rec, stats.alpha
        ctx.save_for_backward(z, v, weight)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        z, v, weight = ctx.saved_tensors
        op, cfg = ctx.op, ctx.cfg
        active = (op.matvec(z) + v) > 0
        init = cfg.warm.get("backward") if cfg.warm is not None else None
        u, stats = solve_adjoint(
            op,
            g,
            active,
            cfg.method,
            ctx.alpha,
            cfg.backward_tol,
            cfg.backward_max_iter,
            cfg.check_every,
            cfg.accelerator,
            cfg.accelerator_options,
            init,
        )
        if cfg.warm is not None and stats.iterate is not None:
            cfg.warm["backward"] = stats.iterate
        ctx.rec.record("backward", stats)
        grad_w = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                w = weight.detach().requires_grad_(True)
                (grad_w,) = torch.autograd.grad(op.with_weight(w).matvec(z), w, u)
        grad_v = u if ctx.needs_input_grad[0] else None
        return grad_v, grad_w, None, None, None


def _forward_solve(op: Operator, v: Tensor, cfg: _SolveConfig) -> tuple[Tensor, SolverStats]:
    init = cfg.warm.get("forward") if cfg.warm is not None else None
    z, stats = solve(
        op,
        v,
        cfg.method,
        cfg.alpha,
        cfg.tol,
        cfg.max_iter,
        cfg.check_every,
        cfg.accelerator,
        cfg.accelerator_options,
        init,
    )
    if cfg.warm is not None and stats.iterate is not None:
        cfg.warm["forward"] = stats.iterate
    return z, stats


def implicit_equilibrium(
    op: Operator,
    v: Tensor,
    method: str = "pr",
    alpha: Alpha = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    check_every: int = 5,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    accelerator: str = "none",
    accelerator_options: dict[str, Any] | None = None,
) -> tuple[Tensor, _Recorder]:
    """Functional form: ``z* = relu(W z* + v)`` differentiable in ``op.weight`` and ``v`` (implicit backward).

    Returns ``(z*, recorder)``; ``recorder.forward`` / ``recorder.backward`` hold the solves' stats.
    """
    cfg = _SolveConfig(
        method,
        alpha,
        tol,
        max_iter,
        check_every,
        tol if backward_tol is None else backward_tol,
        max_iter if backward_max_iter is None else backward_max_iter,
        accelerator,
        accelerator_options,
    )
    rec = _Recorder()
    return _ImplicitEquilibrium.apply(v, op.weight, op, cfg, rec), rec


class MonDEQLayer(nn.Module):
    """``x -> z* = relu(W z* + U x + b)`` for a monotone parameterization ``core``.

    Args:
        core: a :class:`~qmargin.deq.monotone.MonotoneParameterization` (FC, conv, multi-tier conv).
        solver: ``"pr"`` (default), ``"dr"``, ``"fb"`` or another registered splitting.
        alpha: step size; ``None``: from the exact ``(mu, L)`` of the ``W`` in use; ``"auto"``: tuned by
            :func:`~qmargin.deq.solvers.tune_alpha` as a multiple ``c`` of that default step, re-tuned
            every ``auto_every`` new ``W`` (as the 2020 code re-tuned twice per epoch); in between,
            ``a = c * default(mu, L)`` of the current ``W`` (FB's ``c <= 1.9`` keeps ``a < 2 mu / L^2``).
        tol, max_iter, check_every: see :func:`qmargin.deq.solvers.solve`.
        backward_tol, backward_max_iter: for the adjoint solve (default: as forward).
        on_failure: ``"record"`` (default): a non-converged solve is only recorded in the stats;
            ``"raise"``: raise :class:`~qmargin.deq.solvers.ConvergenceError`.
        accelerator, accelerator_options: see :func:`qmargin.deq.solvers.solve` (default ``"none"``).
        warm_start: start every solve (forward and adjoint) from the previous one's splitting variable
            when the shapes match (zeros otherwise). Always *valid*: the splittings converge from any
            start, so the result is the same equilibrium within ``tol`` (not bit-identical to a cold
            start). It *pays* when consecutive batches hold the same samples in the same order and the
            weights move little (full-batch training, repeated evaluation, fine-tuning); for shuffled
            minibatches the previous equilibrium is no closer than zero and may be farther.
        cache_operator: keep the realized operator (``V``, ``(mu, L)``, tuned step) while ``W`` is
            bit-identical (default ``True``; no effect on results).

    After a forward pass ``last_forward_stats`` holds the solve's :class:`SolverStats` (with the
    per-sample ``sample_converged``); after ``backward()`` ``last_backward_stats`` the adjoint solve's.
    ``forward`` returns ``core.to_output(z*)`` (FC: ``(N, n)``; conv: ``(N, C, H, W)``; multi-tier: the
    tuple of tiers); :meth:`equilibrium` the plain state.
    """

    def __init__(
        self,
        core: MonotoneParameterization,
        solver: str = "pr",
        alpha: Alpha = None,
        tol: float = 1e-4,
        max_iter: int = 300,
        check_every: int = 5,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        on_failure: str = "record",
        accelerator: str = "none",
        accelerator_options: dict[str, Any] | None = None,
        warm_start: bool = False,
        cache_operator: bool = True,
        auto_every: int = 100,
    ) -> None:
        super().__init__()
        solver = _check_args(solver, tol, max_iter, check_every, alpha, accelerator)
        if auto_every < 1:
            raise ValueError(f"auto_every must be >= 1, got {auto_every}")
        if on_failure not in _FAILURE_MODES:
            raise ValueError(f"on_failure must be one of {_FAILURE_MODES}, got {on_failure!r}")
        self.core = core
        self.solver, self.alpha, self.tol = solver, alpha, tol
        self.max_iter, self.check_every = max_iter, check_every
        self.backward_tol = tol if backward_tol is None else backward_tol
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        self.on_failure = on_failure
        self.accelerator, self.accelerator_options = accelerator.lower(), accelerator_options
        self.warm_start, self.cache_operator = warm_start, cache_operator
        self._warm: dict[str, Tensor] = {}
        self._op_cache: tuple[Operator, float | None] | None = None
        self.auto_every = auto_every
        self._auto_mult: float | None = None
        self._auto_count = 0
        self.last_forward_stats: SolverStats | None = None
        self.last_backward_stats: SolverStats | None = None

    def _config(self, alpha: Alpha) -> _SolveConfig:
        return _SolveConfig(
            self.solver,
            alpha,
            self.tol,
            self.max_iter,
            self.check_every,
            self.backward_tol,
            self.backward_max_iter,
            self.accelerator,
            self.accelerator_options,
            self._warm if self.warm_start else None,
        )

    def _operator(self, weight: Tensor, v: Tensor) -> tuple[Operator, Alpha]:
        """The realized operator for ``weight`` (cached while ``W`` is bit-identical) and the step."""
        w = weight.detach()
        cached = self._op_cache
        if (
            self.cache_operator
            and cached is not None
            and cached[0].weight.shape == w.shape
            and cached[0].weight.dtype == w.dtype
            and cached[0].weight.device == w.device
            and torch.equal(cached[0].weight, w)
        ):
            op, tuned = cached
        else:
            op, tuned = self.core.build_operator(w), None
        alpha: Alpha = self.alpha
        if alpha == "auto":
            if tuned is None:
                mu, L = (float(t) for t in op.margin_and_norm())
                base = default_alpha(self.solver, mu, L)
                if self._auto_mult is None or self._auto_count % self.auto_every == 0:
                    self._auto_mult = tune_alpha(op, v, self.solver) / base
                self._auto_count += 1
                tuned = self._auto_mult * base
            alpha = tuned
        if self.cache_operator:
            self._op_cache = (op, tuned)
        return op, alpha

    def reset_caches(self) -> None:
        """Forget the cached operator and the warm-start iterates."""
        self._op_cache = None
        self._warm.clear()
        self._auto_mult = None
        self._auto_count = 0

    def _record(self, kind: str, stats: SolverStats) -> None:
        setattr(self, f"last_{kind}_stats", stats)
        if self.on_failure == "raise" and not stats.converged:
            raise ConvergenceError(
                f"MonDEQ {kind} solve ({stats.method}, a={stats.alpha:.3g}) did not converge: residual "
                f"{stats.residual:.3g} > tol {stats.tol:g} after {stats.iterations} iterations"
            )

    def equilibrium(self, x: Tensor) -> Tensor:
        """``z*`` in the state's shape ``(N, *core.state_shape)`` (differentiable, implicit backward)."""
        core = self.core
        v = core.injection(x)
        weight = core.tensor("W")
        op, alpha = self._operator(weight, v)
        cfg = self._config(alpha)
        if torch.is_grad_enabled() and (v.requires_grad or weight.requires_grad):
            return _ImplicitEquilibrium.apply(v, weight, op, cfg, _Recorder(self))
        z, stats = _forward_solve(op, v, cfg)
        self._record("forward", stats)
        return z

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self.core.to_output(self.equilibrium(x))

    def extra_repr(self) -> str:
        a = "default" if self.alpha is None else self.alpha
        a = a if isinstance(a, str) else f"{a:g}"
        extra = "" if self.accelerator == "none" else f", accelerator={self.accelerator}"
        return f"solver={self.solver}, alpha={a}, tol={self.tol:g}, max_iter={self.max_iter}{extra}"
