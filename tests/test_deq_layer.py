"""Implicit backward of the MonDEQ layer: gradients against finite differences and unrolled autograd."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from qmargin.deq import (
    ConvergenceError,
    DenseOperator,
    MonDEQLayer,
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    implicit_equilibrium,
)

D64 = torch.float64


def _gradcheck_layer(layer: MonDEQLayer, x: torch.Tensor, readout: torch.Tensor | None = None) -> None:
    """Finite-difference check of d(output)/d(every parameter, x), float64."""
    names = [n for n, p in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def f(*args):
        *ps, xx = args
        out = functional_call(layer, dict(zip(names, ps, strict=True)), (xx,))
        out = out[-1] if isinstance(out, tuple) else out
        out = out.flatten(1)
        return out if readout is None else out @ readout

    inputs = (*params, x.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("solver", ["pr", "fb", "dr"])
def test_fc_gradients_match_finite_differences(solver):
    torch.manual_seed(0)
    core = MonotoneLinear(3, 5, r=4, m=0.5, learn_m=True, dtype=D64)
    layer = MonDEQLayer(core, solver=solver, tol=1e-13, max_iter=20000, check_every=2)
    _gradcheck_layer(layer, torch.randn(2, 3, dtype=D64))
    assert layer.last_backward_stats is not None and layer.last_backward_stats.converged
    assert layer.last_backward_stats.alpha == layer.last_forward_stats.alpha


def test_conv_gradients_match_finite_differences():
    torch.manual_seed(1)
    core = MonotoneConv(1, 2, 4, m=0.5, learn_m=True, dtype=D64)
    layer = MonDEQLayer(core, tol=1e-13, max_iter=5000, check_every=2)
    readout = torch.randn(2 * 16, 3, dtype=D64)
    _gradcheck_layer(layer, torch.randn(1, 1, 4, 4, dtype=D64), readout)


def test_multitier_gradients_match_finite_differences():
    torch.manual_seed(2)
    core = MonotoneMultiConv(1, [1, 2], 4, m=0.5, dtype=D64)
    layer = MonDEQLayer(core, tol=1e-13, max_iter=5000, check_every=2)
    readout = torch.randn(2 * 4, 2, dtype=D64)  # reads the coarse tier, which couples to the fine one
    _gradcheck_layer(layer, torch.randn(1, 1, 4, 4, dtype=D64), readout)


def test_implicit_gradient_matches_unrolled_autograd():
    torch.manual_seed(3)
    core = MonotoneLinear(4, 6, m=0.6, dtype=D64)
    x = torch.randn(3, 4, dtype=D64)
    target = torch.randn(3, 6, dtype=D64)
    layer = MonDEQLayer(core, tol=1e-13, max_iter=10000)
    ((layer(x) - target) ** 2).sum().backward()
    implicit = [p.grad.clone() for p in core.parameters()]
    core.zero_grad()
    # long unrolled forward-backward iteration, differentiated by plain autograd
    W = core.assemble_W()
    v = core.injection(x)
    mu, L = (float(t) for t in core.margin_and_norm())
    a = mu / L**2
    z = torch.zeros_like(v)
    for _ in range(3000):
        z = torch.relu((1 - a) * z + a * (z @ W.T + v))
    ((z - target) ** 2).sum().backward()
    for g_imp, p in zip(implicit, core.parameters(), strict=True):
        torch.testing.assert_close(g_imp, p.grad, atol=1e-8, rtol=1e-6)


def test_functional_form_and_stats():
    torch.manual_seed(4)
    core = MonotoneLinear(3, 4, dtype=D64)
    W = core.assemble_W().detach().requires_grad_(True)
    v = core.injection(torch.randn(2, 3, dtype=D64)).detach().requires_grad_(True)
    z, rec = implicit_equilibrium(DenseOperator(W), v, "dr", tol=1e-10)
    assert rec.forward.converged and rec.backward is None
    z.sum().backward()
    assert rec.backward.converged and rec.backward.method == "dr"
    assert W.grad.shape == (4, 4) and v.grad.shape == (2, 4)


def test_raise_on_failure_and_record_by_default():
    torch.manual_seed(5)
    core = MonotoneLinear(3, 8, m=0.05, dtype=D64)
    x = torch.randn(4, 3, dtype=D64)
    layer = MonDEQLayer(core, solver="fb", max_iter=2, tol=1e-10)
    with torch.no_grad():
        layer(x)
    st = layer.last_forward_stats
    assert not st.converged and st.iterations == 2 and not bool(st.sample_converged.all())
    strict = MonDEQLayer(core, solver="fb", max_iter=2, tol=1e-10, on_failure="raise")
    with pytest.raises(ConvergenceError):
        strict(x)
