"""Make the files of the README's "Stress your own network" example, with plain PyTorch and NumPy.

Trains ``mycnn.make_cnn()`` in float on the training split of scikit-learn's 8x8 digits (as qmargin's
``digits`` dataset splits and normalises them) and writes

* ``cnn.safetensors``: the trained float weights (``torch.save(model.state_dict(), "cnn.pt")`` works
  the same);
* ``digits_test.npz``: the 359 test images ``x`` (N x 1 x 8 x 8, float32) and labels ``y``.

Run from this folder: ``python prepare.py`` (about 10 s on 2 CPU cores; seeded, so the files are
the same on every run on the same machine).
"""

import numpy as np
import torch
from mycnn import make_cnn
from safetensors.torch import save_file

from qmargin.data import load_dataset

torch.manual_seed(0)
data = load_dataset("digits")
np.savez("digits_test.npz", x=data.x_test.numpy(), y=data.y_test.numpy())

model = make_cnn()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(0)
for _epoch in range(15):
    model.train()
    for idx in torch.randperm(data.num_train, generator=gen).split(64):
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
model.eval()
with torch.no_grad():
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
print(f"float test accuracy {acc:.4f}")
save_file(model.state_dict(), "cnn.safetensors")
