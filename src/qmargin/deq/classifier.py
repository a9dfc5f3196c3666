"""``MonDEQClassifier``: a MonDEQ layer followed by a linear head, producing logits.

Works with any training loop (``loss(model(x), y).backward()``): the layer's implicit backward
supplies the gradients. ``model.solver_stats`` is the last forward solve's
:class:`~qmargin.deq.solvers.SolverStats`, ``model.backward_stats`` the last adjoint solve's and
``model.converged`` the per-sample convergence of the last forward (a non-converged sample in
evaluation is recorded there, never hidden).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmargin.deq.layer import MonDEQLayer
from qmargin.deq.monotone import MonotoneConv, MonotoneLinear, MonotoneMultiConv, MonotoneParameterization
from qmargin.deq.solvers import SolverStats
from qmargin.quant import QuantLinear, QuantSpec

__all__ = ["MonDEQClassifier"]


class MonDEQClassifier(nn.Module):
    """Logits ``head(features(z*))`` with ``z* = relu(W z* + U x + b)``.

    Fully connected (default): ``in_features`` (inputs are flattened), hidden width ``n``, ``A`` with
    ``r`` rows. Convolutional: give ``in_shape = (C_in, H, W)`` and ``conv_channels`` (one entry:
    :class:`MonotoneConv`; several: :class:`MonotoneMultiConv` tiers); the head then reads the last
    tier, average-pooled by ``pool`` and flattened (Winston & Kolter pool by 4).

    Args:
        in_features: input dimension ``d`` of the FC form (or give ``in_shape``).
        n: hidden width (FC).
        num_classes: logits per sample.
        in_shape: input shape without batch; required for the conv forms.
        r: rows of ``A`` (FC; default ``n``).
        m: monotonicity parameter (initial value when ``learn_m``).
        learn_m: learn ``m = softplus(m_raw) + 1e-4``.
        solver, alpha, tol, max_iter, check_every, on_failure, accelerator, warm_start: see
            :class:`MonDEQLayer` (defaults: the plain splitting, cold starts).
        spec: quantizer of ``W``, ``U`` (and ``b`` if ``quantize_bias``) and of the head's weight
            (if ``quantize_head``); ``None`` keeps everything float.
        conv_channels, kernel_size, pool: conv forms.
        core: use this parameterization instead of building one.
    """

    def __init__(
        self,
        in_features: int | None = None,
        n: int = 100,
        num_classes: int = 10,
        *,
        in_shape: Sequence[int] | None = None,
        r: int | None = None,
        m: float = 1.0,
        learn_m: bool = False,
        solver: str = "pr",
        alpha: float | str | None = None,
        tol: float = 1e-4,
        max_iter: int = 300,
        check_every: int = 5,
        on_failure: str = "record",
        spec: QuantSpec | None = None,
        quantize_bias: bool = True,
        quantize_head: bool = True,
        conv_channels: Sequence[int] | None = None,
        kernel_size: int = 3,
        pool: int = 1,
        core: MonotoneParameterization | None = None,
        accelerator: str = "none",
        warm_start: bool = False,
    ) -> None:
        super().__init__()
        bias_spec = spec if quantize_bias else None
        if core is None:
            if conv_channels:
                if in_shape is None or len(in_shape) != 3:
                    raise ValueError("the convolutional MonDEQ needs in_shape = (C_in, H, W)")
                cin, H, W = (int(s) for s in in_shape)
                args = (kernel_size, m, learn_m, spec, bias_spec)
                if len(conv_channels) == 1:
                    core = MonotoneConv(cin, int(conv_channels[0]), (H, W), *args)
                else:
                    core = MonotoneMultiConv(cin, conv_channels, (H, W), *args)
            else:
                if in_features is None:
                    if in_shape is None:
                        raise ValueError("give in_features (or in_shape) of the MonDEQ classifier")
                    in_features = int(torch.Size(in_shape).numel())
                core = MonotoneLinear(in_features, n, r, m, learn_m, spec, bias_spec)
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.pool = int(pool)
        self.mon = MonDEQLayer(
            core,
            solver,
            alpha,
            tol,
            max_iter,
            check_every,
            on_failure=on_failure,
            accelerator=accelerator,
            warm_start=warm_start,
        )
        feat = self._feature_dim(core)
        if spec is not None and quantize_head:
            self.head: nn.Linear = QuantLinear(feat, num_classes, spec=spec)
        else:
            self.head = nn.Linear(feat, num_classes)
        self.num_classes = num_classes

    def _feature_dim(self, core: MonotoneParameterization) -> int:
        if isinstance(core, MonotoneMultiConv):
            T = len(core.channels)
            h, w = core.image_size[0] // 2 ** (T - 1), core.image_size[1] // 2 ** (T - 1)
            return core.channels[-1] * (h // self.pool) * (w // self.pool)
        return int(torch.Size(core.state_shape).numel())

    @property
    def core(self) -> MonotoneParameterization:
        return self.mon.core

    def features(self, z: Tensor | tuple[Tensor, ...]) -> Tensor:
        """Head input from the layer output: FC ``z*``; conv: last tier, average-pooled and flattened."""
        if isinstance(z, tuple):
            z = z[-1]
        if z.dim() == 4 and self.pool > 1:
            z = F.avg_pool2d(z, self.pool)
        return z.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.mon(x)))

    @property
    def solver_stats(self) -> SolverStats | None:
        """Stats of the last forward solve."""
        return self.mon.last_forward_stats

    @property
    def backward_stats(self) -> SolverStats | None:
        """Stats of the last adjoint (backward) solve."""
        return self.mon.last_backward_stats

    @property
    def converged(self) -> Tensor | None:
        """Per-sample ``bool`` convergence of the last forward (``None`` before the first)."""
        s = self.mon.last_forward_stats
        return None if s is None else s.sample_converged
