"""The GPU path (issue 8, part 6): campaigns, batched patterns and training on CUDA.

Skipped where no CUDA device is present (CI is CPU only); ``benchmarks/gpu_check.sh`` runs this file
on a machine with a GPU. Bit-error patterns are drawn from a CPU generator and moved to the codes'
device (:mod:`qmargin.faults.functional`), so a pattern never depends on the device: the corrupted
codes must be bit-identical on CPU and GPU. Accuracies may differ by float round-off in the GPU's
kernels (cuDNN, TF32), so they are compared within a few samples.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qmargin.engine import stress
from qmargin.engine.cells import code_buffers
from qmargin.faults import BitErrorModel, inject
from qmargin.quant import QuantSpec, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )
    quantize_model(model, QuantSpec(4))
    return model.eval()


def _data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g)
    with torch.no_grad():
        y = _cnn()(x).argmax(1)  # labels the clean model gets right, so errors show as drops
    return x, y


def test_patterns_are_device_independent():
    cpu, gpu = _cnn(), _cnn().cuda()
    em = BitErrorModel(1e-2)
    with inject(cpu, em, 7), inject(gpu, em, 7):
        a, b = code_buffers(cpu), code_buffers(gpu)
        assert a.keys() == b.keys()
        for name in a:
            assert b[name].is_cuda
            assert torch.equal(a[name], b[name].cpu()), name


def test_campaign_on_cuda_matches_cpu():
    x, y = _data()
    kw = dict(bers=[0.0, 1e-2, 5e-2], repeats=4, base_seed=3, batch_size=128)
    on_cpu = stress(_cnn(), (x, y), device="cpu", **kw)
    on_gpu = stress(_cnn(), (x, y), device="cuda", **kw)
    a = [r["accuracies"] for r in on_cpu["results"]]
    b = [r["accuracies"] for r in on_gpu["results"]]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for va, vb in zip(ra, rb, strict=True):
            assert abs(va - vb) <= 100 * 3 / len(y)  # at most 3 of 512 predictions differ


@pytest.mark.parametrize("per_pass", [4, 8])
def test_batched_patterns_for_cnns_on_cuda(per_pass):
    x, y = _data()
    kw = dict(bers=[1e-2], repeats=8, base_seed=5, batch_size=128, device="cuda")
    loop = stress(_cnn(), (x, y), **kw)
    stacked = stress(_cnn(), (x, y), patterns_per_pass=per_pass, **kw)
    a, b = loop["results"][0]["accuracies"], stacked["results"][0]["accuracies"]
    assert len(a) == len(b) == 8
    assert max(abs(u - v) for u, v in zip(a, b, strict=True)) <= 100 * 3 / len(y)
    assert len(set(a)) > 1  # the patterns differ, so the comparison is not vacuous
