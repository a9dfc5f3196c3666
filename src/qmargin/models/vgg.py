"""VGG-style networks of the bit-error-tolerance literature (VGG3, VGG7), float or quantized.

A :class:`VGG` is a stack of stages of 3x3 convolutions (padding 1), each conv followed by
``[BatchNorm2d] -> ReLU``, and a 2x2 max pool closing every stage; then a classifier of hidden
linear layers (``-> [BatchNorm1d] -> ReLU``) and a final linear layer. Named modules:
``features.conv{k}``, ``features.bn{k}``, ``features.pool{s}``, ``classifier.fc{k}``, ...

* VGG3 (Buschjaeger et al., DATE 2021; Stutz et al.): ``conv64 - pool - conv64 - pool - fc2048 - fc10``.
* VGG7: ``2 x conv128 - pool - 2 x conv256 - pool - 2 x conv512 - pool - fc1024 - fc10``.

Both accept any ``(C, H, W)`` input whose height and width survive the pools (``H, W >= 2**stages``;
8x8 digits work: 1x1 after VGG7's three pools). With BatchNorm the conv / hidden linear layers carry
no bias, so ``bias_spec`` reaches only the layers that have one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.models.layers import check_input_shape, check_num_classes, check_specs, conv2d, linear
from qmargin.quant import QuantSpec

__all__ = ["VGG", "vgg3", "vgg7"]


class VGG(nn.Module):
    """Generic VGG: ``stages`` of 3x3 convs with a max pool after each stage, then ``hidden`` fcs.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: output width.
        stages: channel widths, one tuple per stage (``((64,), (64,))`` is VGG3).
        hidden: widths of the hidden linear layers (``(2048,)`` for VGG3).
        spec: weight quantizer of every conv / linear layer; ``None`` builds a float network.
        bias_spec: quantizer of the biases that exist (needs ``spec``).
        batchnorm: BatchNorm after every conv and hidden linear layer.
        keep_first_last_float: leave the first conv and the last linear layer in float.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        stages: Sequence[Sequence[int]],
        hidden: Sequence[int],
        *,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        batchnorm: bool = True,
        keep_first_last_float: bool = False,
    ) -> None:
        super().__init__()
        check_specs(spec, bias_spec)
        check_num_classes(num_classes)
        c, h, w = check_input_shape(input_shape)
        stages = tuple(tuple(int(x) for x in s) for s in stages)
        hidden = tuple(int(x) for x in hidden)
        if not stages or any(not s or min(s) < 1 for s in stages) or any(x < 1 for x in hidden):
            raise ConfigError(f"VGG needs non-empty stages of positive widths, got {stages}, hidden={hidden}")
        n_pool = len(stages)
        if h >> n_pool < 1 or w >> n_pool < 1:
            raise ConfigError(
                f"input {h}x{w} is too small for {n_pool} 2x2 max pools "
                f"(needs at least {2**n_pool}x{2**n_pool})"
            )
        first_spec = None if keep_first_last_float else spec
        bias = not batchnorm

        def bspec(s: QuantSpec | None) -> QuantSpec | None:
            return bias_spec if s is not None else None

        feats: OrderedDict[str, nn.Module] = OrderedDict()
        k = 0
        in_ch = c
        for si, stage in enumerate(stages):
            for out_ch in stage:
                k += 1
                s = first_spec if k == 1 else spec
                feats[f"conv{k}"] = conv2d(in_ch, out_ch, 3, padding=1, bias=bias, spec=s, bias_spec=bspec(s))
                if batchnorm:
                    feats[f"bn{k}"] = nn.BatchNorm2d(out_ch)
                feats[f"relu{k}"] = nn.ReLU()
                in_ch = out_ch
            feats[f"pool{si + 1}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(feats)
        self.out_hw = (h >> n_pool, w >> n_pool)
        flat = in_ch * self.out_hw[0] * self.out_hw[1]

        cls: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        widths = (flat, *hidden)
        for i in range(len(hidden)):
            cls[f"fc{i + 1}"] = linear(widths[i], widths[i + 1], spec=spec, bias_spec=bspec(spec), bias=bias)
            if batchnorm:
                cls[f"bn{i + 1}"] = nn.BatchNorm1d(widths[i + 1])
            cls[f"relu{i + 1}"] = nn.ReLU()
        last_spec = None if keep_first_last_float else spec
        cls[f"fc{len(hidden) + 1}"] = linear(
            widths[-1], num_classes, spec=last_spec, bias_spec=bspec(last_spec)
        )
        self.classifier = nn.Sequential(cls)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def vgg3(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    spec: QuantSpec | None = None,
    bias_spec: QuantSpec | None = None,
    channels: Sequence[int] = (64, 64),
    hidden: int = 2048,
    batchnorm: bool = True,
    keep_first_last_float: bool = False,
) -> VGG:
    """VGG3: one 3x3 conv per stage (``channels``, a max pool after each), one hidden fc, the head."""
    return VGG(
        input_shape,
        num_classes,
        tuple((ch,) for ch in channels),
        (hidden,),
        spec=spec,
        bias_spec=bias_spec,
        batchnorm=batchnorm,
        keep_first_last_float=keep_first_last_float,
    )


def vgg7(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    *,
    spec: QuantSpec | None = None,
    bias_spec: QuantSpec | None = None,
    channels: Sequence[int] = (128, 256, 512),
    hidden: int = 1024,
    batchnorm: bool = True,
    keep_first_last_float: bool = False,
) -> VGG:
    """VGG7: two 3x3 convs per stage (``channels``, a max pool after each), one hidden fc, the head."""
    return VGG(
        input_shape,
        num_classes,
        tuple((ch, ch) for ch in channels),
        (hidden,),
        spec=spec,
        bias_spec=bias_spec,
        batchnorm=batchnorm,
        keep_first_last_float=keep_first_last_float,
    )
