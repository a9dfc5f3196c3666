"""Tests of qmargin.losses: CE, MCEL, MHL (values and gradients by hand and against torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qmargin.errors import ConfigError
from qmargin.losses import (
    DEFAULT_MCEL_BOUND,
    DEFAULT_MCEL_MARGIN,
    CrossEntropyLoss,
    MarginHingeLoss,
    MCELoss,
    available_losses,
    build_loss,
    classification_margin,
    cross_entropy,
    margin_hinge_loss,
    mcel_logits,
    mcel_loss,
    soft_clamp,
)


def _leaf(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def _random_batch(n: int = 7, c: int = 5, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


# -- cross entropy ------------------------------------------------------------------------------


def test_cross_entropy_hand_value_and_gradient():
    z = _leaf([[1.0, 2.0, 0.0]])
    loss = cross_entropy(z, torch.tensor([0]))
    # -z_0 + log(e^1 + e^2 + e^0)
    expected = -1.0 + math.log(math.e + math.e**2 + 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(1.4076059644443801, rel=1e-12)
    loss.backward()
    s = math.e + math.e**2 + 1.0
    assert z.grad.tolist()[0] == pytest.approx([math.e / s - 1.0, math.e**2 / s, 1.0 / s], rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    z, y = _random_batch()
    w = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    for kwargs in ({}, {"weight": w}, {"label_smoothing": 0.2}):
        ours = cross_entropy(z, y, reduction=reduction, **kwargs)
        ref = F.cross_entropy(z, y, reduction=reduction, **kwargs)
        torch.testing.assert_close(ours, ref)
        (g1,) = torch.autograd.grad(ours.sum(), z)
        (g2,) = torch.autograd.grad(ref.sum(), z)
        torch.testing.assert_close(g1, g2)
    assert CrossEntropyLoss is torch.nn.CrossEntropyLoss


# -- MCEL ---------------------------------------------------------------------------------------


def test_mcel_hand_value_and_gradient_without_bound():
    # z = [1, 2, 0], y = 0, M = 1  ->  z' = [0, 2, 0], loss = -0 + log(1 + e^2 + 1)
    z = _leaf([[1.0, 2.0, 0.0]])
    loss = mcel_loss(z, torch.tensor([0]), margin=1.0, bound=None)
    s = 2.0 + math.e**2
    assert loss.item() == pytest.approx(math.log(s), rel=1e-12)
    assert loss.item() == pytest.approx(2.2395447662218846, rel=1e-12)
    loss.backward()
    # d loss / d z = softmax(z') - onehot(y)  (the margin shift has unit Jacobian)
    assert z.grad.tolist()[0] == pytest.approx([1.0 / s - 1.0, math.e**2 / s, 1.0 / s], rel=1e-12)


def test_mcel_hand_value_and_gradient_with_bound_and_scale():
    # z = [1, 2, 0], y = 1, s = 2, T = 2, M = 0.5
    # zc = T tanh(s z / T) = [2 tanh(1), 2 tanh(2), 0];  z' = zc - [0, 0.5, 0]
    z = _leaf([[1.0, 2.0, 0.0]])
    loss = mcel_loss(z, torch.tensor([1]), margin=0.5, bound=2.0, logit_scale=2.0)
    zp = [2 * math.tanh(1.0), 2 * math.tanh(2.0) - 0.5, 0.0]
    lse = math.log(sum(math.exp(v) for v in zp))
    assert loss.item() == pytest.approx(lse - zp[1], rel=1e-12)
    loss.backward()
    p = [math.exp(v - lse) for v in zp]
    # chain rule: (p - onehot) * d zc / d z = (p - onehot) * s * (1 - tanh(s z / T)^2)
    dclamp = [2.0 * (1 - math.tanh(1.0) ** 2), 2.0 * (1 - math.tanh(2.0) ** 2), 2.0 * 1.0]
    expected = [p[0] * dclamp[0], (p[1] - 1.0) * dclamp[1], p[2] * dclamp[2]]
    assert z.grad.tolist()[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bound", [None, math.inf])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mcel_without_margin_or_bound_is_exactly_ce(bound, reduction):
    z, y = _random_batch(seed=1)
    ours = mcel_loss(z, y, margin=0.0, bound=bound, reduction=reduction)
    ref = F.cross_entropy(z, y, reduction=reduction)
    assert torch.equal(ours, ref)
    (g1,) = torch.autograd.grad(ours.sum(), z)
    (g2,) = torch.autograd.grad(ref.sum(), z)
    assert torch.equal(g1, g2)


def test_mcel_with_huge_bound_approaches_ce():
    z, y = _random_batch(seed=2)
    ours = mcel_loss(z, y, margin=0.0, bound=1e6)
    ref = F.cross_entropy(z, y)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    (g1,) = torch.autograd.grad(ours, z)
    (g2,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)
    # ... while a small bound changes the loss visibly
    assert not torch.allclose(mcel_loss(z, y, margin=0.0, bound=1.0), ref, atol=1e-3)


def test_mcel_logit_scale_is_a_plain_multiplier_without_bound():
    z, y = _random_batch(seed=3)
    torch.testing.assert_close(
        mcel_loss(z, y, margin=0.0, bound=None, logit_scale=2.5), F.cross_entropy(2.5 * z, y)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mcel_label_smoothing_and_weight_match_torch_ce(reduction):
    z, y = _random_batch(seed=4)
    w = torch.tensor([0.5, 1.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    ours = mcel_loss(z, y, margin=0.0, bound=None, reduction=reduction, label_smoothing=0.1, weight=w)
    ref = F.cross_entropy(z, y, reduction=reduction, label_smoothing=0.1, weight=w)
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad(ours.sum(), z)
    (g2,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(g1, g2)


def test_mcel_equals_ce_on_shifted_clamped_logits():
    z, y = _random_batch(seed=5, scale=50.0)
    M, T = 3.0, 10.0
    zc = T * torch.tanh(z / T) - M * F.one_hot(y, 5).to(z.dtype)
    torch.testing.assert_close(mcel_loss(z, y, margin=M, bound=T), F.cross_entropy(zc, y))
    torch.testing.assert_close(mcel_logits(z, y, margin=M, bound=T), zc)


def test_mcel_clamp_bounds_logits_and_the_loss():
    T, M, C = 5.0, 2.0, 4
    z = torch.tensor([[1e6, -1e6, 3e5, -7.0], [0.0, 1e4, -1e4, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    zc = soft_clamp(z, T)
    assert zc.abs().max().item() <= T  # tanh saturates to exactly 1 in float64 for 1e6 / T
    assert zc[1, 3].item() == pytest.approx(T * math.tanh(2.0 / T), rel=1e-12)
    shifted = mcel_logits(z, y, margin=M, bound=T)
    assert shifted.min().item() >= -T - M and shifted.max().item() <= T
    # Inflating a confident logit vector cannot push MCEL below CE of the saturated logits
    # [T - M, -T, ..., -T]:  log(1 + (C - 1) e^{-(2T - M)}) > 0, while CE goes to 0.
    one = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    floor = math.log(1 + (C - 1) * math.exp(-(2 * T - M)))
    for k in (1e2, 1e4, 1e8):
        loss = mcel_loss(k * one, torch.tensor([0]), margin=M, bound=T).item()
        assert loss >= floor - 1e-12
    assert mcel_loss(1e8 * one, torch.tensor([0]), margin=M, bound=T).item() == pytest.approx(floor, rel=1e-9)
    assert F.cross_entropy(1e8 * one, torch.tensor([0])).item() < 1e-12


def test_mcel_gradcheck():
    z, y = _random_batch(n=4, c=3, seed=6)
    assert torch.autograd.gradcheck(
        lambda t: mcel_loss(t, y, margin=1.5, bound=2.0, logit_scale=1.3, label_smoothing=0.1), (z,)
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m1=st.floats(0.0, 20.0),
    dm=st.floats(0.01, 5.0),
    bound=st.sampled_from([None, 3.0, 100.0]),
)
def test_mcel_strictly_increases_with_margin(seed, m1, dm, bound):
    # d/dM CE(z - M e_y, y) = 1 - p_y(M) > 0
    z, y = _random_batch(n=3, c=4, seed=seed)
    z = z.detach()
    lo = mcel_loss(z, y, margin=m1, bound=bound, reduction="none")
    hi = mcel_loss(z, y, margin=m1 + dm, bound=bound, reduction="none")
    assert torch.all(hi > lo)


def test_mcel_reductions_are_consistent():
    z, y = _random_batch(seed=7)
    none = mcel_loss(z, y, margin=2.0, bound=4.0, reduction="none")
    assert none.shape == (7,)
    torch.testing.assert_close(mcel_loss(z, y, margin=2.0, bound=4.0, reduction="sum"), none.sum())
    torch.testing.assert_close(mcel_loss(z, y, margin=2.0, bound=4.0, reduction="mean"), none.mean())
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    wn = mcel_loss(z, y, margin=2.0, bound=4.0, reduction="none", weight=w)
    torch.testing.assert_close(wn, none * w[y])
    torch.testing.assert_close(
        mcel_loss(z, y, margin=2.0, bound=4.0, reduction="mean", weight=w), wn.sum() / w[y].sum()
    )


def test_mcel_module_matches_functional_and_defaults():
    z, y = _random_batch(seed=8)
    mod = MCELoss(margin=3.0, bound=7.0, logit_scale=0.5, reduction="sum", label_smoothing=0.05)
    ref = mcel_loss(z, y, margin=3.0, bound=7.0, logit_scale=0.5, reduction="sum", label_smoothing=0.05)
    assert torch.equal(mod(z, y), ref)
    d = MCELoss()
    assert (d.margin, d.bound) == (DEFAULT_MCEL_MARGIN, DEFAULT_MCEL_BOUND)
    assert "margin=3.0" in repr(mod)
    w = torch.ones(5, dtype=torch.float64)
    assert "weight" in dict(MCELoss(1.0, 2.0, weight=w).named_buffers())


# -- MHL ----------------------------------------------------------------------------------------


def test_mhl_hand_values_and_gradient():
    z = _leaf([[2.0, -1.0, 0.5]])
    y = torch.tensor([0])
    # b = 1: relu([1 - 2, 1 - 1, 1 + 0.5]) = [0, 0, 1.5]; mean 0.5; / b -> 0.5
    assert margin_hinge_loss(z, y, b=1.0).item() == pytest.approx(0.5)
    # b = 3: relu([1, 2, 3.5]) -> mean 6.5 / 3; / 3
    loss = margin_hinge_loss(z, y, b=3.0)
    assert loss.item() == pytest.approx(6.5 / 9.0, rel=1e-12)
    loss.backward()
    # every hinge active: d/dz_j = -y_pm_j / (C b)
    assert z.grad.tolist()[0] == pytest.approx([-1 / 9, 1 / 9, 1 / 9], rel=1e-12)


def test_mhl_zero_when_margins_exceed_b():
    z = _leaf([[5.0, -5.0, -6.0], [-4.5, 4.1, -9.0]])
    y = torch.tensor([0, 1])
    loss = margin_hinge_loss(z, y, b=4.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0
    # one violated hinge (-4.5 > -4.8) makes it positive
    assert margin_hinge_loss(z.detach(), y, b=4.8).item() > 0


def test_mhl_reductions_weight_and_module():
    z, y = _random_batch(seed=9)
    none = margin_hinge_loss(z, y, b=2.0, reduction="none")
    assert none.shape == (7,) and torch.all(none >= 0)
    torch.testing.assert_close(margin_hinge_loss(z, y, b=2.0, reduction="sum"), none.sum())
    torch.testing.assert_close(margin_hinge_loss(z, y, b=2.0), none.mean())
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(margin_hinge_loss(z, y, b=2.0, weight=w, reduction="none"), none * w[y])
    torch.testing.assert_close(margin_hinge_loss(z, y, b=2.0, weight=w), (none * w[y]).sum() / w[y].sum())
    assert torch.equal(MarginHingeLoss(2.0, reduction="sum")(z, y), none.sum())


# -- helpers, validation, registry --------------------------------------------------------------


def test_classification_margin():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 1.0, -2.0]])
    m = classification_margin(z, torch.tensor([0, 2]))
    assert m.tolist() == pytest.approx([0.5, -3.0])


def test_input_validation():
    z, y = _random_batch()
    with pytest.raises(ValueError, match="shape"):
        mcel_loss(z.unsqueeze(0), y, margin=1.0, bound=2.0)
    with pytest.raises(ValueError, match="target"):
        mcel_loss(z, y[:-1], margin=1.0, bound=2.0)
    with pytest.raises(ValueError, match="integer"):
        margin_hinge_loss(z, y.double(), b=1.0)
    with pytest.raises(ConfigError, match="reduction"):
        cross_entropy(z, y, reduction="avg")
    for bad in (
        {"margin": -1.0, "bound": 2.0},
        {"margin": 1.0, "bound": 0.0},
        {"margin": math.nan, "bound": 2.0},
        {"margin": 1.0, "bound": -math.inf},
        {"margin": 1.0, "bound": 2.0, "logit_scale": 0.0},
    ):
        with pytest.raises(ConfigError):
            mcel_loss(z, y, **bad)
        with pytest.raises(ConfigError):
            MCELoss(**bad)
    with pytest.raises(ConfigError):
        MCELoss(1.0, 2.0, label_smoothing=1.5)
    with pytest.raises(ConfigError):
        MarginHingeLoss(0.0)


def test_build_loss():
    assert available_losses() == ["ce", "mcel", "mhl"]
    assert isinstance(build_loss("ce"), torch.nn.CrossEntropyLoss)
    assert isinstance(build_loss("CE", label_smoothing=0.1), torch.nn.CrossEntropyLoss)
    m = build_loss("mcel", margin=1.0, bound=math.inf, weight=[1.0, 2.0, 1.0, 1.0, 1.0])
    assert isinstance(m, MCELoss) and m.bound == math.inf and isinstance(m.weight, torch.Tensor)
    assert isinstance(build_loss("mcel"), MCELoss)
    h = build_loss("mhl", b=2.0, reduction="sum")
    assert isinstance(h, MarginHingeLoss) and h.b == 2.0
    z, y = _random_batch()
    torch.testing.assert_close(m(z, y), mcel_loss(z, y, margin=1.0, bound=None, weight=m.weight.double()))
    assert m.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss("focal")
    with pytest.raises(ConfigError, match="margin"):
        build_loss("ce", margin=3.0)
    with pytest.raises(ConfigError):
        build_loss("mhl")  # b is required
    with pytest.raises(ConfigError):
        build_loss("mcel", margin=-2.0)
    with pytest.raises(ConfigError):
        build_loss("ce", reduction="avg")
