"""FB / PR / DR splitting solvers: agreement with a direct solve, reported failures."""

from __future__ import annotations

import math

import pytest
import torch

from qmargin.deq import (
    DenseOperator,
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    default_alpha,
    solve,
    solve_adjoint,
)
from qmargin.errors import ConfigError

D64 = torch.float64


def _direct_equilibrium(Wd: torch.Tensor, v: torch.Tensor, z_guess: torch.Tensor) -> torch.Tensor:
    """Exact ``z = relu(W z + v)`` by an active-set linear solve from a guess, checked for consistency."""
    out = torch.zeros_like(v)
    for i in range(v.shape[0]):
        S = z_guess[i] > 1e-9
        for _ in range(10):  # active-set refinement (converges in one step from a good guess)
            z = torch.zeros_like(v[i])
            Wss = Wd[S][:, S]
            z[S] = torch.linalg.solve(torch.eye(int(S.sum()), dtype=D64) - Wss, v[i][S])
            pre = Wd @ z + v[i]
            S_new = pre > 0
            if torch.equal(S_new, S):
                break
            S = S_new
        torch.testing.assert_close(z, torch.relu(Wd @ z + v[i]), atol=1e-12, rtol=0)
        out[i] = z
    return out


def _cores():
    torch.manual_seed(0)
    fc = MonotoneLinear(6, 12, m=0.5, dtype=D64)
    conv = MonotoneConv(1, 2, 5, m=0.5, dtype=D64)
    multi = MonotoneMultiConv(1, [2, 2], 4, m=0.5, dtype=D64)
    return {
        "fc": (fc, torch.randn(3, 6, dtype=D64)),
        "conv": (conv, torch.randn(2, 1, 5, 5, dtype=D64)),
        "multiconv": (multi, torch.randn(2, 1, 4, 4, dtype=D64)),
    }


@pytest.mark.parametrize("kind", ["fc", "conv", "multiconv"])
def test_solvers_agree_with_direct_solve(kind):
    core, x = _cores()[kind]
    op = core.operator()
    v = core.injection(x).detach()
    sols = {}
    for method in ("fb", "pr", "dr"):
        z, st = solve(op, v, method, tol=1e-12, max_iter=20000, check_every=3)
        assert st.converged and st.finite and st.method == method
        assert st.residual <= 1e-12 and st.iterations < 20000
        assert st.sample_converged.all() and st.sample_residual.shape == (v.shape[0],)
        sols[method] = z
    Wd = op.to_dense()
    flat = v.reshape(v.shape[0], -1)
    direct = _direct_equilibrium(Wd, flat, sols["pr"].reshape(flat.shape)).reshape(v.shape)
    assert direct.abs().max() > 0.1  # a non-trivial equilibrium
    for method, z in sols.items():
        torch.testing.assert_close(z, direct, atol=1e-9, rtol=0, msg=method)


def test_float32_defaults_agree():
    torch.manual_seed(1)
    core = MonotoneLinear(20, 30, m=0.5)
    v = core.injection(torch.randn(16, 20)).detach()
    runs = [solve(core, v, m, max_iter=3000) for m in ("fb", "pr", "dr")]
    assert all(st.converged for _, st in runs)
    zs = [z for z, _ in runs]
    for z in zs[1:]:
        torch.testing.assert_close(z, zs[0], atol=2e-3, rtol=1e-2)


def test_default_step_sizes():
    torch.manual_seed(2)
    core = MonotoneLinear(4, 8, m=0.3, dtype=D64)
    v = core.injection(torch.randn(2, 4, dtype=D64)).detach()
    mu, L = (float(t) for t in core.margin_and_norm())
    _, fb = solve(core, v, "fb")
    _, pr = solve(core, v, "pr")
    assert fb.alpha == pytest.approx(mu / L**2) and pr.alpha == pytest.approx(1 / L)
    assert pytest.approx(mu) == fb.mu and pytest.approx(L) == fb.L
    _, st = solve(core, v, "dr", alpha=0.25)
    assert st.alpha == 0.25 and st.mu is None
    assert default_alpha("fb", -1.0, 2.0) == pytest.approx(0.25)


def test_check_every_counts_iterations():
    torch.manual_seed(3)
    core = MonotoneLinear(4, 8, dtype=D64)
    v = core.injection(torch.randn(2, 4, dtype=D64)).detach()
    _, st = solve(core, v, "fb", tol=1e-10, check_every=7, max_iter=10000)
    assert st.converged and st.iterations % 7 == 0
    _, st = solve(core, v, "fb", tol=1e-10, check_every=7, max_iter=10)
    assert not st.converged and st.iterations == 10 and math.isfinite(st.residual) and st.residual > 1e-10


def test_non_monotone_is_reported_not_returned_silently():
    W = 3.0 * torch.eye(4, dtype=D64)  # mu(W) = -2: no equilibrium is reachable
    op = DenseOperator(W)
    v = torch.ones(2, 4, dtype=D64)
    assert op.margin_and_norm()[0].item() == pytest.approx(-2.0)
    z, st = solve(op, v, "fb", max_iter=20)
    assert not st.converged and st.finite and st.iterations == 20
    assert not bool(st.sample_converged.any())
    z, st = solve(op, v, "fb", max_iter=100000, check_every=50)
    assert not st.converged and not st.finite and st.residual == math.inf
    assert st.iterations < 100000  # stopped at the first check after the overflow
    # PR with a = 1/L = 1/2 makes I + a (I - W) singular: the NaN/inf is caught, not returned as a result
    z, st = solve(op, v, "pr", max_iter=50)
    assert not st.converged and st.residual == math.inf and st.to_dict()["residual"] is None


def test_adjoint_solve_matches_linear_system():
    torch.manual_seed(4)
    core = MonotoneLinear(5, 9, m=0.4, dtype=D64)
    op = core.operator()
    g = torch.randn(3, 9, dtype=D64)
    active = torch.rand(3, 9) > 0.4
    for method in ("fb", "pr", "dr"):
        u, st = solve_adjoint(op, g, active, method, tol=1e-12, max_iter=20000)
        assert st.converged
        for i in range(3):
            Dm = torch.diag(active[i].to(D64))
            expected = torch.linalg.solve(torch.eye(9, dtype=D64) - Dm @ op.weight.T, Dm @ g[i])
            torch.testing.assert_close(u[i], expected, atol=1e-9, rtol=0)


def test_bad_arguments():
    core = MonotoneLinear(2, 3)
    v = torch.zeros(1, 3)
    with pytest.raises(ConfigError):
        solve(core, v, "newton")
    with pytest.raises(ConfigError):
        solve(core, v, alpha=-1.0)
    with pytest.raises(ConfigError):
        solve(core, v, max_iter=0)
