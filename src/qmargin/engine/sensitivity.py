"""Sensitivity analysis: where in a quantized model do bit errors hurt? (issue 12)

At one bit error rate ``p`` and for ``R`` paired patterns (seeds ``s_r = base_seed + r``, the same
seeds in every cell, as campaigns use them), each *cell* corrupts one part of the stored bits and
measures the metric drop

    d_r = sign * (m_clean - m_r),   sign = +1 when higher is better (accuracies), -1 otherwise,

so ``d_r > 0`` always means "worse than clean". Per cell: the mean drop ``d_bar = (1/R) sum_r d_r``,
its population standard deviation (``ddof = 0``, as result files store it) and the 95% Student-t
confidence interval of the mean, ``d_bar ± t_{0.975, R-1} · std / sqrt(R - 1)``, all from
:mod:`qmargin.stats` (:func:`~qmargin.stats.summarize_accuracies`,
:func:`~qmargin.stats.mean_confidence_interval`: one home for the formulas).

Cells (``by``):

* ``"layer"``: every stored bit of one layer's selected tensors flips with probability ``p``; the other
  layers are clean. Streams are seeded per ``(seed, layer, tensor)``
  (:func:`qmargin.faults.inject`), so the pattern in layer ``L`` is exactly the full-model pattern of
  the same seed restricted to ``L``.
* ``"bit"``: only bit position ``b`` (0 = LSB) of every code, in every selected layer: a
  :class:`~qmargin.faults.Selection` whose ``protected_bits`` are all positions except ``b``, so each
  selected bit (one per stored word) flips with probability ``p`` (the observed rate is recorded per
  cell: ``observed_ber = flips / (R * exposed bits)``). Layers of different widths get one error model
  per width (position ``b`` exists in a ``w``-bit word when ``b < w``).
* ``"layer-bit"``: both: bit ``b`` of layer ``L`` only.

Plus the full model at ``p`` (every selected bit of every layer) for reference. The result is a plain,
JSON-ready dict (:func:`sensitivity`) a protection planner can rank by ``mean_drop``.

Prefix reuse (:mod:`qmargin.engine.prefix`): a cell whose layers start at node ``k`` of the traced
graph runs the clean prefix once per batch and only the suffix per pattern; models that do not trace
fall back to full passes (the reason is recorded under ``prefix_reuse``). The values are identical
either way (the tests check it bit for bit).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import qmargin
from qmargin.engine.cells import PassResult, evaluate_pass, prepared, reports_convergence
from qmargin.engine.evaluation import Evaluation, batch_size_of
from qmargin.engine.grid import check_positive_int
from qmargin.engine.metrics import batch_sum_count
from qmargin.engine.prefix import Split, TracedModel, live_bytes, trace_model
from qmargin.engine.run import model_fingerprint
from qmargin.engine.store import jsonable
from qmargin.errors import ConfigError, DataError
from qmargin.faults import BitErrorModel, ErrorModel, inject
from qmargin.interop import stored_code_groups
from qmargin.quant.codes import protected_positions
from qmargin.stats import CI_LEVEL, mean_confidence_interval, summarize_accuracies

__all__ = [
    "SENSITIVITY_SCHEMA",
    "SENSITIVITY_VERSION",
    "BY_CHOICES",
    "DEFAULT_CACHE_BYTES",
    "StoredLayer",
    "SensitivityCell",
    "CellsRun",
    "run_cells",
    "stored_layers",
    "sensitivity_cells",
    "sensitivity",
    "glob_escape",
]

SENSITIVITY_SCHEMA = "qmargin.sensitivity"
SENSITIVITY_VERSION = 1
BY_CHOICES = ("layer", "bit", "layer-bit")
DEFAULT_CACHE_BYTES = 512 * 2**20
"""Default budget of the prefix cache (activations at the cut, for a group of batches): 512 MiB."""

Progress = Callable[[int, int, str], None]


def glob_escape(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern matching only itself (``*``, ``?``, ``[`` bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclass(frozen=True)
class StoredLayer:
    """A layer with selected stored tensors: its name, ``(tensor, bits, numel)`` of each."""

    name: str
    tensors: tuple[tuple[str, int, int], ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted({b for _, b, _ in self.tensors}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "tensors": [{"tensor": t, "bits": b, "numel": n} for t, b, n in self.tensors],
            "n_bits": sum(b * n for _, b, n in self.tensors),
        }


def stored_layers(model: nn.Module, template: BitErrorModel) -> list[StoredLayer]:
    """The layers whose stored tensors ``template`` selects, in module order (canonical names of ties).

    The model's codes must be pinned (inside :func:`qmargin.engine.cells.prepared`).
    """
    found: dict[str, list[tuple[str, int, int]]] = {}
    groups = stored_code_groups(model)
    if not groups:
        raise ConfigError("the model has no quantized layers: bit errors act on stored integer codes")
    for provider, group in groups:
        if not template.selection.selects_stored(group):
            continue
        name, module, tensor = group[0]
        codes = provider.codes(name, module, tensor)
        found.setdefault(name, []).append((tensor, int(codes.bits), int(codes.codes.numel())))
    if not found:
        raise ConfigError(f"the selection hits no stored tensor ({template.selection.describe()})")
    return [StoredLayer(n, tuple(t)) for n, t in found.items()]


@dataclass(frozen=True)
class SensitivityCell:
    """One cell: ``kind`` (``"full"``, ``"layer"``, ``"bit"``, ``"layer-bit"``), its ``layer`` and
    ``bit`` (``None`` where the cell spans them), the layers it touches and its error models (one per
    word width; applied together)."""

    kind: str
    layer: str | None
    bit: int | None
    layers: tuple[str, ...]
    error_models: tuple[ErrorModel, ...]


def _bit_models(
    template: BitErrorModel, layers: Sequence[StoredLayer], bit: int, ber: float
) -> tuple[BitErrorModel, ...]:
    """Error models flipping only position ``bit`` of ``layers`` (one per word width ``w > bit``)."""
    by_width: dict[int, list[str]] = {}
    for layer in layers:
        for w in layer.widths:
            if bit < w:
                by_width.setdefault(w, []).append(layer.name)
    out = []
    for w, names in sorted(by_width.items()):
        own = protected_positions(template.protected_bits, w) if template.protected_bits else frozenset()
        if bit in own:
            continue  # the user protects this position: nothing to flip
        protected = tuple(k for k in range(w) if k != bit)
        out.append(
            replace(
                template,
                ber=ber,
                layers=tuple(glob_escape(n) for n in dict.fromkeys(names)),
                protected_bits=protected,
            )
        )
    return tuple(out)


def sensitivity_cells(
    template: BitErrorModel, layers: Sequence[StoredLayer], by: str, ber: float
) -> list[SensitivityCell]:
    """The cells of ``by`` (module docstring), the full-model reference cell first.

    Bit cells need one width for a tensor's ``protected_bits``: layers of mixed widths are grouped
    by width (one error model per group). A position the template protects gives no cell.
    """
    if by not in BY_CHOICES:
        raise ConfigError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    names = tuple(layer.name for layer in layers)
    cells = [
        SensitivityCell(
            "full",
            None,
            None,
            names,
            (replace(template, ber=ber, layers=tuple(glob_escape(n) for n in names)),),
        )
    ]
    if by == "layer":
        for layer in layers:
            em = replace(template, ber=ber, layers=(glob_escape(layer.name),))
            cells.append(SensitivityCell("layer", layer.name, None, (layer.name,), (em,)))
        return cells
    max_bits = max(w for layer in layers for w in layer.widths)
    if by == "bit":
        for b in range(max_bits):
            ems = _bit_models(template, layers, b, ber)
            if ems:
                cells.append(SensitivityCell("bit", None, b, names, ems))
        return cells
    for layer in layers:
        for b in range(max(layer.widths)):
            ems = _bit_models(template, [layer], b, ber)
            if ems:
                cells.append(SensitivityCell("layer-bit", layer.name, b, (layer.name,), ems))
    return cells


@contextlib.contextmanager
def _injected(model: nn.Module, cell: SensitivityCell, seed: int) -> Iterator[tuple[int, int]]:
    """Inject every error model of ``cell`` (seed ``seed``); yields ``(flipped, exposed)`` bits."""
    with contextlib.ExitStack() as stack:
        flipped = exposed = 0
        for em in cell.error_models:
            report = stack.enter_context(inject(model, em, seed))
            flipped += report.n_flipped
            exposed += report.n_exposed
        yield flipped, exposed


@dataclass
class _CellRun:
    results: list[PassResult]
    flipped: int
    exposed: int  # per pattern


def _run_full(
    model: nn.Module,
    evaluation: Evaluation,
    cell: SensitivityCell,
    seeds: Sequence[int],
    count_failures: bool,
) -> _CellRun:
    """Full passes: per seed, inject, one pass over the data, restore."""
    results, flipped, exposed = [], 0, 0
    for seed in seeds:
        with _injected(model, cell, seed) as (f, e):
            results.append(evaluate_pass(model, evaluation, count_failures=count_failures))
        flipped += f
        exposed = e
    return _CellRun(results, flipped, exposed)


def _run_reuse(
    model: nn.Module,
    evaluation: Evaluation,
    cell: SensitivityCell,
    seeds: Sequence[int],
    split: Split,
    cache_bytes: int,
) -> _CellRun:
    """Prefix reuse: the prefix once per batch, cached for a group of batches up to ``cache_bytes``;
    per group and seed: inject, the suffix over the group, restore. Sums run in batch order, as in
    :func:`~qmargin.engine.cells.evaluate_pass`, so totals are identical."""
    metric = evaluation.metric
    k = len(seeds)
    totals: list[float | int] = [0] * k
    counts: list[float | int] = [0] * k
    flipped, exposed, n = 0, 0, 0
    first_group = True
    group: list[tuple[tuple[Any, ...], Any]] = []
    held = 0

    def flush() -> None:
        nonlocal flipped, exposed, first_group
        for r, seed in enumerate(seeds):
            with _injected(model, cell, seed) as (f, e):
                for live, targets in group:
                    s, c = batch_sum_count(metric, split.run_suffix(live), targets, None)
                    totals[r] += s
                    counts[r] += c
            if first_group:  # every group sees the same pattern: count it once
                flipped += f
                exposed = e
        first_group = False
        group.clear()

    with torch.inference_mode():
        for inputs, targets in evaluation.batches():
            live = split.run_prefix(inputs)
            group.append((live, targets))
            n += batch_size_of(inputs, targets)
            held += live_bytes(live)
            if held >= cache_bytes:
                flush()
                held = 0
        if group:
            flush()
    if n == 0:
        raise DataError("the test set is empty")
    results = [PassResult(totals[r], counts[r], 0, n) for r in range(k)]
    for res in results:
        res.value  # noqa: B018  (raises MetricError on count 0)
    return _CellRun(results, flipped, exposed)


def _cell_dict(
    cell: SensitivityCell, run: _CellRun, clean: float, sign: float, seeds: Sequence[int], seconds: float
) -> dict[str, Any]:
    values = [r.value for r in run.results]
    drops = [sign * (clean - v) for v in values]
    s = summarize_accuracies(drops)
    ci = mean_confidence_interval(s["mean"], s["std"], len(drops))
    out: dict[str, Any] = {
        "kind": cell.kind,
        "layer": cell.layer,
        "bit": cell.bit,
        "values": values,
        "drops": drops,
        "mean_value": summarize_accuracies(values)["mean"],
        "mean_drop": s["mean"],
        "std_drop": s["std"],
        "min_drop": s["min"],
        "max_drop": s["max"],
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
        "n": len(drops),
        "exposed_bits": run.exposed,
        "flipped_bits": run.flipped,
        "observed_ber": run.flipped / (len(seeds) * run.exposed) if run.exposed else 0.0,
        "error_models": [em.to_dict() for em in cell.error_models],
        "seconds": seconds,
    }
    if any(r.failures for r in run.results):
        out["failures"] = [r.failures for r in run.results]
    return out


def sensitivity(
    model: nn.Module,
    evaluation: Evaluation,
    *,
    ber: float,
    by: str = "layer",
    patterns: int = 10,
    base_seed: int = 0,
    template: BitErrorModel | None = None,
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    config: dict[str, Any] | None = None,
    weights: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-layer / per-bit / per-layer-and-bit metric drops at BER ``ber`` (module docstring).

    Args:
        model: a model with stored integer codes (frozen for the analysis, restored after).
        evaluation: data and metric (:class:`~qmargin.engine.evaluation.Evaluation`).
        ber: the bit error rate ``p`` in ``(0, 1]``.
        by: ``"layer"``, ``"bit"`` or ``"layer-bit"``.
        patterns: ``R`` paired patterns per cell (``>= 1``; the CI needs ``>= 2``).
        base_seed: pattern ``r`` uses seed ``base_seed + r`` in every cell.
        template: what to select (layers, exclude, tensors, storage, saturate, protected bits);
            default every stored weight (:class:`~qmargin.faults.BitErrorModel`).
        reuse: prefix reuse (``torch.fx``); ``False`` forces full passes.
        cache_bytes: budget of the prefix cache (module docstring of :mod:`qmargin.engine.prefix`).
        config: the command's configuration, stored as ``config``.
        weights: the record of the weights file, stored as ``weights``.
        progress: ``progress(done, total, label)`` after each cell.

    Returns a JSON-ready dict: ``schema``/``schema_version``, settings, ``clean_value``, ``layers``
    (name, tensors, bits), ``full`` (the reference cell), ``cells`` (kind, layer, bit, values, drops,
    mean/std/min/max drop, CI, observed BER), ``prefix_reuse`` (used or why not), ``timing``.
    """
    if isinstance(ber, bool) or not isinstance(ber, int | float) or not 0.0 < float(ber) <= 1.0:
        raise ConfigError(f"the BER must be in (0, 1], got {ber!r}")
    ber = float(ber)
    check_positive_int("patterns", patterns)
    check_positive_int("cache_bytes", cache_bytes)
    if by not in BY_CHOICES:
        raise ConfigError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ConfigError(f"the base seed must be a non-negative integer, got {base_seed!r}")
    template = template if template is not None else BitErrorModel()
    if not isinstance(template, BitErrorModel):
        raise ConfigError(f"template must be a BitErrorModel, got {type(template).__name__}")
    seeds = [base_seed + r for r in range(patterns)]
    t0 = time.perf_counter()
    run = run_cells(
        model,
        evaluation,
        lambda layers: sensitivity_cells(template, layers, by, ber),
        seeds=seeds,
        template=template,
        reuse=reuse,
        cache_bytes=cache_bytes,
        progress=progress,
    )
    layers, out_cells = run.layers, run.cells
    result: dict[str, Any] = {
        "schema": SENSITIVITY_SCHEMA,
        "schema_version": SENSITIVITY_VERSION,
        "qmargin_version": qmargin.__version__,
        "ber": ber,
        "by": by,
        "patterns": patterns,
        "base_seed": base_seed,
        "seeds": seeds,
        "seed_scheme": "pattern r uses seed base_seed + r in every cell (paired)",
        "ci_level": CI_LEVEL,
        "drop": "sign * (clean - faulty), sign = +1 when higher is better: positive = worse",
        "template": jsonable(template.to_dict()),
        "metric": jsonable(evaluation.metric.to_dict(), "metric"),
        "evaluation": {"n_test": run.n_test, **evaluation.settings()},
        "fingerprint": run.fingerprint,
        "config": jsonable(config or {}),
        "clean_value": run.clean_value,
        "layers": [layer.to_dict() for layer in layers],
        "bits": sorted({w for layer in layers for w in layer.widths}),
        "full": out_cells[0],
        "cells": out_cells[1:],
        "prefix_reuse": run.prefix_reuse,
        "timing": {"seconds": time.perf_counter() - t0},
    }
    if weights is not None:
        result["weights"] = dict(weights)
    return result


@dataclass
class CellsRun:
    """What :func:`run_cells` measured: the clean value and pass size, the stored layers, one dict
    per cell (as :func:`sensitivity` stores them, in the order given), the prefix-reuse record and
    the model / data fingerprint."""

    clean_value: float
    n_test: int
    layers: list[StoredLayer]
    cells: list[dict[str, Any]]
    prefix_reuse: dict[str, Any]
    fingerprint: dict[str, str]


def run_cells(
    model: nn.Module,
    evaluation: Evaluation,
    make_cells: Callable[[list[StoredLayer]], Sequence[SensitivityCell]],
    *,
    seeds: Sequence[int],
    template: Any,
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Progress | None = None,
) -> CellsRun:
    """Measure any cells over the paired ``seeds``: the engine of :func:`sensitivity`, open to other
    cell builders (the protection planner, :mod:`qmargin.engine.planner`, measures one layer under one
    protection scheme per cell).

    ``make_cells(layers)`` builds the cells once the model is prepared (``layers``: the stored layers
    ``template`` selects, :func:`stored_layers`); a cell's error models may be any
    :class:`~qmargin.faults.ErrorModel` (``inject`` applies them together). Per cell and seed ``s``:
    the drop ``d_s = sign * (m_clean - m_s)`` (module docstring), with prefix reuse where the model
    traces. ``template`` is also what :func:`~qmargin.engine.cells.prepared` pins of foreign providers.
    """
    with prepared(model, evaluation.device, template) as foreign:
        layers = stored_layers(model, template)
        cells = list(make_cells(layers))
        count_failures = reports_convergence(model, evaluation)
        clean = evaluate_pass(model, evaluation, count_failures=count_failures, fingerprint=True)
        metric = evaluation.metric
        sign = 1.0 if metric.higher_is_better else -1.0
        traced: TracedModel | None = None
        reason: str | None = None
        if not reuse:
            reason = "disabled (full passes asked for)"
        elif count_failures:
            reason = "the model reports per-sample convergence (MonDEQ): full passes"
        else:
            traced, reason = trace_model(
                model,
                [n for _, g in stored_code_groups(model) for n, _, _ in g],
                evaluation.first_batch()[0],
            )
        out_cells: list[dict[str, Any]] = []
        saved_nodes = 0
        for i, cell in enumerate(cells):
            t = time.perf_counter()
            split = None
            if traced is not None:
                try:
                    split = traced.split(cell.layers)
                except ValueError:
                    split = None
            if split is not None:
                run = _run_reuse(model, evaluation, cell, seeds, split, cache_bytes)
                saved_nodes += split.n_prefix_nodes * (len(seeds) - 1)
            else:
                run = _run_full(model, evaluation, cell, seeds, count_failures)
            if any(r.n != clean.n for r in run.results):
                raise DataError("the data changed between passes")
            entry = _cell_dict(cell, run, clean.value, sign, seeds, time.perf_counter() - t)
            if split is not None:
                entry["prefix"] = {
                    "first": split.first,
                    "prefix_ops": split.n_prefix_nodes,
                    "suffix_ops": split.n_suffix_nodes,
                    "live_values": split.n_live,
                }
            out_cells.append(entry)
            if progress is not None:
                label = cell.kind if cell.layer is None else cell.layer
                progress(i + 1, len(cells), label if cell.bit is None else f"{label} bit {cell.bit}")
        fingerprint = {"model_sha256": model_fingerprint(model, foreign)}
    known = evaluation.known_fingerprint()
    fingerprint.update(known if known is not None else {"data_sha256": clean.data_sha256 or ""})
    return CellsRun(
        clean.value,
        clean.n,
        layers,
        out_cells,
        {
            "used": traced is not None,
            "method": "torch.fx" if traced is not None else None,
            "reason": reason,
            "cache_bytes": cache_bytes,
            "prefix_ops_saved": saved_nodes,
        },
        fingerprint,
    )
