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

__all__ = ["BasicBlock", "CifarResNet", "ResNet18", "resnet20", "resnet18"]


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
    widths: Sequence[int] = (16, 32, 64),
    keep_first_last_float: bool = False,
) -> CifarResNet:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels); see :class:`CifarResNet`."""
    return CifarResNet(
        num_classes,
        in_channels,
        spec,
        bias_spec,
        blocks_per_stage=3,
        widths=widths,
        shortcut=shortcut,
        keep_first_last_float=keep_first_last_float,
    )


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016, Table 1): a stem, four stages of two basic blocks (64, 128, 256, 512
    channels, stride 2 at the first block of stages 2 to 4, projection shortcuts ``1x1 conv + BN``
    where the shape changes: option B, quantized like every convolution), global average pool, ``fc``.

    Stem by input size: images up to 64 pixels (CIFAR) get a 3x3 stride-1 convolution and no max
    pool (the usual CIFAR adaptation); larger ones (Imagenette 160 / 224, ImageNet) the paper's 7x7
    stride-2 convolution and 3x3 stride-2 max pool. With 1000 classes and a 3 x 224 x 224 input the
    network has 11,689,512 parameters (the paper's 11.7M; torchvision's ``resnet18`` has the same).
    BatchNorm stays float; ``keep_first_last_float`` leaves the stem convolution and ``fc`` in float.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int = 10,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        *,
        keep_first_last_float: bool = False,
    ) -> None:
        super().__init__()
        check_specs(spec, bias_spec)
        check_num_classes(num_classes)
        if len(input_shape) != 3 or min(int(v) for v in input_shape) < 1:
            raise ConfigError(f"ResNet-18 needs an input shape C x H x W, got {tuple(input_shape)}")
        edge = None if keep_first_last_float else spec
        self.small_input = max(int(input_shape[1]), int(input_shape[2])) <= 64
        if self.small_input:
            self.conv1 = conv2d(int(input_shape[0]), 64, 3, padding=1, bias=False, spec=edge)
            self.pool: nn.Module = nn.Identity()
        else:
            self.conv1 = conv2d(int(input_shape[0]), 64, 7, stride=2, padding=3, bias=False, spec=edge)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_ch = 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(in_ch, w, stride, shortcut="B", spec=spec),
                    BasicBlock(w, w, 1, shortcut="B", spec=spec),
                )
            )
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = linear(512, num_classes, spec=edge, bias_spec=bias_spec if edge else None)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(
    input_shape: Sequence[int],
    num_classes: int = 10,
    spec: QuantSpec | None = None,
    bias_spec: QuantSpec | None = None,
    *,
    keep_first_last_float: bool = False,
) -> ResNet18:
    """ResNet-18; see :class:`ResNet18`."""
    return ResNet18(input_shape, num_classes, spec, bias_spec, keep_first_last_float=keep_first_last_float)
