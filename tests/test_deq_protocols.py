"""The typed model conventions of qmargin.models.protocols, as the MonDEQ models follow them."""

from __future__ import annotations

import torch
from torch import nn

from qmargin.deq import MonDEQClassifier
from qmargin.models.mondeq import build_mondeq
from qmargin.models.protocols import HasAuxiliaryLoss, ReportsConvergence
from qmargin.quant import QuantSpec


def test_mondeq_models_follow_the_protocols() -> None:
    torch.manual_seed(0)
    net = build_mondeq(input_shape=(4,), num_classes=3, spec=QuantSpec(4), n=6, certify=True)
    assert isinstance(net, HasAuxiliaryLoss) and isinstance(net, ReportsConvergence)
    assert net.converged is None  # before the first forward
    net.eval()
    logits = net(torch.randn(5, 4))
    flags = net.converged
    assert flags is not None and flags.dtype == torch.bool and flags.shape == (5,)
    assert logits.shape == (5, 3)
    assert not hasattr(net, "last_converged")  # one name: converged
    net.train()
    assert net.auxiliary_loss().shape == ()
    plain = MonDEQClassifier(4, n=6, num_classes=3)
    assert isinstance(plain, ReportsConvergence) and not isinstance(plain, HasAuxiliaryLoss)
    assert not isinstance(nn.Linear(2, 2), ReportsConvergence)
    assert not isinstance(nn.Linear(2, 2), HasAuxiliaryLoss)
