"""Multi-layer perceptron on flattened inputs, float or quantized."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from qmargin.errors import ConfigError
from qmargin.models.layers import activation as make_activation
from qmargin.models.layers import check_num_classes, check_specs, linear
from qmargin.quant import QuantSpec

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """``flatten -> (fc_i -> [bn_i] -> act_i) for each hidden width -> fc_out``.

    Layers are named ``fc1, bn1, act1, fc2, ..., fc{k+1}`` (the last one is the classifier). With
    ``batchnorm`` the hidden linear layers have no bias (BatchNorm1d supplies it).

    Args:
        in_features: size of one flattened input (``C * H * W``).
        num_classes: output width.
        hidden: widths of the hidden layers; ``()`` gives a linear classifier.
        spec: weight quantizer of every linear layer; ``None`` builds a float network.
        bias_spec: quantizer of the biases (needs ``spec``).
        batchnorm: BatchNorm1d after every hidden linear layer.
        activation: ``relu`` | ``tanh`` | ``hardtanh`` | ``gelu`` | ``sigmoid``.
        keep_first_last_float: leave the first and the last linear layer in float.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        *,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        batchnorm: bool = False,
        activation: str = "relu",
        keep_first_last_float: bool = False,
    ) -> None:
        check_specs(spec, bias_spec)
        check_num_classes(num_classes)
        hidden = tuple(hidden)
        if in_features < 1 or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"MLP widths must be positive, got in_features={in_features}, hidden={hidden}")
        make_activation(activation)  # validate the name before building anything
        widths = (in_features, *hidden, num_classes)
        n_layers = len(widths) - 1
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i in range(n_layers):
            edge = i == 0 or i == n_layers - 1
            layer_spec = None if (edge and keep_first_last_float) else spec
            last = i == n_layers - 1
            has_bias = last or not batchnorm
            layers[f"fc{i + 1}"] = linear(
                widths[i],
                widths[i + 1],
                spec=layer_spec,
                bias_spec=bias_spec if layer_spec is not None else None,
                bias=has_bias,
            )
            if not last:
                if batchnorm:
                    layers[f"bn{i + 1}"] = nn.BatchNorm1d(widths[i + 1])
                layers[f"act{i + 1}"] = make_activation(activation)
        super().__init__(layers)
