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

A file is read by :func:`qmargin.weights.read_state_dict` (``torch.load(path, map_location="cpu",
weights_only=True)``, or safetensors): no arbitrary pickled objects are ever executed. Anything that
is not a dict of tensors with the expected keys and consistent shapes, or whose entries are not
finite ``float32`` tensors (no silent casts), raises :class:`qmargin.errors.CheckpointError` (one
line). A top-level wrapper
``{"state_dict": {...}}`` (or ``"model_state_dict"``, ``"model"``) is unwrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qmargin.deq.classifier import MonDEQClassifier
from qmargin.deq.monotone import M_EPS, MonotoneLinear
from qmargin.errors import CheckpointError
from qmargin.weights import Source, read_state_dict

__all__ = [
    "REFERENCE_2020_KEYS",
    "COMPANION_2026_KEYS",
    "read_state_dict",
    "detect_format",
    "load_reference_2020",
    "load_companion_2026",
    "load_mondeq_checkpoint",
]

_R20 = "mon.linear_module."
REFERENCE_2020_KEYS = (
    f"{_R20}U.weight", f"{_R20}U.bias", f"{_R20}A.weight", f"{_R20}B.weight", "Wout.weight", "Wout.bias",
)
COMPANION_2026_KEYS = (
    "mon.core.A", "mon.core.S", "mon.core.m_raw", "mon.core.U", "mon.core.b",
    "classifier.weight", "classifier.bias",
)
WEIGHT_DTYPE = torch.float32
"""The dtype every imported entry must have (the classifier's parameters): nothing is cast on import."""


def detect_format(state_dict: Mapping[str, Any]) -> str | None:
    """``"reference2020"``, ``"companion2026"`` or ``None`` (by the presence of all expected keys)."""
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
        for p, t in ((core.A, A), (core.B, B), (core.U, U), (core.b, b), (model.head.weight, Wh),
                     (model.head.bias, bh)):
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
    _fill(model, sd[f"{_R20}A.weight"], sd[f"{_R20}B.weight"], sd[f"{_R20}U.weight"], sd[f"{_R20}U.bias"],
          sd["Wout.weight"], sd["Wout.bias"])
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
        raise CheckpointError(f"{fmt} checkpoint entry mon.core.m_raw has shape "
                              f"{tuple(sd['mon.core.m_raw'].shape)}, expected a scalar")
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
    _fill(model, sd["mon.core.A"], sd["mon.core.S"], sd["mon.core.U"], sd["mon.core.b"],
          sd["classifier.weight"], sd["classifier.bias"])
    return model


def load_mondeq_checkpoint(source: Source, m: float = 1.0, **kwargs: Any) -> MonDEQClassifier:
    """Load either format, detected by its keys (``m`` is used for the 2020 format only)."""
    sd = read_state_dict(source)
    fmt = detect_format(sd)
    if fmt == "reference2020":
        return load_reference_2020(sd, m=m, **kwargs)
    if fmt == "companion2026":
        return load_companion_2026(sd, **kwargs)
    raise CheckpointError(
        f"not a MonDEQ checkpoint of a known format (keys: {', '.join(sorted(sd)[:4]) or 'none'})"
    )
