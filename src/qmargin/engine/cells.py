"""Evaluating cells: one pass of a model over an :class:`~qmargin.engine.evaluation.Evaluation`.

:func:`evaluate_cell` is pure in the sense issue 8 needs: given a prepared model (:func:`prepared`),
an evaluation, the template error model and a :class:`~qmargin.engine.grid.Cell`, it injects the
cell's pattern (seed ``s_r``, BER ``p``), reduces the metric over the data and restores the codes
exactly; its :class:`CellOutcome` depends on nothing else, so cells can run in any order or on other
workers, and :mod:`qmargin.engine.store` merges them into the result of a sequential run.

Convergence protocol (MonDEQ models; :class:`qmargin.models.protocols.ReportsConvergence`): if, after
a forward pass, the model has an attribute ``converged`` holding a bool tensor with one entry per
sample of that batch, samples whose flag is ``False`` are counted in ``failures`` and score the
metric's ``failed_score`` (wrong, for the accuracies).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.engine.activations import ActivationSetup, cell_errors
from qmargin.engine.evaluation import Evaluation, StreamHash, batch_size_of, call_model
from qmargin.engine.grid import Cell, with_ber
from qmargin.engine.metrics import MetricError, batch_sum_count
from qmargin.errors import ConfigError, DataError
from qmargin.interop import CodeGroup, CodeProvider, StoredName, stored_code_groups
from qmargin.models.protocols import ReportsConvergence
from qmargin.quant import quantized_modules

__all__ = [
    "CellOutcome",
    "PassResult",
    "prepared",
    "reports_convergence",
    "evaluate_pass",
    "evaluate_cell",
    "evaluate_clean",
    "evaluate_cells_stacked",
    "code_buffers",
]


@dataclass(frozen=True)
class PassResult:
    """A metric reduced over one pass: ``total`` (sum of the per-batch sums), ``count``,
    ``failures`` (non-converged samples), ``n`` (samples seen), ``data_sha256`` (when hashed),
    ``dues`` (detected uncorrectable errors of the pattern: :attr:`qmargin.faults.InjectionReport.n_due`)."""

    total: float | int
    count: float | int
    failures: int
    n: int
    data_sha256: str | None = None
    dues: int = 0

    @property
    def value(self) -> float:
        """``total / count`` (correctly rounded for integer totals and counts)."""
        if self.count <= 0:
            raise MetricError("the metric counted no samples (count 0 over the whole data)")
        return self.total / self.count


@dataclass(frozen=True)
class CellOutcome:
    """The outcome of one cell (``cell`` ``None`` = the clean pass)."""

    cell: Cell | None
    result: PassResult

    @property
    def value(self) -> float:
        return self.result.value


@contextlib.contextmanager
def prepared(model: nn.Module, device: torch.device, template: Any = None) -> Iterator[list[CodeGroup]]:
    """The model on ``device``, in eval mode, its stored codes pinned; yields the pinned groups of
    other code providers (torchao, Brevitas: :mod:`qmargin.interop`).

    Every qmargin quantized layer is frozen (stored codes); of other providers' stored tensors, those
    ``template``'s selection hits (all when ``template`` is ``None``) are pinned. What this froze or
    pinned is released and the training mode restored on exit. ``ConfigError`` when the model has no
    stored integer codes at all.
    """
    qmods = list(quantized_modules(model))
    foreign = [(p, g) for p, g in stored_code_groups(model) if p.name != "qmargin"]
    if not qmods and not foreign:
        raise ConfigError("the model has no quantized layers: bit errors act on stored integer codes")
    if template is not None:
        foreign = [(p, g) for p, g in foreign if template.selection.selects_stored(g)]
    was_training = model.training
    model.to(device)
    model.eval()
    newly_frozen = [m for _, m in qmods if not m.frozen]
    pinned: list[tuple[CodeProvider, StoredName]] = []
    try:
        for m in newly_frozen:
            m.freeze()
        for provider, group in foreign:
            for ref in group:
                if provider.pin(*ref):
                    pinned.append((provider, ref))
        yield foreign
    finally:
        for provider, ref in reversed(pinned):
            provider.unpin(*ref)
        for m in newly_frozen:
            if m.frozen:
                m.unfreeze()
        model.train(was_training)


def _flags(model: nn.Module, n: int) -> Tensor | None:
    flags = model.converged if isinstance(model, ReportsConvergence) else None
    if isinstance(flags, Tensor) and flags.dtype == torch.bool and flags.shape == (n,):
        return flags
    return None


def reports_convergence(model: nn.Module, evaluation: Evaluation) -> bool:
    """Whether the model sets per-sample ``converged`` flags (one forward pass on the first batch)."""
    inputs, targets = evaluation.first_batch()
    with torch.inference_mode():
        call_model(model, inputs)
    return _flags(model, batch_size_of(inputs, targets)) is not None


def evaluate_pass(
    model: nn.Module, evaluation: Evaluation, *, count_failures: bool, fingerprint: bool = False
) -> PassResult:
    """Reduce the metric over one pass of the data (``fingerprint``: hash the batches on the way)."""
    metric = evaluation.metric
    hasher = StreamHash() if fingerprint else None
    total: float | int = 0
    count: float | int = 0
    failures = 0
    n = 0
    with torch.inference_mode():
        for inputs, targets in evaluation.batches():
            if hasher is not None:
                hasher.update((inputs, targets))
            b = batch_size_of(inputs, targets)
            out = call_model(model, inputs)
            flags = None
            if count_failures:
                flags = _flags(model, b)
                if flags is None:
                    raise ConfigError(
                        "count_failures needs the model to set `converged` (bool per sample) "
                        "after every forward pass"
                    )
                failures += int((~flags).sum())
            s, c = batch_sum_count(metric, out, targets, flags)
            total += s
            count += c
            n += b
    if n == 0:
        raise DataError("the test set is empty")
    result = PassResult(total, count, failures, n, hasher.hexdigest() if hasher else None)
    result.value  # noqa: B018  (raises MetricError on count 0)
    return result


def evaluate_cell(
    model: nn.Module,
    evaluation: Evaluation,
    template: Any,
    cell: Cell,
    *,
    count_failures: bool,
    activations: ActivationSetup | None = None,
) -> CellOutcome:
    """Inject the cell's pattern (``with_ber(template, cell.ber)``, seed ``cell.seed``) into the
    prepared ``model``, evaluate one pass, restore the codes exactly. With ``activations``: the
    quantized activation buffers too, their errors seeded ``cell.seed`` per layer and batch
    (:func:`qmargin.engine.activations.cell_errors`)."""
    from qmargin.faults import inject  # looked up per call: tests substitute qmargin.faults.inject

    if activations is not None:
        with cell_errors(model, template, activations, cell.ber, cell.seed) as report:
            res = evaluate_pass(model, evaluation, count_failures=count_failures)
        return CellOutcome(cell, dataclasses.replace(res, dues=_dues(report)))
    with inject(model, with_ber(template, cell.ber), cell.seed) as report:
        res = evaluate_pass(model, evaluation, count_failures=count_failures)
    return CellOutcome(cell, dataclasses.replace(res, dues=_dues(report)))


def _dues(report: Any) -> int:
    """The report's DUE count (0 for a substitute ``inject`` without one)."""
    return int(getattr(report, "n_due", 0) or 0)


def evaluate_clean(
    model: nn.Module,
    evaluation: Evaluation,
    *,
    count_failures: bool,
    fingerprint: bool = False,
    activations: ActivationSetup | None = None,
) -> PassResult:
    """The clean pass: :func:`evaluate_pass` without errors (with ``activations``: on the quantized
    activation buffers, uncorrupted)."""
    if activations is None:
        return evaluate_pass(model, evaluation, count_failures=count_failures, fingerprint=fingerprint)
    with activations.installed(model):
        return evaluate_pass(model, evaluation, count_failures=count_failures, fingerprint=fingerprint)


def code_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Live integer-code buffers of every quantized tensor, by their name in ``model``."""
    out = {}
    for mname, m in quantized_modules(model):
        for tname in m.quant_specs:
            out[f"{mname}.{tname}_codes" if mname else f"{tname}_codes"] = m.stored(tname).codes
    return out


def evaluate_cells_stacked(
    model: nn.Module, evaluation: Evaluation, template: Any, cells: Sequence[Cell]
) -> list[CellOutcome]:
    """Several cells in one pass over the data: their corrupted codes stacked ``[K, ...]`` and the
    forward pass vectorized over the pattern axis (``torch.func.vmap`` + ``functional_call``; for a
    ``QuantLinear`` the K weight copies become one batched matmul). Same outcomes as
    :func:`evaluate_cell` one by one; no failure counting (the flags are not vmappable)."""
    from qmargin.faults import inject

    live = code_buffers(model)
    stacks: dict[str, list[Tensor]] = {name: [] for name in live}
    dues = []
    for cell in cells:
        with inject(model, with_ber(template, cell.ber), cell.seed) as report:
            for name, buf in live.items():
                stacks[name].append(buf.clone())
        dues.append(_dues(report))
    codes = {name: torch.stack(v) for name, v in stacks.items()}
    metric = evaluation.metric
    k = len(cells)
    totals: list[float | int] = [0] * k
    counts: list[float | int] = [0] * k
    n = 0
    with torch.inference_mode():
        for inputs, targets in evaluation.batches():
            args, kwargs = (
                ((), inputs)
                if isinstance(inputs, dict)
                else ((tuple(inputs), {}) if isinstance(inputs, tuple | list) else ((inputs,), {}))
            )
            outs = torch.func.vmap(
                lambda bufs, a, kw: torch.func.functional_call(model, bufs, a, kw), in_dims=(0, None, None)
            )(codes, args, kwargs)
            for j in range(k):
                s, c = batch_sum_count(metric, outs[j], targets, None)
                totals[j] += s
                counts[j] += c
            n += batch_size_of(inputs, targets)
    out = [CellOutcome(c, PassResult(totals[j], counts[j], 0, n, dues=dues[j])) for j, c in enumerate(cells)]
    for o in out:
        o.value  # noqa: B018
    return out
