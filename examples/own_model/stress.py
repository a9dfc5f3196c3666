"""The Python API on the same CNN: your model, your DataLoader, your metric, one call.

Run ``python prepare.py`` first (it writes ``cnn.safetensors`` and ``digits_test.npz``).
"""

import numpy as np
import torch
from mycnn import make_cnn
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import qmargin
from qmargin.quant import QuantSpec, quantize_model

model = make_cnn()
model.load_state_dict(load_file("cnn.safetensors"))
converted = quantize_model(model, QuantSpec(bits=4))  # every Conv2d / Linear gets 4-bit stored codes
print("quantized:", converted)

test = np.load("digits_test.npz")
dataset = TensorDataset(torch.from_numpy(test["x"]), torch.from_numpy(test["y"]))
loader = DataLoader(dataset, batch_size=128)


def true_class_probability(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Mean softmax probability of the true class: a (sum, count) pair per batch."""
    p = outputs.softmax(1).gather(1, targets[:, None])
    return float(p.sum()), int(targets.numel())


for metric in ("top1", true_class_probability):
    result = qmargin.stress(model, loader, bers=[1e-3, 1e-2, 5e-2], repeats=20, metric=metric)
    name = result["metric"]["name"]
    clean = result.get("clean_accuracy", result.get("clean_value"))
    print(f"{name}: clean {clean:.3f}")
    for row in result["results"]:
        n = len(row.get("accuracies", row.get("values", [])))
        print(f"  BER {row['ber']:g}: {row['mean']:.3f} +- {row['std']:.3f} over {n} patterns")
