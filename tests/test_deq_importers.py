"""Importers of the 2020 reference and 2026 companion MonDEQ checkpoints (weights-only reads)."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from qmargin.deq import (
    MonDEQClassifier,
    detect_format,
    load_companion_2026,
    load_mondeq_checkpoint,
    load_reference_2020,
)
from qmargin.errors import CheckpointError
from qmargin.quant import QuantSpec

n, d, r, C = 7, 5, 4, 3


def _ref2020(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = "mon.linear_module."
    return {
        f"{p}U.weight": torch.randn(n, d, generator=g),
        f"{p}U.bias": torch.randn(n, generator=g),
        f"{p}A.weight": torch.randn(r, n, generator=g),
        f"{p}B.weight": torch.randn(n, n, generator=g),
        "Wout.weight": torch.randn(C, n, generator=g),
        "Wout.bias": torch.randn(C, generator=g),
    }


def _comp2026(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "mon.core.A": torch.randn(r, n, generator=g),
        "mon.core.S": torch.randn(n, n, generator=g),
        "mon.core.m_raw": torch.tensor(-0.7),
        "mon.core.U": torch.randn(n, d, generator=g),
        "mon.core.b": torch.randn(n, generator=g),
        "classifier.weight": torch.randn(C, n, generator=g),
        "classifier.bias": torch.randn(C, generator=g),
    }


def _W(A, B, m):
    return (1 - m) * torch.eye(n) - A.T @ A + B - B.T


def test_reference_2020_round_trip(tmp_path):
    sd = _ref2020()
    path = tmp_path / "ref.pt"
    torch.save(sd, path)
    assert detect_format(sd) == "reference2020"
    model = load_reference_2020(path, m=0.3, tol=1e-6)
    assert isinstance(model, MonDEQClassifier) and model.core.r == r and model.core.learn_m is False
    p = "mon.linear_module."
    W = _W(sd[f"{p}A.weight"], sd[f"{p}B.weight"], 0.3)
    torch.testing.assert_close(model.core.float_tensor("W").detach(), W)
    torch.testing.assert_close(model.core.U.detach(), sd[f"{p}U.weight"])
    torch.testing.assert_close(model.core.b.detach(), sd[f"{p}U.bias"])
    torch.testing.assert_close(model.head.weight.detach(), sd["Wout.weight"])
    torch.testing.assert_close(model.head.bias.detach(), sd["Wout.bias"])
    assert model.mon.tol == 1e-6
    # the reference forward: z = relu(W z + U x + b) by a long Peaceman-Rachford iteration in float64
    # (FB with these N(0, 1) factors has kappa ~ 60 and needs far more than 20k iterations)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
    I64, W64 = torch.eye(n, dtype=torch.float64), W.double()
    a = 1.0 / float(torch.linalg.matrix_norm(I64 - W64, 2))
    V = torch.linalg.inv(I64 + a * (I64 - W64))
    v = x.double() @ sd[f"{p}U.weight"].double().T + sd[f"{p}U.bias"].double()
    u = torch.zeros(4, n, dtype=torch.float64)
    z = torch.zeros_like(u)
    for _ in range(5000):
        u_h = 2 * z - u
        z_h = (u_h + a * v) @ V.T
        u = 2 * z_h - u_h
        z = torch.relu(u)
    z = z.float()
    torch.testing.assert_close(logits, z @ sd["Wout.weight"].T + sd["Wout.bias"], atol=2e-4, rtol=1e-4)


def test_companion_2026_round_trip(tmp_path):
    sd = _comp2026()
    path = tmp_path / "comp.pt"
    torch.save(sd, path)
    assert detect_format(sd) == "companion2026"
    model = load_companion_2026(path, spec=QuantSpec(8))
    m = math.log1p(math.exp(-0.7)) + 1e-4
    assert model.core.learn_m and model.core.m.item() == pytest.approx(m, rel=1e-6)
    assert model.core.m_raw.item() == pytest.approx(-0.7)
    W = _W(sd["mon.core.A"], sd["mon.core.S"], m)  # S plays the role of B
    torch.testing.assert_close(model.core.float_tensor("W").detach(), W)
    torch.testing.assert_close(model.core.U.detach(), sd["mon.core.U"])
    torch.testing.assert_close(model.core.b.detach(), sd["mon.core.b"])
    torch.testing.assert_close(model.head.weight.detach(), sd["classifier.weight"])
    assert set(model.core.quant_specs) == {"W", "U", "b"}
    fixed = load_mondeq_checkpoint(path, learn_m=False)
    assert not fixed.core.learn_m and fixed.core.m.item() == pytest.approx(m, rel=1e-6)


def test_wrapped_state_dict_and_auto_detection(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": collections.OrderedDict(_ref2020()), "epoch": 3}, path)
    model = load_mondeq_checkpoint(path, m=0.5)
    assert model.core.m.item() == pytest.approx(0.5)
    assert detect_format({"x": torch.zeros(1)}) is None


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b"not a checkpoint at all"),
        lambda p: torch.save(_Evil(), p),
        lambda p: torch.save([torch.zeros(2)], p),
        lambda p: torch.save({"mon.linear_module.U.weight": 3}, p),
        lambda p: torch.save({k: v for k, v in _ref2020().items() if k != "Wout.bias"}, p),
        lambda p: torch.save({**_ref2020(), "extra": torch.zeros(1)}, p),
        lambda p: torch.save({**_ref2020(), "mon.linear_module.B.weight": torch.zeros(n, n + 1)}, p),
    ],
    ids=["garbage", "pickled-object", "list", "non-tensor", "missing-key", "extra-key", "bad-shape"],
)
def test_bad_files_raise_one_line_checkpoint_error(tmp_path, capsys, make):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError) as err:
        load_reference_2020(path)
    assert "\n" not in str(err.value)
    assert "must never run" not in capsys.readouterr().out


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_companion_2026(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_companion_2026(_ref2020())
    with pytest.raises(CheckpointError, match="known format"):
        load_mondeq_checkpoint({"foo": torch.zeros(1)})
    bad = _comp2026()
    bad["mon.core.m_raw"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="scalar"):
        load_companion_2026(bad)


def _ref2020_conv(seed: int = 2, C: int = 3, Cin: int = 2, k: int = 3, g: float = 0.7, h: float = 1.3):
    gen = torch.Generator().manual_seed(seed)
    p = "mon.linear_module."
    return {
        f"{p}U.weight": torch.randn(C, Cin, k, k, generator=gen),
        f"{p}U.bias": torch.randn(C, generator=gen),
        f"{p}A.weight": torch.randn(C, C, k, k, generator=gen),
        f"{p}g": torch.tensor(g),
        f"{p}h": torch.tensor(h),
        f"{p}B.weight": torch.randn(C, C, k, k, generator=gen),
        "Wout.weight": torch.randn(10, C * 4 * 4, generator=gen),  # 16 x 16 grid, avg-pooled by 4
        "Wout.bias": torch.randn(10, generator=gen),
    }


def _circ(x, K):
    """Circular 'same' cross-correlation, written out with torch.roll (independent of qmargin's code)."""
    k = K.shape[-1]
    out = torch.zeros(x.shape[0], K.shape[0], *x.shape[2:], dtype=x.dtype)
    for p_ in range(k):
        for q in range(k):
            shifted = torch.roll(x, shifts=(k // 2 - p_, k // 2 - q), dims=(2, 3))  # x[i + p - k//2]
            out += torch.einsum("oc,nchw->nohw", K[:, :, p_, q], shifted)
    return out


def _circ_T(y, K):
    """Adjoint of :func:`_circ` (transposed kernel, shifts reversed)."""
    k = K.shape[-1]
    out = torch.zeros(y.shape[0], K.shape[1], *y.shape[2:], dtype=y.dtype)
    for p_ in range(k):
        for q in range(k):
            t = torch.einsum("oc,nohw->nchw", K[:, :, p_, q], y)
            out += torch.roll(t, shifts=(p_ - k // 2, q - k // 2), dims=(2, 3))
    return out


def test_reference_2020_conv_round_trip(tmp_path):
    from qmargin.deq.importers import load_reference_2020_conv

    sd = _ref2020_conv()
    path = tmp_path / "conv.pt"
    torch.save(sd, path)  # read back with weights_only=True
    assert detect_format(sd) == "reference2020conv"
    imp = load_reference_2020_conv(path, image_size=16, m=0.4)
    p = "mon.linear_module."
    m, g, h = 0.4, 0.7, 1.3
    A = sd[f"{p}A.weight"].double() / sd[f"{p}A.weight"].double().norm()
    B = h * sd[f"{p}B.weight"].double() / sd[f"{p}B.weight"].double().norm()
    z = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # the 2020 operator written directly: W z = (1 - m) z - g A^T A z + B z - B^T z
    Wz = (1 - m) * z - g * _circ_T(_circ(z, A), A) + _circ(z, B) - _circ_T(z, B)
    op = imp.core.operator()
    torch.testing.assert_close(op.matvec(z.float()).double(), Wz, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    v = _circ(x.double(), sd[f"{p}U.weight"].double()) + sd[f"{p}U.bias"].double().view(1, -1, 1, 1)
    torch.testing.assert_close(imp.core.injection(x).detach().double(), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(imp.head.weight.detach(), sd["Wout.weight"])
    # the classifier: head(avg_pool2d(z*, 4)) as the 2020 SingleConvNet (without its border projection)
    imp.model.mon.tol = 1e-6
    with torch.no_grad():
        zs = imp.model.mon(x)
        logits = imp.model(x)
    feats = torch.nn.functional.avg_pool2d(zs, 4).flatten(1)
    torch.testing.assert_close(logits, feats @ sd["Wout.weight"].T + sd["Wout.bias"])
    assert float(imp.core.margin_and_norm()[0]) >= m - 1e-5  # monotone by construction
    with pytest.raises(CheckpointError, match="load_reference_2020_conv"):
        load_mondeq_checkpoint(sd)
    with pytest.raises(CheckpointError, match="not monotone"):
        load_reference_2020_conv(_ref2020_conv(g=-0.5))
    with pytest.raises(CheckpointError, match="shape"):
        load_reference_2020_conv({**sd, f"{p}B.weight": torch.randn(3, 3, 5, 5)})
    with pytest.raises(CheckpointError, match="float32"):
        load_reference_2020_conv({**sd, f"{p}g": torch.tensor(0.7, dtype=torch.float64)})
