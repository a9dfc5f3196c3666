"""Typed conventions that models follow beyond ``nn.Module`` (checked at runtime with ``isinstance``).

* :class:`HasAuxiliaryLoss`: the model adds a term to the training objective,
  ``L = loss(f(x), y) + f.auxiliary_loss()`` (:func:`qmargin.training.trainer.objective`); e.g. the
  margin-aware QAT penalty of the ``mondeq`` model.
* :class:`ReportsConvergence`: after a forward pass ``converged`` holds one ``bool`` per sample of that
  batch (``None`` before the first forward); bit-error campaigns count samples whose flag is ``False``
  as errors (:mod:`qmargin.experiments.campaign`). Equilibrium models (:class:`qmargin.deq.MonDEQClassifier`)
  report it.

``runtime_checkable`` protocols check that the members exist, not their types; the annotations are
for the type checker.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["HasAuxiliaryLoss", "ReportsConvergence"]


@runtime_checkable
class HasAuxiliaryLoss(Protocol):
    """A model with an extra loss term: ``auxiliary_loss() -> Tensor`` (a 0-d tensor, added to the loss)."""

    def auxiliary_loss(self) -> Tensor: ...


@runtime_checkable
class ReportsConvergence(Protocol):
    """A model reporting per-sample convergence: ``converged`` (bool ``(N,)`` or ``None``) after a forward."""

    @property
    def converged(self) -> Tensor | None: ...
