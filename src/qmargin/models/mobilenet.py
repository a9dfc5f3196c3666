"""MobileNetV2 (Sandler et al., CVPR 2018), float or quantized, with quantized depthwise convolutions.

Layout (Table 2 of the paper): a 3x3 stem convolution (32 channels) -> 17 inverted residual blocks
(rows ``t, c, n, s`` of :data:`INVERTED_RESIDUAL_SETTING`: expansion ``t``, output channels ``c``,
``n`` blocks, stride ``s`` of the first) -> a 1x1 convolution to 1280 channels -> global average pool
-> dropout 0.2 -> ``fc``. An inverted residual block is

    1x1 expand (C -> tC) -> BN -> ReLU6 -> 3x3 depthwise (groups = tC, stride s) -> BN -> ReLU6
    -> 1x1 project (tC -> C') -> BN,   plus the input when s = 1 and C = C' (no ReLU after the sum)

(``t = 1``: no expansion layer). Every convolution (depthwise included) and ``fc`` store their weights
as integer codes under ``spec``; BatchNorm stays float. ReLU6, as in the paper: it bounds activations,
which is what the paper's low-precision deployments want. Width multiplier ``width``: channels
``make_divisible(c * width, 8)`` (the last 1x1 keeps 1280 for ``width <= 1``).

Input size: images up to 64 pixels (CIFAR-10, 32 x 32) use the common CIFAR adaptation: stride 1 in
the stem and in the first stride-2 stage (24 channels), so a 32 x 32 input still reaches 4 x 4 before
the pool; larger images (Imagenette, ImageNet) use the paper's strides (32x downsampling). With 1000
classes and ``width = 1`` the network has 3,504,872 parameters, as the paper's 3.4M (torchvision's
``mobilenet_v2`` has the same count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.models.layers import check_num_classes, check_specs, conv2d, linear
from qmargin.quant import QuantSpec

__all__ = ["MobileNetV2", "InvertedResidual", "INVERTED_RESIDUAL_SETTING", "make_divisible", "mobilenet_v2"]

INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""``(t, c, n, s)`` per stage: expansion, output channels, blocks, stride of the first block."""

SMALL_INPUT = 64
"""Images with both sides at most this size get the CIFAR strides (module doc)."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor``, never more than 10 % below it (the paper's
    reference code, also torchvision's ``_make_divisible``)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class _ConvBN(nn.Sequential):
    """conv -> BN (-> ReLU6 when ``act``)."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, *, groups: int = 1, act: bool, spec: QuantSpec | None
    ) -> None:
        layers: list[nn.Module] = [
            conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, groups=groups, spec=spec),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """The MobileNetV2 block (module doc): expand, depthwise, project; identity when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, *, spec: QuantSpec | None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2, got {stride}")
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_ConvBN(cin, hidden, 1, 1, act=True, spec=spec))
        layers += [
            _ConvBN(hidden, hidden, 3, stride, groups=hidden, act=True, spec=spec),  # depthwise
            _ConvBN(hidden, cout, 1, 1, act=False, spec=spec),  # linear bottleneck
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 over any ``C x H x W`` input (module doc).

    Args:
        input_shape: ``(C, H, W)``; ``H, W <= 64`` selects the CIFAR strides.
        num_classes: width of ``fc``.
        spec: weight quantizer of every convolution and ``fc``; ``None`` builds a float network.
        bias_spec: quantizer of the ``fc`` bias (convolutions have none); needs ``spec``.
        width: the width multiplier.
        dropout: before ``fc`` (0.2 in the paper).
        keep_first_last_float: leave the stem convolution and ``fc`` in float.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int = 10,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        *,
        width: float = 1.0,
        dropout: float = 0.2,
        keep_first_last_float: bool = False,
    ) -> None:
        super().__init__()
        check_specs(spec, bias_spec)
        check_num_classes(num_classes)
        if len(input_shape) != 3 or min(int(v) for v in input_shape) < 1:
            raise ConfigError(f"MobileNetV2 needs an input shape C x H x W, got {tuple(input_shape)}")
        if not (isinstance(width, int | float) and 0 < width <= 4):
            raise ConfigError(f"width must be in (0, 4], got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        small = max(int(input_shape[1]), int(input_shape[2])) <= SMALL_INPUT
        edge = None if keep_first_last_float else spec
        cin = make_divisible(32 * width)
        self.last_channels = make_divisible(1280 * max(1.0, width))
        self.small_input = small
        stem = _ConvBN(int(input_shape[0]), cin, 3, 1 if small else 2, act=True, spec=edge)
        features: list[nn.Module] = [stem]
        for i, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            cout = make_divisible(c * width)
            stride = 1 if (small and i == 1) else s  # CIFAR: keep 32 x 32 through the 24-channel stage
            for j in range(n):
                features.append(InvertedResidual(cin, cout, stride if j == 0 else 1, t, spec=spec))
                cin = cout
        features.append(_ConvBN(cin, self.last_channels, 1, 1, act=True, spec=spec))
        self.features = nn.Sequential(*features)
        self.dropout = nn.Dropout(dropout)
        self.fc = linear(self.last_channels, num_classes, spec=edge, bias_spec=bias_spec if edge else None)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.fc(self.dropout(out))


def mobilenet_v2(
    input_shape: Sequence[int],
    num_classes: int = 10,
    spec: QuantSpec | None = None,
    bias_spec: QuantSpec | None = None,
    *,
    width: float = 1.0,
    keep_first_last_float: bool = False,
) -> MobileNetV2:
    """MobileNetV2; see :class:`MobileNetV2`."""
    return MobileNetV2(
        input_shape, num_classes, spec, bias_spec, width=width, keep_first_last_float=keep_first_last_float
    )
