"""Monotone parameterizations of ``W`` (Winston & Kolter, NeurIPS 2020; design.md §5).

Every parameterization is an ``nn.Module`` and a :class:`qmargin.quant.QuantizedTensors`. The tensors
it stores (and that quantization and bit errors hit) are:

* ``"W"``: the **assembled** operator ``W = (1 - m) I - A^T A + B - B^T``: the ``(n, n)`` matrix (fully
  connected) or the assembled kernel of the convolution ``W`` (see below). It has no single parameter
  behind it: ``float_tensor("W")`` assembles it from ``A, B, m`` (differentiably, so fake quantization
  with the straight-through estimator trains ``A, B, m``). ``set_float_tensor("W", value)`` (used by
  :meth:`load_stored`) installs ``value`` as an override of the assembly until :meth:`unfreeze`.
* ``"U"``: the input map (matrix or kernel);
* ``"b"`` (optional): the bias of the injection ``v = U x + b``.

``quant_specs`` is empty (float) unless a ``spec`` is given (``spec`` for ``W`` and ``U``, ``bias_spec``
for ``b``). Training fake-quantizes; once frozen the forward pass uses the stored integer codes.

Since ``sym(I - W) = m I + A^T A >= m I``, every float ``W`` here has ``mu(W) >= m > 0``.

Convolutional forms (circular padding everywhere):

* :class:`MonotoneConv`: ``A``, ``B`` are ``C x C x k x k`` kernels; as operators
  ``W = (1 - m) I - A^T A + B - B^T`` is the circular convolution with the assembled kernel
  ``K_W = (1 - m) delta - A^T * A + B - B^T`` of size ``(2k - 1) x (2k - 1)`` (``A^T * A`` is the
  composition of the two convolutions; ``B^T`` the transposed, flipped kernel). ``K_W`` is what is
  quantized.
* :class:`MonotoneMultiConv` (as Winston & Kolter's MONMultiConv): tiers ``t = 0..T-1`` at resolution
  ``H / 2^t`` with ``C_t`` channels; ``(A z)_t = A_t z_t + D_t z_{t-1}`` (``D_t`` a stride-2 conv from
  tier ``t-1``), ``B`` block-diagonal (``B_t`` per tier), ``U`` maps the input to tier 0 and ``b`` holds
  one bias per channel of every tier. ``W`` is shift-invariant only on the coarsest grid, so the state is
  kept in polyphase form (tier ``t`` space-to-depth'ed by ``2^(T-1-t)``): ``c = sum_t C_t 4^(T-1-t)``
  channels on the ``(H / 2^(T-1))``-grid, on which ``W`` *is* one circular convolution. Its kernel
  ``(c, c, kc, kc)`` (``kc = 2 rc + 1``, ``rc`` the exact coarse reach of ``W``) is the assembled ``W``
  that is quantized, and its per-frequency blocks are ``c x c``: the 4 aliased fine frequencies of each
  halving are coupled exactly. For ``T = 1`` this is exactly the ``MonotoneConv`` kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmargin.deq.operators import (
    ConvOperator,
    DenseOperator,
    circular_conv2d,
    circular_conv2d_adjoint,
    polyphase_to_tiers,
    tiers_to_polyphase,
)
from qmargin.errors import ConfigError
from qmargin.quant import QuantizedTensors, QuantSpec

__all__ = [
    "M_EPS",
    "check_m",
    "softplus_inverse",
    "MonotoneParameterization",
    "MonotoneLinear",
    "MonotoneMultiConv",
    "MonotoneConv",
    "assemble_fc_W",
]

M_EPS = 1e-4
"""``m = softplus(m_raw) + M_EPS`` for a learnable ``m``."""


def check_m(m: object) -> float:
    """``m`` as a float if it is a finite number ``> 0``, else :class:`~qmargin.errors.ConfigError`.

    (``mu(W) >= m`` is the whole point of the parameterization: ``m = inf`` gives ``W = -inf I``,
    ``m <= 0`` or NaN no monotone operator.)
    """
    try:
        value = float(m)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"the monotonicity parameter m must be a number > 0, got {m!r}") from None
    if isinstance(m, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"the monotonicity parameter m must be a finite number > 0, got {m!r}")
    return value


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    if not y > 0:
        raise ValueError(f"softplus_inverse needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


def assemble_fc_W(A: Tensor, B: Tensor, m: Tensor | float) -> Tensor:
    """``W = (1 - m) I - A^T A + B - B^T`` for ``A`` (r x n), ``B`` (n x n)."""
    n = B.shape[0]
    eye = torch.eye(n, dtype=B.dtype, device=B.device)
    return (1 - m) * eye - A.mT @ A + B - B.mT


class _Factory(TypedDict):
    """``device`` / ``dtype`` keyword arguments of the tensor factories (``torch.empty``, ...)."""

    device: torch.device | str | None
    dtype: torch.dtype


def _factory(device: torch.device | str | None, dtype: torch.dtype | None) -> _Factory:
    return {"device": device, "dtype": dtype or torch.get_default_dtype()}


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class MonotoneParameterization(QuantizedTensors):
    """Base class: ``m``, the quantized-tensor protocol for ``W``/``U``/``b``, realized operators.

    Subclasses implement :meth:`assemble_W`, :meth:`build_operator`, :meth:`injection`,
    :attr:`state_shape` and (optionally) :meth:`to_output`.
    """

    U: nn.Parameter
    b: nn.Parameter
    m_raw: nn.Parameter  # learnable m
    m_value: Tensor  # fixed m (a buffer)
    _W_override: Tensor | None

    def __init__(
        self,
        m: float,
        learn_m: bool,
        spec: QuantSpec | None,
        bias_spec: QuantSpec | None,
        factory: _Factory,
    ) -> None:
        super().__init__()
        m = check_m(m)
        self.learn_m = learn_m
        if learn_m:
            raw = softplus_inverse(m - M_EPS) if m > M_EPS else -20.0
            self.m_raw = nn.Parameter(torch.tensor(raw, **factory))
        else:
            self.register_buffer("m_value", torch.tensor(float(m), **factory))
        self.quant_specs = {}
        if spec is not None:
            self.quant_specs["W"] = spec
            self.quant_specs["U"] = spec
        if bias_spec is not None:
            self.quant_specs["b"] = bias_spec
        self.register_buffer("_W_override", None, persistent=False)

    # -- m --------------------------------------------------------------------------------------
    @property
    def m(self) -> Tensor:
        """``m`` (``softplus(m_raw) + M_EPS`` when learnable)."""
        if self.learn_m:
            return F.softplus(self.m_raw) + M_EPS
        return self.m_value

    # -- to implement ---------------------------------------------------------------------------
    def assemble_W(self) -> Tensor:
        """The float assembled ``W`` (matrix or kernel) from the factors, differentiable."""
        raise NotImplementedError

    def build_operator(self, weight: Tensor) -> DenseOperator | ConvOperator:
        """Realized operator with the given assembled ``W`` (same shape as :meth:`assemble_W`)."""
        raise NotImplementedError

    def injection(self, x: Tensor) -> Tensor:
        """``v = U x + b`` in the state's shape ``(N, *state_shape)`` (quantized ``U``/``b`` if specified)."""
        raise NotImplementedError

    @property
    def state_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def to_output(self, z: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The state in the layer's natural output form (default: unchanged)."""
        return z

    # -- quantized-tensor protocol --------------------------------------------------------------
    def float_tensor(self, name: str) -> Tensor:
        """Float ``W`` (assembled from ``A, B, m``, or its override), ``U``, ``b``."""
        if name == "W":
            return self._W_override if self._W_override is not None else self.assemble_W()
        if name in ("U", "b"):
            return getattr(self, name)
        raise KeyError(f"{type(self).__name__} has no tensor {name!r} (it stores W, U, b)")

    def set_float_tensor(self, name: str, value: Tensor) -> None:
        """``U``/``b``: copy into the parameter; ``W``: override the assembly (until :meth:`unfreeze`)."""
        if name == "W":
            # No single parameter is behind the assembled W: keep it as an override (until unfreeze).
            self._W_override = value.detach().clone()
            return
        with torch.no_grad():
            getattr(self, name).copy_(value)

    def unfreeze(self) -> None:
        """Drop the stored form and any ``W`` override: ``W`` is assembled from the factors again."""
        super().unfreeze()
        self._W_override = None

    def tensor(self, name: str) -> Tensor:
        """What the forward pass uses for ``name``: stored/fake-quantized if specified, else float."""
        if name in self.quant_specs:
            return self.quantized_tensor(name)
        return self.float_tensor(name)

    # -- operators ------------------------------------------------------------------------------
    def operator(self, quantized: bool | None = None) -> DenseOperator | ConvOperator:
        """Realized ``W``: as the forward uses it (``None``), float (``False``) or quantized (``True``)."""
        if quantized is None:
            w = self.tensor("W")
        elif quantized:
            if "W" not in self.quant_specs:
                raise ValueError("this parameterization stores W in float (no QuantSpec given)")
            w = self.quantized_tensor("W")
        else:
            w = self.float_tensor("W")
        return self.build_operator(w)

    def margin_and_norm(self, quantized: bool | None = None) -> tuple[Tensor, Tensor]:
        """Exact ``(mu(W), L(W))`` of :meth:`operator`."""
        return self.operator(quantized).margin_and_norm()

    def to_dense(self, quantized: bool | None = None) -> Tensor:
        """``W`` as a dense matrix (convolutions: on the flattened polyphase state; small sizes only)."""
        return self.operator(quantized).to_dense()

    def extra_repr(self) -> str:
        specs = ", ".join(f"{k}={v}" for k, v in self.quant_specs.items()) or "float"
        return f"state={self.state_shape}, learn_m={self.learn_m}, {specs}"


class MonotoneLinear(MonotoneParameterization):
    """Fully connected ``W = (1 - m) I - A^T A + B - B^T``, ``v = U x + b``.

    ``A`` (r x n), ``B`` (n x n), ``U`` (n x d), ``b`` (n).

    Args:
        in_features: ``d`` (inputs are flattened).
        n: hidden width (state ``(N, n)``).
        r: rows of ``A`` (default ``n``).
        m: monotonicity parameter (initial value when ``learn_m``); ``mu(W) >= m``.
        learn_m: learn ``m = softplus(m_raw) + 1e-4``.
        spec: store ``W`` and ``U`` with this quantizer (``None``: float).
        bias_spec: store ``b`` with this quantizer (``None``: float).
    """

    def __init__(
        self,
        in_features: int,
        n: int,
        r: int | None = None,
        m: float = 1.0,
        learn_m: bool = False,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = _factory(device, dtype)
        super().__init__(m, learn_m, spec, bias_spec, factory)
        r = n if r is None else r
        self.in_features, self.n, self.r = in_features, n, r
        self.A = nn.Parameter(_uniform_(torch.empty(r, n, **factory), n))
        self.B = nn.Parameter(_uniform_(torch.empty(n, n, **factory), n))
        self.U = nn.Parameter(_uniform_(torch.empty(n, in_features, **factory), in_features))
        self.b = nn.Parameter(_uniform_(torch.empty(n, **factory), in_features))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.n,)

    def assemble_W(self) -> Tensor:
        return assemble_fc_W(self.A, self.B, self.m)

    def build_operator(self, weight: Tensor) -> DenseOperator:
        return DenseOperator(weight)

    def injection(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.tensor("U"), self.tensor("b"))


class MonotoneMultiConv(MonotoneParameterization):
    """Multi-tier convolutional ``W = (1 - m) I - A^T A + B - B^T`` (circular padding), exact per frequency.

    Args:
        in_channels: input channels ``C_in``.
        channels: ``(C_0, ..., C_{T-1})``, tier ``t`` at resolution ``(H / 2^t, W / 2^t)``.
        image_size: ``H`` or ``(H, W)``, divisible by ``2^(T-1)``.
        kernel_size: odd ``k`` of ``U``, ``A_t``, ``D_t``, ``B_t``.
        m, learn_m, spec, bias_spec: as :class:`MonotoneLinear`.

    Parameters: ``U`` (``C_0 x C_in x k x k``), ``b`` (``sum_t C_t``), ``A.t`` (``C_t x C_t x k x k``),
    ``D.t`` (``C_t x C_{t-1} x k x k``, ``t >= 1``), ``B.t`` (``C_t x C_t x k x k``). The state is the
    polyphase stack ``(N, c, H_c, W_c)``; :meth:`to_output` returns the tiers.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        image_size: int | tuple[int, int],
        kernel_size: int = 3,
        m: float = 1.0,
        learn_m: bool = False,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = _factory(device, dtype)
        super().__init__(m, learn_m, spec, bias_spec, factory)
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        T = len(channels)
        if H % 2 ** (T - 1) or W % 2 ** (T - 1):
            raise ValueError(f"image size {(H, W)} is not divisible by 2^(tiers-1) = {2 ** (T - 1)}")
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.image_size = (H, W)
        self.scales = [2 ** (T - 1 - t) for t in range(T)]
        self.grid = (H // 2 ** (T - 1), W // 2 ** (T - 1))
        self.c = sum(C * s * s for C, s in zip(channels, self.scales, strict=True))
        k = kernel_size
        fan_u = in_channels * k * k
        self.U = nn.Parameter(_uniform_(torch.empty(channels[0], in_channels, k, k, **factory), fan_u))
        self.b = nn.Parameter(_uniform_(torch.empty(sum(channels), **factory), in_channels * k * k))
        self.A = nn.ParameterList(
            [nn.Parameter(_uniform_(torch.empty(C, C, k, k, **factory), C * k * k)) for C in channels]
        )
        self.D = nn.ParameterList(
            [
                nn.Parameter(
                    _uniform_(
                        torch.empty(channels[t], channels[t - 1], k, k, **factory), channels[t - 1] * k * k
                    )
                )
                for t in range(1, T)
            ]
        )
        self.B = nn.ParameterList(
            [nn.Parameter(_uniform_(torch.empty(C, C, k, k, **factory), C * k * k)) for C in channels]
        )
        self.reach = self._structural_reach()

    # -- factored operators on tiers ------------------------------------------------------------
    def _tier_hw(self, tiers: Sequence[Tensor], t: int) -> tuple[int, int]:
        return tiers[t].shape[-2], tiers[t].shape[-1]

    def apply_A(self, z: Sequence[Tensor], A=None, D=None) -> list[Tensor]:
        """``(A z)_t = A_t z_t + D_t z_{t-1}`` (circular; ``D_t`` with stride 2)."""
        A = self.A if A is None else A
        D = self.D if D is None else D
        out = [circular_conv2d(z[0], A[0])]
        for t in range(1, len(z)):
            out.append(circular_conv2d(z[t], A[t]) + circular_conv2d(z[t - 1], D[t - 1], stride=2))
        return out

    def apply_AT(self, y: Sequence[Tensor], A=None, D=None) -> list[Tensor]:
        """``(A^T y)_t = A_t^T y_t + D_{t+1}^T y_{t+1}`` (exact adjoint of :meth:`apply_A`)."""
        A = self.A if A is None else A
        D = self.D if D is None else D
        T = len(y)
        out = []
        for t in range(T):
            o = circular_conv2d_adjoint(y[t], A[t], 1, self._tier_hw(y, t))
            if t + 1 < T:
                o = o + circular_conv2d_adjoint(y[t + 1], D[t], 2, self._tier_hw(y, t))
            out.append(o)
        return out

    def apply_W_factored(self, z: Sequence[Tensor]) -> list[Tensor]:
        """``W z = (1 - m) z - A^T A z + B z - B^T z`` on tiers, from the factors (float)."""
        m = self.m
        ATAz = self.apply_AT(self.apply_A(z))
        return [
            (1 - m) * z[t]
            - ATAz[t]
            + circular_conv2d(z[t], self.B[t])
            - circular_conv2d_adjoint(z[t], self.B[t], 1, self._tier_hw(z, t))
            for t in range(len(z))
        ]

    # -- polyphase form -------------------------------------------------------------------------
    def to_polyphase(self, tiers: Sequence[Tensor]) -> Tensor:
        """Tiers -> polyphase state ``(N, c, H_c, W_c)`` (a coordinate permutation)."""
        return tiers_to_polyphase(list(tiers), self.scales)

    def to_tiers(self, z: Tensor) -> list[Tensor]:
        """Polyphase state -> tiers ``[(N, C_t, H / 2^t, W / 2^t)]``."""
        return polyphase_to_tiers(z, self.channels, self.scales)

    def _probe(self, apply_fn, reach: int, dtype: torch.dtype, device) -> Tensor:
        """Kernel ``(c, c, 2 reach + 1, 2 reach + 1)`` of a polyphase-shift-invariant map, by impulses."""
        G = 2 * reach + 1
        basis = torch.zeros(self.c, self.c, G, G, dtype=dtype, device=device)
        idx = torch.arange(self.c, device=device)
        basis[idx, idx, reach, reach] = 1
        Y = self.to_polyphase(apply_fn(self.to_tiers(basis)))
        # y[o, h, w] = K[o, j, 2 reach - h, 2 reach - w] for the impulse in channel j
        return Y.permute(1, 0, 2, 3).flip(-2, -1).contiguous()

    def _structural_reach(self) -> int:
        """Exact coarse-grid reach ``rc`` of ``W``: probe ``I + A^T A + B + B^T`` with all-ones weights."""
        r = self.kernel_size // 2
        bound = 2 * r + 2  # >= the reach of any composition of two tier convolutions, in coarse cells
        A = [torch.ones(p.shape, dtype=torch.float64, device="cpu") for p in self.A]
        D = [torch.ones(p.shape, dtype=torch.float64, device="cpu") for p in self.D]
        Bs = [torch.ones(p.shape, dtype=torch.float64, device="cpu") for p in self.B]

        def positive(z: list[Tensor]) -> list[Tensor]:
            ata = self.apply_AT(self.apply_A(z, A, D), A, D)
            return [
                z[t]
                + ata[t]
                + circular_conv2d(z[t], Bs[t])
                + circular_conv2d_adjoint(z[t], Bs[t], 1, self._tier_hw(z, t))
                for t in range(len(z))
            ]

        K = self._probe(positive, bound, torch.float64, "cpu")
        nz = K.abs().amax(dim=(0, 1)) > 0
        rows = torch.nonzero(nz.any(1)).flatten()
        cols = torch.nonzero(nz.any(0)).flatten()
        reach = int(max((rows - bound).abs().max(), (cols - bound).abs().max()))
        if reach >= bound:  # cannot happen for two composed tier convolutions; guard the bound anyway
            raise RuntimeError(f"multi-tier reach probe saturated its bound ({bound})")
        return reach

    # -- protocol -------------------------------------------------------------------------------
    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.c, *self.grid)

    def assemble_W(self) -> Tensor:
        """The polyphase kernel ``(c, c, 2 rc + 1, 2 rc + 1)`` of ``W`` (probing the factored form)."""
        return self._probe(self.apply_W_factored, self.reach, self.A[0].dtype, self.A[0].device)

    def build_operator(self, weight: Tensor) -> ConvOperator:
        return ConvOperator(weight, self.grid)

    def injection(self, x: Tensor) -> Tensor:
        """``v_0 = U * x + b_0`` (circular conv) on tier 0, ``v_t = b_t`` on the others; polyphase form."""
        return self.inject(x, self.tensor("U"), self.tensor("b"))

    def inject(self, x: Tensor, U: Tensor, b: Tensor) -> Tensor:
        """:meth:`injection` with the given ``U`` kernel and ``b`` (e.g. float and quantized, to compare)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(
                f"expected input (N, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        bs = torch.split(b, self.channels)
        tiers = [circular_conv2d(x, U) + bs[0].view(1, -1, 1, 1)]
        N = x.shape[0]
        for t in range(1, len(self.channels)):
            h, w = self.image_size[0] // 2**t, self.image_size[1] // 2**t
            tiers.append(bs[t].view(1, -1, 1, 1).expand(N, -1, h, w))
        return self.to_polyphase(tiers)

    def expanded_bias(self, b: Tensor) -> Tensor:
        """The bias over the whole state: ``b_t`` repeated over tier ``t``'s pixels, in tier order.

        A permutation of the polyphase coordinates the injection adds it to (same norm, which is
        what the certificates use).
        """
        parts = []
        for t, bt in enumerate(torch.split(b, self.channels)):
            h, w = self.image_size[0] // 2**t, self.image_size[1] // 2**t
            parts.append(bt.repeat_interleave(h * w))
        return torch.cat(parts)

    def to_output(self, z: Tensor) -> Tensor | tuple[Tensor, ...]:
        tiers = self.to_tiers(z)
        return tiers[0] if len(tiers) == 1 else tuple(tiers)

    def frequency_blocks(self, quantized: bool | None = None, half: bool = False) -> Tensor:
        """``(F, c, c)`` complex blocks of ``W`` (``F = H_c W_c``; rfft half with ``half``), see operators."""
        op = self.operator(quantized)
        assert isinstance(op, ConvOperator)  # build_operator of a convolutional form
        return op.frequency_blocks(half=half)


class MonotoneConv(MonotoneMultiConv):
    """Single-convolution ``W = (1 - m) I - A^T A + B - B^T`` (``C x C x k x k`` kernels, circular padding).

    ``W`` is stored (and quantized) as its assembled ``(2k - 1) x (2k - 1)`` kernel
    ``K_W = (1 - m) delta - A^T * A + B - B^T``. The state is ``(N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        image_size: int | tuple[int, int],
        kernel_size: int = 3,
        m: float = 1.0,
        learn_m: bool = False,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, [channels], image_size, kernel_size, m, learn_m, spec, bias_spec, device, dtype
        )
