"""Import fully connected MonDEQ checkpoints of two published code bases into :class:`MonDEQClassifier`.

* **reference 2020** (Winston & Kolter's ``monotone_op_net``, ``SingleFcNet``): keys
  ``mon.linear_module.U.weight`` (n x d), ``mon.linear_module.U.bias`` (n),
  ``mon.linear_module.A.weight`` (r x n), ``mon.linear_module.B.weight`` (n x n), head ``Wout.weight``
  (classes x n) and ``Wout.bias``. ``W = (1 - m) I - A^T A + B - B^T`` with ``m`` a constructor argument
  of that code (not stored), hence an argument of :func:`load_reference_2020`.
* **companion 2026**: keys ``mon.core.A`` (r x n), ``mon.core.S`` (n x n), ``mon.core.m_raw`` (scalar;
  ``m = softplus(m_raw) + 1e-4``), ``mon.core.U`` (n x d), ``mon.core.b`` (n), head
  ``classifier.weight`` / ``classifier.bias``. ``S`` plays the role of ``B``:
  ``W = (1 - m) I - A^T A + S - S^T``.

* **reference 2020 conv** (``MONSingleConv`` of ``SingleConvNet``; :func:`load_reference_2020_conv`):
  keys ``mon.linear_module.U.weight`` (C x C_in x k x k), ``U.bias`` (C), ``A.weight``, ``B.weight``
  (C x C x k x k), the scalars ``g`` and ``h`` of its weight normalisation, head ``Wout.weight``,
  ``Wout.bias``. That code uses ``A_hat = A / ||A||_F``, ``B_hat = h B / ||B||_F`` and
  ``W = (1 - m) I - g A_hat^T A_hat + B_hat - B_hat^T`` (circular 'same' convolutions, cross-correlation
  with the kernel centred at ``k // 2``: qmargin's convention), so qmargin's ``A = sqrt(g) A_hat`` and
  ``B = B_hat``; ``g < 0`` is refused (``W`` would not be monotone by construction).
  *Not imported*: that network's ``MONBorderReLU`` (it zeroes a 1-pixel border of ``z``; qmargin's
  equilibrium is ``relu`` on the whole torus) and its head's ``avg_pool2d(z, 4)`` — the core's operator
  and injection are exact, the border projection is not. The multi-tier ``MONMultiConv`` is refused:
  its tiers are ``(S - 2) / 2^t + 2`` pixels (30, 16, 9 for MNIST), not exact halvings, and its
  cross-tier terms (zero-padded stride-2 convolutions, ``-2 A_t^T D_t z_{t-1}`` on tier ``t`` without the
  mirrored term on tier ``t - 1``) are not the circular ``(1 - m) I - A^T A + B - B^T`` that
  :class:`~qmargin.deq.monotone.MonotoneMultiConv` realizes: importing it would change the network.

A file is read by :func:`qmargin.weights.read_state_dict` (``torch.load(path, map_location="cpu",
weights_only=True)``, or safetensors): no arbitrary pickled objects are ever executed. Anything that
is not a dict of tensors with the expected keys and consistent shapes, or whose entries are not
finite ``float32`` tensors (no silent casts), raises :class:`qmargin.errors.CheckpointError` (one
line). A top-level wrapper
``{"state_dict": {...}}`` (or ``"model_state_dict"``, ``"model"``) is unwrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmargin.deq.classifier import MonDEQClassifier
from qmargin.deq.monotone import M_EPS, MonotoneConv, MonotoneLinear
from qmargin.errors import CheckpointError
from qmargin.weights import Source, read_state_dict

__all__ = [
    "REFERENCE_2020_KEYS",
    "COMPANION_2026_KEYS",
    "read_state_dict",
    "detect_format",
    "load_reference_2020",
    "REFERENCE_2020_CONV_KEYS",
    "Reference2020Conv",
    "load_reference_2020_conv",
    "load_companion_2026",
    "load_mondeq_checkpoint",
]

_R20 = "mon.linear_module."
REFERENCE_2020_KEYS = (
    f"{_R20}U.weight",
    f"{_R20}U.bias",
    f"{_R20}A.weight",
    f"{_R20}B.weight",
    "Wout.weight",
    "Wout.bias",
)
REFERENCE_2020_CONV_KEYS = (
    f"{_R20}U.weight",
    f"{_R20}U.bias",
    f"{_R20}A.weight",
    f"{_R20}B.weight",
    f"{_R20}g",
    f"{_R20}h",
    "Wout.weight",
    "Wout.bias",
)
COMPANION_2026_KEYS = (
    "mon.core.A",
    "mon.core.S",
    "mon.core.m_raw",
    "mon.core.U",
    "mon.core.b",
    "classifier.weight",
    "classifier.bias",
)
WEIGHT_DTYPE = torch.float32
"""The dtype every imported entry must have (the classifier's parameters): nothing is cast on import."""


def detect_format(state_dict: Mapping[str, Any]) -> str | None:
    """``"reference2020conv"``, ``"reference2020"``, ``"companion2026"`` or ``None`` (by the keys)."""
    if all(k in state_dict for k in REFERENCE_2020_CONV_KEYS):
        return "reference2020conv"
    if all(k in state_dict for k in REFERENCE_2020_KEYS):
        return "reference2020"
    if all(k in state_dict for k in COMPANION_2026_KEYS):
        return "companion2026"
    return None


def _check_keys(sd: Mapping[str, Tensor], keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not a {fmt} MonDEQ checkpoint: missing {', '.join(missing[:3])}")
    extra = sorted(set(sd) - set(keys))
    if extra:
        raise CheckpointError(f"{fmt} MonDEQ checkpoint has unexpected entries: {', '.join(extra[:3])}")
    for k in keys:
        if sd[k].dtype != WEIGHT_DTYPE:
            raise CheckpointError(
                f"{fmt} checkpoint entry {k} is {str(sd[k].dtype).removeprefix('torch.')}, expected "
                f"{str(WEIGHT_DTYPE).removeprefix('torch.')} (refusing to cast)"
            )
        if not bool(torch.isfinite(sd[k]).all()):
            n_bad = int((~torch.isfinite(sd[k])).sum())
            raise CheckpointError(f"{fmt} checkpoint entry {k} has {n_bad} non-finite value(s) (NaN or inf)")


def _shape(sd: Mapping[str, Tensor], key: str, expected: tuple[int | None, ...], fmt: str) -> tuple[int, ...]:
    shape = tuple(sd[key].shape)
    ok = len(shape) == len(expected)
    ok = ok and all(e is None or e == s for e, s in zip(expected, shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise CheckpointError(f"{fmt} checkpoint entry {key} has shape {shape}, expected {want}")
    return shape


def _fill(
    model: MonDEQClassifier, A: Tensor, B: Tensor, U: Tensor, b: Tensor, Wh: Tensor, bh: Tensor
) -> None:
    core = model.core
    assert isinstance(core, MonotoneLinear)  # the importers build fully connected MonDEQs
    with torch.no_grad():
        for p, t in (
            (core.A, A),
            (core.B, B),
            (core.U, U),
            (core.b, b),
            (model.head.weight, Wh),
            (model.head.bias, bh),
        ):
            if t.dtype != p.dtype:  # _check_keys refused it already; never cast silently
                raise CheckpointError(f"checkpoint tensor is {t.dtype}, the model stores {p.dtype}")
            p.copy_(t)


def load_reference_2020(source: Source, m: float = 1.0, **kwargs: Any) -> MonDEQClassifier:
    """A :class:`MonDEQClassifier` from a Winston & Kolter (2020) ``SingleFcNet`` checkpoint.

    ``m`` is the fixed monotonicity parameter the checkpoint was trained with (that code's
    constructor argument; its default was 1.0). ``kwargs`` go to :class:`MonDEQClassifier` (solver,
    ``alpha``, ``tol``, ``max_iter``, ``spec``, ...).
    """
    fmt = "reference 2020"
    sd = read_state_dict(source)
    _check_keys(sd, REFERENCE_2020_KEYS, fmt)
    n, d = _shape(sd, f"{_R20}U.weight", (None, None), fmt)
    _shape(sd, f"{_R20}U.bias", (n,), fmt)
    r, _ = _shape(sd, f"{_R20}A.weight", (None, n), fmt)
    _shape(sd, f"{_R20}B.weight", (n, n), fmt)
    C, _ = _shape(sd, "Wout.weight", (None, n), fmt)
    _shape(sd, "Wout.bias", (C,), fmt)
    model = MonDEQClassifier(d, n, C, r=r, m=m, learn_m=False, **kwargs)
    _fill(
        model,
        sd[f"{_R20}A.weight"],
        sd[f"{_R20}B.weight"],
        sd[f"{_R20}U.weight"],
        sd[f"{_R20}U.bias"],
        sd["Wout.weight"],
        sd["Wout.bias"],
    )
    return model


def load_companion_2026(source: Source, learn_m: bool = True, **kwargs: Any) -> MonDEQClassifier:
    """A :class:`MonDEQClassifier` from a companion-code (2026) checkpoint (``S`` -> ``B``).

    ``m = softplus(m_raw) + 1e-4``; with ``learn_m`` (default) ``m_raw`` is loaded as the learnable
    parameter, otherwise ``m`` is fixed at that value. ``kwargs`` go to :class:`MonDEQClassifier`.
    """
    fmt = "companion 2026"
    sd = read_state_dict(source)
    _check_keys(sd, COMPANION_2026_KEYS, fmt)
    r, n = _shape(sd, "mon.core.A", (None, None), fmt)
    _shape(sd, "mon.core.S", (n, n), fmt)
    if sd["mon.core.m_raw"].numel() != 1:
        raise CheckpointError(
            f"{fmt} checkpoint entry mon.core.m_raw has shape "
            f"{tuple(sd['mon.core.m_raw'].shape)}, expected a scalar"
        )
    _, d = _shape(sd, "mon.core.U", (n, None), fmt)
    _shape(sd, "mon.core.b", (n,), fmt)
    C, _ = _shape(sd, "classifier.weight", (None, n), fmt)
    _shape(sd, "classifier.bias", (C,), fmt)
    m_raw = sd["mon.core.m_raw"].reshape(())
    m = float(F.softplus(m_raw.double()) + M_EPS)
    model = MonDEQClassifier(d, n, C, r=r, m=m, learn_m=learn_m, **kwargs)
    if learn_m:
        with torch.no_grad():
            model.core.m_raw.copy_(m_raw)
    _fill(
        model,
        sd["mon.core.A"],
        sd["mon.core.S"],
        sd["mon.core.U"],
        sd["mon.core.b"],
        sd["classifier.weight"],
        sd["classifier.bias"],
    )
    return model


def load_mondeq_checkpoint(source: Source, m: float = 1.0, **kwargs: Any) -> MonDEQClassifier:
    """Load either format, detected by its keys (``m`` is used for the 2020 format only)."""
    sd = read_state_dict(source)
    fmt = detect_format(sd)
    if fmt == "reference2020conv":
        raise CheckpointError("a 2020 conv MonDEQ checkpoint: load it with load_reference_2020_conv")
    if fmt == "reference2020":
        return load_reference_2020(sd, m=m, **kwargs)
    if fmt == "companion2026":
        return load_companion_2026(sd, **kwargs)
    raise CheckpointError(
        f"not a MonDEQ checkpoint of a known format (keys: {', '.join(sorted(sd)[:4]) or 'none'})"
    )


@dataclass
class Reference2020Conv:
    """An imported 2020 ``SingleConvNet``.

    ``model``: a conv :class:`MonDEQClassifier` (``pool = 4`` as that code) whose core has the
    checkpoint's operator and injection (exact) and whose head is the checkpoint's ``Wout``. It takes the
    inputs already padded to the state grid (the 2020 net zero-pads 28 x 28 to 30 x 30 itself).
    ``border``: width of the border that the 2020 ``MONBorderReLU`` zeroes, which ``model`` does not.
    """

    model: MonDEQClassifier
    border: int = 1

    @property
    def core(self) -> MonotoneConv:
        core = self.model.core
        assert isinstance(core, MonotoneConv)
        return core

    @property
    def head(self) -> nn.Module:
        return self.model.head


def load_reference_2020_conv(
    source: Source, image_size: int | tuple[int, int] = 30, m: float = 1.0, **kwargs: Any
) -> Reference2020Conv:
    """A Winston & Kolter (2020) ``MONSingleConv`` checkpoint as a :class:`MonotoneConv` (+ head).

    ``image_size`` is the state grid (``SingleConvNet`` pads 28 x 28 inputs to 30 x 30); ``m`` the
    constructor argument of that code (not stored). Weight normalisation is folded in:
    ``A = sqrt(g) A / ||A||_F``, ``B = h B / ||B||_F`` (module docstring). ``kwargs`` go to
    :class:`MonDEQClassifier` (solver options; the weights stay float32).
    """
    fmt = "reference 2020 conv"
    sd = read_state_dict(source)
    _check_keys(sd, REFERENCE_2020_CONV_KEYS, fmt)
    C, C_in, k, _ = _shape(sd, f"{_R20}U.weight", (None, None, None, None), fmt)
    if k % 2 == 0 or sd[f"{_R20}U.weight"].shape[3] != k:
        raise CheckpointError(
            f"{fmt} checkpoint has a {k} x {sd[f'{_R20}U.weight'].shape[3]} kernel; "
            "only square odd kernels are supported"
        )
    _shape(sd, f"{_R20}U.bias", (C,), fmt)
    _shape(sd, f"{_R20}A.weight", (C, C, k, k), fmt)
    _shape(sd, f"{_R20}B.weight", (C, C, k, k), fmt)
    for key in (f"{_R20}g", f"{_R20}h"):
        if sd[key].numel() != 1:
            raise CheckpointError(
                f"{fmt} checkpoint entry {key} has shape {tuple(sd[key].shape)}, expected a scalar"
            )
    g, h = sd[f"{_R20}g"].reshape(()), sd[f"{_R20}h"].reshape(())
    if float(g) < 0:
        raise CheckpointError(
            f"{fmt} checkpoint has g = {float(g):.4g} < 0: W = (1 - m) I - g A^T A + ... "
            "is not monotone by construction"
        )
    A, B = sd[f"{_R20}A.weight"], sd[f"{_R20}B.weight"]
    for key, t in ((f"{_R20}A.weight", A), (f"{_R20}B.weight", B)):
        if float(t.norm()) == 0:
            raise CheckpointError(f"{fmt} checkpoint entry {key} is all zeros (its weight norm divides by 0)")
    A_eff = torch.sqrt(g) * A / A.norm()
    B_eff = h * B / B.norm()
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    pool = 4
    Cout, _ = _shape(sd, "Wout.weight", (None, C * (H // pool) * (W // pool)), fmt)
    _shape(sd, "Wout.bias", (Cout,), fmt)
    core = MonotoneConv(C_in, C, (H, W), k, m=m, learn_m=False)
    model = MonDEQClassifier(
        num_classes=Cout,
        in_shape=(C_in, H, W),
        conv_channels=[C],
        kernel_size=k,
        pool=pool,
        core=core,
        **kwargs,
    )
    head = model.head
    with torch.no_grad():
        pairs = (
            (core.A[0], A_eff),
            (core.B[0], B_eff),
            (core.U, sd[f"{_R20}U.weight"]),
            (core.b, sd[f"{_R20}U.bias"]),
            (head.weight, sd["Wout.weight"]),
            (head.bias, sd["Wout.bias"]),
        )
        for p, t in pairs:
            if t.dtype != p.dtype:
                raise CheckpointError(f"checkpoint tensor is {t.dtype}, the model stores {p.dtype}")
            p.copy_(t)
    return Reference2020Conv(model)
