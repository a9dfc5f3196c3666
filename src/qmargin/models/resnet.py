"""ResNet-20 (He et al., 2016, §4.2) for CIFAR-style inputs, float or quantized.

Layout: ``conv1`` (3x3, 16) -> ``bn1`` -> ReLU -> ``layer1..layer3`` (``n`` basic blocks each, 16/32/64
channels, stride 2 at the first block of layers 2 and 3) -> global average pool -> ``fc``. ResNet-20 is
``n = 3`` (depth ``6n + 2``); with option-A shortcuts it has 0.27M parameters.

Shortcuts where the shape changes:

* ``"A"`` (default, the CIFAR ResNets of the paper): identity on a spatially subsampled input
  ``x[:, :, ::2, ::2]`` with the new channels zero-padded. It has no parameters, so nothing is
  stored and nothing can be hit by bit errors.
* ``"B"``: projection ``1x1 conv (stride 2) + BatchNorm``. The 1x1 conv is a weight layer like any
  other: with a ``spec`` it is a ``QuantConv2d`` and its codes are exposed to bit errors
  (it adds ~2.7k weights to ResNet-20).

Convolutions carry no bias (each is followed by BatchNorm), so ``bias_spec`` only reaches ``fc``.
BatchNorm stays float. ``keep_first_last_float`` leaves ``conv1`` and ``fc`` in float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.models.layers import check_num_classes, check_specs, conv2d, linear
from qmargin.quant import QuantSpec

__all__ = ["BasicBlock", "CifarResNet", "resnet20"]


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels from ``in_ch`` to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_lo = (out_ch - in_ch) // 2
        self.pad_hi = out_ch - in_ch - self.pad_lo

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_lo}, {self.pad_hi})"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        *,
        shortcut: str = "A",
        spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False, spec=spec)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False, spec=spec)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(
                conv2d(in_ch, out_ch, 1, stride=stride, bias=False, spec=spec), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (``n = blocks_per_stage``) over any ``C x H x W`` input.

    Args:
        num_classes: width of ``fc``.
        in_channels: input channels (3 for CIFAR-10, 1 for MNIST-like data).
        spec: weight quantizer of every conv / linear layer; ``None`` builds a float network.
        bias_spec: quantizer of the ``fc`` bias (convolutions have none); needs ``spec``.
        blocks_per_stage: ``n``; 3 gives ResNet-20.
        widths: channels of the three stages.
        shortcut: ``"A"`` (zero-pad identity, no parameters) or ``"B"`` (1x1 conv + BN, quantized too).
        keep_first_last_float: leave ``conv1`` and ``fc`` in float.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        *,
        blocks_per_stage: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "A",
        keep_first_last_float: bool = False,
    ) -> None:
        super().__init__()
        check_specs(spec, bias_spec)
        check_num_classes(num_classes)
        shortcut = shortcut.upper() if isinstance(shortcut, str) else shortcut
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        widths = tuple(widths)
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ConfigError(f"widths must be three positive channel counts, got {widths}")
        if blocks_per_stage < 1:
            raise ConfigError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        edge = None if keep_first_last_float else spec
        self.shortcut_option = shortcut
        self.conv1 = conv2d(in_channels, widths[0], 3, padding=1, bias=False, spec=edge)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_ch = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, w, stride, shortcut=shortcut, spec=spec))
                in_ch = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = linear(widths[-1], num_classes, spec=edge, bias_spec=bias_spec if edge else None)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    spec: QuantSpec | None = None,
    bias_spec: QuantSpec | None = None,
    *,
    shortcut: str = "A",
    keep_first_last_float: bool = False,
) -> CifarResNet:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels); see :class:`CifarResNet`."""
    return CifarResNet(
        num_classes, in_channels, spec, bias_spec,
        blocks_per_stage=3, shortcut=shortcut, keep_first_last_float=keep_first_last_float,
    )
