"""MonDEQClassifier in a plain training loop, solver stats, quantized variant, recorded non-convergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qmargin.deq import MonDEQClassifier, MonotoneConv, MonotoneLinear, MonotoneMultiConv
from qmargin.quant import QuantLinear, QuantSpec, freeze_model


def _blobs(n: int = 120, d: int = 10, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("spec", [None, QuantSpec(6)])
def test_fc_classifier_trains_with_generic_loop(spec):
    torch.manual_seed(0)
    x, y = _blobs()
    model = MonDEQClassifier(10, n=16, num_classes=3, learn_m=True, spec=spec)
    assert isinstance(model.core, MonotoneLinear)
    assert isinstance(model.head, QuantLinear) == (spec is not None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert model.solver_stats.converged and model.backward_stats.converged
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (120, 3)
    assert F.cross_entropy(logits, y).item() < 0.5 * loss0
    assert (logits.argmax(1) == y).float().mean() > 0.9
    assert model.converged.shape == (120,) and bool(model.converged.all())
    assert model.core.m_raw.grad is not None and model.core.A.grad.abs().sum() > 0


def test_quantized_classifier_frozen_equals_fake_quantized():
    torch.manual_seed(1)
    x, _ = _blobs(d=8)
    model = MonDEQClassifier(8, n=12, num_classes=3, spec=QuantSpec(4)).eval()
    with torch.no_grad():
        fake = model(x)
        freeze_model(model)
        stored = model(x)
    torch.testing.assert_close(stored, fake, rtol=0, atol=0)
    with torch.no_grad():
        model.core.stored("W").codes.view(-1)[:20] ^= 0b0111  # bit errors in the stored W
        hit = model(x)
    assert not torch.equal(hit, fake)


def test_non_converged_eval_is_recorded_per_sample():
    torch.manual_seed(2)
    x, _ = _blobs(n=10, d=6)
    model = MonDEQClassifier(6, n=20, num_classes=3, m=0.02, solver="fb", max_iter=3, tol=1e-8).eval()
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    st = model.solver_stats
    assert not st.converged and st.iterations == 3
    assert model.converged.dtype == torch.bool and model.converged.shape == (10,)
    assert not bool(model.converged.all())
    assert st.to_dict()["samples_not_converged"] == int((~model.converged).sum())


@pytest.mark.parametrize("channels", [[3], [2, 2]])
def test_conv_classifier_forward_backward(channels):
    torch.manual_seed(3)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 1])
    model = MonDEQClassifier(
        in_shape=(1, 8, 8), conv_channels=channels, num_classes=3, pool=2, spec=QuantSpec(8)
    )
    assert isinstance(model.core, MonotoneConv if len(channels) == 1 else MonotoneMultiConv)
    F.cross_entropy(model(x), y).backward()
    assert model.solver_stats.converged and model.backward_stats.converged
    assert all(p.grad is not None for p in model.core.parameters())
