"""The MonDEQ entries of the model registry (qmargin.deq): ``mondeq``, ``mondeq-conv``, ``mondeq-multitier``.

* ``mondeq``: fully connected (:class:`~qmargin.deq.MonotoneLinear`); ``--hidden N`` is the width ``n``.
* ``mondeq-conv``: one circular convolution (:class:`~qmargin.deq.MonotoneConv`, Winston & Kolter's
  MONSingleConv); ``--hidden N`` is the number of channels ``C`` of the state ``(C, H, W)``.
* ``mondeq-multitier``: ``tiers`` resolutions (:class:`~qmargin.deq.MonotoneMultiConv`,
  MONMultiConv); ``--hidden N`` gives every tier ``N`` channels (``channels`` may also be a list).

The convolutional heads read the last tier average-pooled by ``pool`` (default 4 where the grid
allows it, as Winston & Kolter). What is quantized (and what bit errors hit) is the assembled ``W``
(the ``(2k - 1) x (2k - 1)`` kernel, or the polyphase kernel of the multi-tier form), ``U`` and ``b``.

FC ``model_kwargs``: ``n`` (hidden width, 100), ``r`` (rows of A, default n), ``m`` (initial
monotonicity parameter), ``learn_m`` (True), ``solver`` ("pr"), ``tol``, ``max_iter``, and
``certify`` (margin-aware QAT: adds ``penalty_weight * relu(||dW||_2 + delta - mu(W))`` to the loss
through ``auxiliary_loss``; see :mod:`qmargin.deq.qat`). With ``certify`` the default initial m is
1.0 (a larger margin to spend on quantization; above 1 the diagonal of W grows and enlarges the
quantization step), else 0.2. The convolutional forms take the same options (``n``/``r`` replaced
by ``channels``, ``kernel_size``, ``pool`` and, multi-tier, ``tiers``) plus ``accelerator``
(``"none"`` | ``"anderson"``) and ``alpha`` (a step, or ``"auto"``); their certified objective uses the
exact per-frequency ``||dW||_2`` and ``mu(W)`` of the circular convolution
(:func:`qmargin.deq.qat.certified_quantities`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qmargin.deq import MonDEQClassifier, MonotoneConv, MonotoneLinear, MonotoneMultiConv
from qmargin.deq.qat import certified_margin_penalty, certified_quantities
from qmargin.deq.solvers import ACCELERATORS, SPLITTINGS
from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec

__all__ = ["MonDEQNet", "build_mondeq", "build_mondeq_conv", "build_mondeq_multitier", "default_pool"]


class MonDEQNet(MonDEQClassifier):
    """A :class:`~qmargin.deq.MonDEQClassifier` with the margin-aware QAT objective as ``auxiliary_loss``."""

    def __init__(
        self,
        *args: Any,
        certify: bool = False,
        penalty_weight: float = 10.0,
        delta: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.certify = bool(certify)
        self.penalty_weight = float(penalty_weight)
        self.delta = float(delta)

    @property
    def grid(self) -> tuple[int, int] | None:
        """The grid of the circular convolution ``W`` (``None``: fully connected)."""
        core = self.core
        return core.grid if isinstance(core, MonotoneMultiConv) else None

    def auxiliary_loss(self) -> Tensor:
        """``penalty_weight * relu(||dW||_2 + delta - mu(W))`` with ``certify``, else 0.

        Exact per frequency for the convolutional forms (:func:`qmargin.deq.qat.certified_margin_penalty`
        with the grid of ``W``).
        """
        spec = self.core.quant_specs.get("W")
        if not self.certify or spec is None or not self.training:
            return self.head.weight.new_zeros(())
        W = self.core.assemble_W()
        return self.penalty_weight * certified_margin_penalty(W, spec, delta=self.delta, grid=self.grid)

    def certified_quantities(self) -> tuple[float, float] | None:
        """``(||dW||_2, mu(W))`` of the stored ``W`` now (``None`` for a float model), no gradient."""
        spec = self.core.quant_specs.get("W")
        if spec is None:
            return None
        with torch.no_grad():
            dw, mu = certified_quantities(self.core.float_tensor("W").detach().double(), spec, grid=self.grid)
        return float(dw), float(mu)


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
    _check_solver(solver)
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


def _check_solver(solver: object, accelerator: object = "none", alpha: object = None) -> None:
    if not isinstance(solver, str) or solver not in SPLITTINGS:
        raise ConfigError(f"MonDEQ solver must be one of {', '.join(sorted(SPLITTINGS))}, got {solver!r}")
    if not isinstance(accelerator, str) or accelerator not in ACCELERATORS:
        raise ConfigError(
            f"MonDEQ accelerator must be one of {', '.join(sorted(ACCELERATORS))}, got {accelerator!r}"
        )
    if (
        alpha is not None
        and alpha != "auto"
        and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"))
    ):
        raise ConfigError(f"MonDEQ alpha must be a finite number > 0 or 'auto', got {alpha!r}")


def _check_common(tol: object, max_iter: object, kernel_size: object) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"MonDEQ max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < float("inf"):
        raise ConfigError(f"MonDEQ tol must be a finite number > 0, got {tol!r}")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ConfigError(f"MonDEQ kernel_size must be an odd integer >= 1, got {kernel_size!r}")


def default_pool(coarse: tuple[int, int]) -> int:
    """Head pooling on the ``coarse`` grid: 4 where it divides it (Winston & Kolter), else 2, else 1."""
    for pool in (4, 2):
        if coarse[0] % pool == 0 and coarse[1] % pool == 0:
            return pool
    return 1


def _conv_net(
    channels: list[int],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None,
    kernel_size: int,
    pool: int | None,
    m: float | None,
    learn_m: bool,
    solver: str,
    alpha: float | str | None,
    accelerator: str,
    tol: float,
    max_iter: int,
    certify: bool,
    penalty_weight: float,
    delta: float,
) -> MonDEQNet:
    if certify and spec is None:
        raise ConfigError("--certify (margin-aware QAT) needs a quantized MonDEQ: set --bits to 1..8")
    _check_common(tol, max_iter, kernel_size)
    _check_solver(solver, accelerator, alpha)
    if len(input_shape) != 3:
        raise ConfigError(
            f"a convolutional MonDEQ needs image inputs (C, H, W), got shape {tuple(input_shape)}"
        )
    cin, H, W = (int(s) for s in input_shape)
    T = len(channels)
    if H % 2 ** (T - 1) or W % 2 ** (T - 1):
        raise ConfigError(f"images of {H}x{W} cannot hold {T} tiers (the size must divide by {2 ** (T - 1)})")
    coarse = (H // 2 ** (T - 1), W // 2 ** (T - 1))
    if pool is None:
        pool = default_pool(coarse)
    if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= min(coarse):
        raise ConfigError(
            f"MonDEQ pool must be an integer in 1..{min(coarse)} for a {coarse} grid, got {pool!r}"
        )
    if m is None:
        m = 1.0 if certify else 0.2
    b_spec = (
        bias_spec
        if bias_spec is not None
        else (None if spec is None else QuantSpec(spec.bits, symmetric=spec.symmetric, w_max=spec.w_max))
    )
    core: MonotoneMultiConv
    if T == 1:
        core = MonotoneConv(cin, channels[0], (H, W), kernel_size, float(m), learn_m, spec, b_spec)
    else:
        core = MonotoneMultiConv(cin, channels, (H, W), kernel_size, float(m), learn_m, spec, b_spec)
    return MonDEQNet(
        num_classes=num_classes,
        in_shape=(cin, H, W),
        m=float(m),
        learn_m=learn_m,
        solver=solver,
        alpha=alpha,
        accelerator=accelerator,
        tol=tol,
        max_iter=max_iter,
        spec=spec,
        pool=pool,
        core=core,
        certify=certify,
        penalty_weight=penalty_weight,
        delta=delta,
    )


def _channel(value: object, name: str = "channels") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ConfigError(f"MonDEQ {name} must be an integer in 1..4096, got {value!r}")
    return value


def build_mondeq_conv(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    channels: int = 16,
    kernel_size: int = 3,
    pool: int | None = None,
    m: float | None = None,
    learn_m: bool = True,
    solver: str = "pr",
    alpha: float | str | None = None,
    accelerator: str = "none",
    tol: float = 1e-4,
    max_iter: int = 300,
    certify: bool = False,
    penalty_weight: float = 10.0,
    delta: float = 0.05,
) -> MonDEQNet:
    """Single-convolution MonDEQ classifier (``mondeq-conv``): ``channels`` state channels, circular."""
    return _conv_net(
        [_channel(channels)],
        input_shape=input_shape,
        num_classes=num_classes,
        spec=spec,
        bias_spec=bias_spec,
        kernel_size=kernel_size,
        pool=pool,
        m=m,
        learn_m=learn_m,
        solver=solver,
        alpha=alpha,
        accelerator=accelerator,
        tol=tol,
        max_iter=max_iter,
        certify=certify,
        penalty_weight=penalty_weight,
        delta=delta,
    )


def build_mondeq_multitier(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    channels: int | Sequence[int] = 16,
    tiers: int = 2,
    kernel_size: int = 3,
    pool: int | None = None,
    m: float | None = None,
    learn_m: bool = True,
    solver: str = "pr",
    alpha: float | str | None = None,
    accelerator: str = "none",
    tol: float = 1e-4,
    max_iter: int = 300,
    certify: bool = False,
    penalty_weight: float = 10.0,
    delta: float = 0.05,
) -> MonDEQNet:
    """Multi-tier MonDEQ classifier (``mondeq-multitier``): tier ``t`` at ``H / 2^t``.

    ``channels``: one int (every tier; ``tiers`` of them) or the list ``(C_0, ..., C_{T-1})`` (then
    ``tiers`` must be left at its default or agree).
    """
    if isinstance(tiers, bool) or not isinstance(tiers, int) or not 2 <= tiers <= 6:
        raise ConfigError(f"MonDEQ tiers must be an integer in 2..6, got {tiers!r}")
    if isinstance(channels, list | tuple):
        chans = [_channel(c) for c in channels]
        if len(chans) < 2:
            raise ConfigError(f"a multi-tier MonDEQ needs >= 2 tiers of channels, got {list(channels)}")
        if tiers != 2 and tiers != len(chans):
            raise ConfigError(f"tiers={tiers} disagrees with the {len(chans)} entries of channels")
    else:
        chans = [_channel(channels)] * tiers
    return _conv_net(
        chans,
        input_shape=input_shape,
        num_classes=num_classes,
        spec=spec,
        bias_spec=bias_spec,
        kernel_size=kernel_size,
        pool=pool,
        m=m,
        learn_m=learn_m,
        solver=solver,
        alpha=alpha,
        accelerator=accelerator,
        tol=tol,
        max_iter=max_iter,
        certify=certify,
        penalty_weight=penalty_weight,
        delta=delta,
    )
