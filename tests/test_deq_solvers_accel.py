"""Splitting/accelerator registries, safeguarded Anderson, auto step, warm starts, operator cache."""

from __future__ import annotations

import math

import pytest
import torch

from qmargin.deq import (
    DenseOperator,
    MonDEQLayer,
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    solve,
    solve_adjoint,
)
from qmargin.deq.certificates import pr_rate
from qmargin.deq.solvers import (
    ACCELERATORS,
    SPLITTINGS,
    PeacemanRachford,
    register_accelerator,
    register_splitting,
    tune_alpha,
)
from qmargin.errors import ConfigError

D64 = torch.float64


def _legacy(op, v, method, a, tol, max_iter, check_every):
    """The solver loop as it was before the registries (transcribed): the default path must match it."""
    from qmargin.deq.solvers import fixed_point_residual

    op = op.with_weight(op.weight.detach())
    z = torch.zeros_like(v)
    u = torch.zeros_like(v)
    av = a * v
    V = op.resolvent(a).apply if method != "fb" else None
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        if method == "fb":
            z = torch.relu((1.0 - a) * z + a * op.matvec(z) + av)
        else:
            u_h = 2 * z - u
            z_h = V(u_h + av)
            u = 2 * z_h - u_h if method == "pr" else u + z_h - z
            z = torch.relu(u)
        if it % check_every == 0 or it == max_iter:
            r = fixed_point_residual(z, torch.relu(op.matvec(z) + v))
            if not math.isfinite(float(r.max())) or float(r.max()) <= tol:
                break
    return z, it


def _fc(seed=0, n=30, N=16, m=0.05, scale=3.0, dtype=torch.float32):
    torch.manual_seed(seed)
    core = MonotoneLinear(10, n, m=m, dtype=dtype)
    with torch.no_grad():
        core.A.mul_(scale)
        core.B.mul_(scale)
    return core, core.injection(torch.randn(N, 10, dtype=dtype)).detach()


@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_default_path_is_the_legacy_loop_bit_for_bit(method):
    core, v = _fc(scale=1.0)
    op = core.operator()
    z, st = solve(op, v, method, tol=1e-5, max_iter=400)
    z_old, it = _legacy(op, v, method, st.alpha, 1e-5, 400, 5)
    assert torch.equal(z, z_old) and st.iterations == it and st.accelerator == "none"
    conv = MonotoneConv(1, 2, 5, m=0.5)
    vc = conv.injection(torch.randn(2, 1, 5, 5)).detach()
    opc = conv.operator()
    z, st = solve(opc, vc, method, tol=1e-5)
    assert torch.equal(z, _legacy(opc, vc, method, st.alpha, 1e-5, 300, 5)[0])


def _conv_core(kind: str, seed: int = 1, m: float = 0.3):
    """A small single-conv or multi-tier core (float64) and an injection for it."""
    torch.manual_seed(seed)
    if kind == "conv":
        core = MonotoneConv(1, 3, 6, m=m, dtype=D64)
    else:
        core = MonotoneMultiConv(1, [2, 3], 4, m=m, dtype=D64)
    x = torch.randn(3, 1, *core.image_size, dtype=D64)
    return core, x


@pytest.mark.parametrize("kind", ["fc", "conv", "multitier"])
@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
def test_anderson_reaches_the_same_equilibrium(kind, method):
    if kind == "fc":
        core, v = _fc(dtype=D64, m=0.3, scale=1.0)
    else:
        core, x = _conv_core(kind)
        v = core.injection(x).detach()
    op = core.operator()
    z0, st0 = solve(op, v, method, tol=1e-11, max_iter=50000)
    z1, st1 = solve(op, v, method, tol=1e-11, max_iter=50000, accelerator="anderson")
    assert st0.converged and st1.converged and st1.accelerator == "anderson"
    assert bool(st1.sample_converged.all()) and st1.evaluations >= st1.iterations
    torch.testing.assert_close(z1, z0, atol=1e-8, rtol=0)
    g = torch.randn_like(v)
    act = torch.relu(op.matvec(z0) + v) > 0
    u0, _ = solve_adjoint(op, g, act, method, tol=1e-11, max_iter=50000)
    u1, sa = solve_adjoint(op, g, act, method, tol=1e-11, max_iter=50000, accelerator="anderson")
    assert sa.converged
    torch.testing.assert_close(u1, u0, atol=1e-8, rtol=0)


class _Wild:
    """A deliberately bad accelerator: overshoots by 40 steps, or jumps to noise (seeded)."""

    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(0)
        self.k = 0

    def propose(self, x, f):
        self.k += 1
        if self.k % 2:
            return x + 40.0 * (f - x)
        return f + torch.randn(f.shape, generator=self.g, dtype=f.dtype)


@pytest.mark.parametrize("acc", ["wild", "anderson"])
def test_safeguard_keeps_the_pr_guarantee(acc):
    register_accelerator("wild", _Wild, replace=True)
    try:
        core, v = _fc(dtype=D64)
        op = core.operator()
        mu, L = (float(t) for t in op.margin_and_norm())
        opts = {"memory": 8, "lam": 0.0} if acc == "anderson" else None
        z, st = solve(
            op, v, "pr", tol=1e-9, max_iter=20000, accelerator=acc, accelerator_options=opts, trace=True
        )
        _, plain = solve(op, v, "pr", tol=1e-9, max_iter=20000, trace=True)
    finally:
        ACCELERATORS.pop("wild")
    rho = pr_rate(st.alpha, mu, L)
    r = torch.stack(st.trace)  # (iterations, N): ||T(x_k) - x_k|| of the accepted iterates
    k = torch.arange(r.shape[0], dtype=D64).unsqueeze(1)
    assert bool((r <= (rho**k) * r[0] * (1 + 1e-9) + 1e-300).all())  # r_k <= rho^k r_0, every sample
    assert bool((r[1:] <= r[:-1] * (1 + 1e-12)).all())
    assert st.converged and plain.converged and st.residual <= 1e-9
    if acc == "wild":
        assert st.rejected > 0
    torch.testing.assert_close(z, solve(op, v, "pr", tol=1e-12, max_iter=50000)[0], atol=1e-7, rtol=0)


def test_registries_extend_without_touching_callers():
    class Relaxed(PeacemanRachford):
        """A third Rachford form for the test: averaged like DR (the registry only sees the protocol)."""

    register_splitting(Relaxed("dr-test", averaged=True))
    try:
        core, v = _fc(dtype=D64)
        z, st = solve(core, v, "dr-test", tol=1e-10, max_iter=20000)
        z_dr, _ = solve(core, v, "dr", tol=1e-10, max_iter=20000)
        assert st.converged and st.method == "dr-test"
        torch.testing.assert_close(z, z_dr, atol=1e-8, rtol=0)
        layer = MonDEQLayer(core, solver="dr-test", tol=1e-8, max_iter=20000)
        layer(torch.randn(2, 10, dtype=D64))
        assert layer.last_forward_stats.method == "dr-test"
        with pytest.raises(ValueError):
            register_splitting(Relaxed("dr-test"))
    finally:
        SPLITTINGS.pop("dr-test")
    with pytest.raises(ConfigError):
        solve(core, v, accelerator="nope")
    with pytest.raises(ConfigError):
        solve(core, v, alpha="fast")


@pytest.mark.parametrize("method", ["fb", "pr"])
def test_auto_alpha(method):
    core, v = _fc(dtype=D64, m=0.2, scale=1.5)
    op = core.operator()
    mu, L = (float(t) for t in op.margin_and_norm())
    a = tune_alpha(op, v, method)
    cands = SPLITTINGS[method].alpha_candidates(mu, L)
    assert any(a == pytest.approx(c) for c in cands)
    z, st = solve(op, v, method, alpha="auto", tol=1e-10, max_iter=50000)
    assert st.converged and st.alpha == pytest.approx(a) and st.mu is not None
    z_ref, _ = solve(op, v, method, tol=1e-10, max_iter=50000)
    torch.testing.assert_close(z, z_ref, atol=1e-8, rtol=0)
    if method == "fb":
        assert a < 2 * mu / L**2  # stays in FB's convergent range


def test_warm_start_and_operator_cache():
    core, v = _fc(dtype=D64)
    x = torch.randn(16, 10, dtype=D64)
    z, st = solve(core, v, "pr", tol=1e-9, max_iter=20000)
    z2, st2 = solve(core, v, "pr", tol=1e-9, max_iter=20000, init=st.iterate)
    assert st2.iterations <= 5 and st2.converged
    _, st3 = solve(core, v[:3], "pr", tol=1e-9, max_iter=20000, init=st.iterate)  # shape differs: cold
    assert st3.iterations > 5
    layer = MonDEQLayer(core, tol=1e-9, max_iter=20000, warm_start=True)
    cold = MonDEQLayer(core, tol=1e-9, max_iter=20000, cache_operator=False)
    y1 = layer(x)
    op1 = layer._op_cache[0]
    y2 = layer(x)
    assert layer._op_cache[0] is op1  # W unchanged: V and (mu, L) reused
    assert layer.last_forward_stats.iterations <= 5
    torch.testing.assert_close(y2, cold(x), atol=1e-8, rtol=0)
    torch.testing.assert_close(y1, y2, atol=1e-8, rtol=0)
    # a weight update invalidates the cache (bit-exact comparison of the realized W)
    opt = torch.optim.SGD(core.parameters(), lr=1e-3)
    loss = layer(x).square().sum()
    loss.backward()
    assert layer.last_backward_stats.converged
    opt.step()
    layer(x)
    assert layer._op_cache[0] is not op1
    torch.testing.assert_close(layer(x), cold(x), atol=1e-8, rtol=0)


def test_layer_auto_alpha_and_anderson_gradients():
    core, _ = _fc(dtype=D64)
    x = torch.randn(5, 10, dtype=D64)
    ref = MonDEQLayer(core, tol=1e-11, max_iter=50000)
    fast = MonDEQLayer(core, alpha="auto", accelerator="anderson", tol=1e-11, max_iter=50000)
    grads = []
    for layer in (ref, fast):
        core.zero_grad()
        layer(x).sin().sum().backward()
        grads.append([p.grad.clone() for p in core.parameters()])
        assert layer.last_forward_stats.converged and layer.last_backward_stats.converged
    assert fast.last_backward_stats.accelerator == "anderson"
    # "auto" is tuned once; after a weight update the same multiple of the new default step is used
    mult, a0 = fast._auto_mult, fast.last_forward_stats.alpha
    with torch.no_grad():
        core.B.mul_(1.5)
    fast(x)
    mu, L = (float(t) for t in core.margin_and_norm())
    assert fast._auto_mult == mult and fast._auto_count == 2
    assert fast.last_forward_stats.alpha == pytest.approx(mult / L) and fast.last_forward_stats.alpha != a0
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-6)


def test_anderson_failures_are_reported_per_sample():
    W = 3.0 * torch.eye(4, dtype=D64)  # mu(W) = -2: no equilibrium
    v = torch.ones(2, 4, dtype=D64)
    z, st = solve(DenseOperator(W), v, "pr", alpha=0.1, max_iter=40, accelerator="anderson")
    assert not st.converged and not bool(st.sample_converged.any())
    # one sample needs many more iterations than the cap allows: flagged alone
    core, v = _fc(dtype=D64)
    v = v.clone()
    v[3] *= 1e6
    z, st = solve(core, v, "pr", tol=1e-12, max_iter=30, accelerator="anderson")
    assert not st.converged and st.sample_residual.shape == (16,) and math.isfinite(st.residual)
    assert st.to_dict()["samples_not_converged"] == int((~st.sample_converged).sum()) >= 1


@pytest.mark.parametrize("kind", ["conv", "multitier"])
@pytest.mark.parametrize("method", ["fb", "pr", "dr"])
@pytest.mark.parametrize("acc", ["none", "anderson"])
def test_conv_gradients_match_finite_differences_for_every_solver(kind, method, acc):
    """d<r, layer(x)>/d(all parameters, x) along a random direction: implicit backward vs central differences.

    Every splitting and accelerator, single-convolution and multi-tier (polyphase) operators, float64.
    """
    core, x = _conv_core(kind, seed=7, m=0.6)
    layer = MonDEQLayer(core, solver=method, accelerator=acc, tol=1e-13, max_iter=20000, check_every=2)
    params = [*core.parameters()]

    def readout(xx: torch.Tensor) -> torch.Tensor:
        out = layer(xx)
        return out[-1] if isinstance(out, tuple) else out  # multi-tier: the coarse tier couples to all

    with torch.no_grad():
        r = torch.randn_like(readout(x))

    def loss(xx: torch.Tensor) -> torch.Tensor:
        return (readout(xx) * r).sum()

    xg = x.clone().requires_grad_(True)
    core.zero_grad()
    loss(xg).backward()
    assert layer.last_forward_stats.converged and layer.last_backward_stats.converged
    assert layer.last_backward_stats.accelerator == acc and layer.last_backward_stats.method == method
    gen = torch.Generator().manual_seed(11)
    dirs = [torch.randn(p.shape, generator=gen, dtype=D64) for p in params]
    dx = torch.randn(x.shape, generator=gen, dtype=D64)
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, dirs, strict=True))
    analytic += float((xg.grad * dx).sum())
    eps = 1e-6
    base = [p.detach().clone() for p in params]
    vals = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, p0, d in zip(params, base, dirs, strict=True):
                p.copy_(p0 + sign * eps * d)
            vals.append(float(loss(x + sign * eps * dx)))
        for p, p0 in zip(params, base, strict=True):
            p.copy_(p0)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-7)
