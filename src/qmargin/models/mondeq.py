"""The ``mondeq`` entry of the model registry: a fully connected MonDEQ classifier (qmargin.deq).

``model_kwargs``: ``n`` (hidden width, 100), ``r`` (rows of A, default n), ``m`` (initial
monotonicity parameter), ``learn_m`` (True), ``solver`` ("pr"), ``tol``, ``max_iter``, and
``certify`` (margin-aware QAT: adds ``penalty_weight * relu(||dW||_2 + delta - mu(W))`` to the loss
through ``auxiliary_loss``; see :mod:`qmargin.deq.qat`). With ``certify`` the default initial m is
1.0 (a larger margin to spend on quantization; above 1 the diagonal of W grows and enlarges the
quantization step), else 0.2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qmargin.deq import MonDEQClassifier, MonotoneLinear
from qmargin.deq.qat import certified_margin_penalty
from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec

__all__ = ["MonDEQNet", "build_mondeq"]


class MonDEQNet(MonDEQClassifier):
    """A :class:`~qmargin.deq.MonDEQClassifier` with the margin-aware QAT objective as ``auxiliary_loss``."""

    def __init__(
        self, *args: Any, certify: bool = False, penalty_weight: float = 10.0, delta: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.certify = bool(certify)
        self.penalty_weight = float(penalty_weight)
        self.delta = float(delta)

    def auxiliary_loss(self) -> Tensor:
        """``penalty_weight * relu(||dW||_2 + delta - mu(W))`` with ``certify``, else 0."""
        spec = self.core.quant_specs.get("W")
        if not self.certify or spec is None or not self.training:
            return self.head.weight.new_zeros(())
        W = self.core.assemble_W()
        return self.penalty_weight * certified_margin_penalty(W, spec, delta=self.delta)


def build_mondeq(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    n: int = 100,
    r: int | None = None,
    m: float | None = None,
    learn_m: bool = True,
    solver: str = "pr",
    tol: float = 1e-4,
    max_iter: int = 300,
    certify: bool = False,
    penalty_weight: float = 10.0,
    delta: float = 0.05,
) -> MonDEQNet:
    if certify and spec is None:
        raise ConfigError("--certify (margin-aware QAT) needs a quantized MonDEQ: set --bits to 1..8")
    for name, value in (("n", n), ("r", r), ("max_iter", max_iter)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"MonDEQ {name} must be an integer >= 1, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < float("inf"):
        raise ConfigError(f"MonDEQ tol must be a finite number > 0, got {tol!r}")
    if solver not in ("pr", "fb", "dr"):
        raise ConfigError(f"MonDEQ solver must be pr, fb or dr, got {solver!r}")
    if m is None:
        m = 1.0 if certify else 0.2
    d = int(torch.Size(tuple(input_shape)).numel())
    # The bias b is one vector: it gets one scale (a per-channel scale per element would store it exactly).
    b_spec = (
        bias_spec
        if bias_spec is not None
        else (None if spec is None else QuantSpec(spec.bits, symmetric=spec.symmetric, w_max=spec.w_max))
    )
    core = MonotoneLinear(d, n, r, float(m), learn_m, spec, b_spec)
    return MonDEQNet(
        d,
        n,
        num_classes,
        r=r,
        m=float(m),
        learn_m=learn_m,
        solver=solver,
        tol=tol,
        max_iter=max_iter,
        spec=spec,
        core=core,
        certify=certify,
        penalty_weight=penalty_weight,
        delta=delta,
    )
