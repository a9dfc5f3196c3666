"""Architectures (MLP, VGG3/7, ResNet-20/18, MobileNetV2, MonDEQ) of `qmargin.quant` layers; the registry.

Every model takes ``spec: QuantSpec | None`` (``None`` = float ``nn.Linear``/``nn.Conv2d``) and an
optional ``bias_spec``; quantized layers are :class:`~qmargin.quant.QuantLinear` /
:class:`~qmargin.quant.QuantConv2d`, so bit errors and the integer state reach them. BatchNorm stays float.
"""

from qmargin.models.layers import conv2d, linear
from qmargin.models.mlp import MLP
from qmargin.models.mobilenet import MobileNetV2, mobilenet_v2
from qmargin.models.mondeq import MonDEQNet, build_mondeq, build_mondeq_conv, build_mondeq_multitier
from qmargin.models.registry import (
    HiddenMapper,
    ModelBuilder,
    available_models,
    build_model,
    check_model_kwargs,
    hidden_kwargs,
    register_model,
)
from qmargin.models.resnet import BasicBlock, CifarResNet, ResNet18, resnet18, resnet20
from qmargin.models.vgg import VGG, vgg3, vgg7

register_model("mondeq", build_mondeq, hidden="n", overwrite=True)  # the MonDEQ classifier of qmargin.deq
register_model("mondeq-conv", build_mondeq_conv, hidden="channels", overwrite=True)
register_model("mondeq-multitier", build_mondeq_multitier, hidden="channels", overwrite=True)

__all__ = [
    "MobileNetV2",
    "mobilenet_v2",
    "ResNet18",
    "resnet18",
    "MLP",
    "VGG",
    "vgg3",
    "vgg7",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "MonDEQNet",
    "build_mondeq",
    "build_mondeq_conv",
    "build_mondeq_multitier",
    "linear",
    "conv2d",
    "ModelBuilder",
    "HiddenMapper",
    "hidden_kwargs",
    "check_model_kwargs",
    "register_model",
    "build_model",
    "available_models",
]
