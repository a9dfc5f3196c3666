"""Running a campaign: the grid's cells evaluated on one model, stored and resumed (design.md §4).

For every BER ``p`` of the grid and every pattern ``r = 0 .. R-1``: inject bit errors seeded
``s_r = base_seed + r`` into the stored integer codes (:mod:`qmargin.engine.grid`), reduce the metric
over the data (:mod:`qmargin.engine.cells`), restore the codes exactly. The clean value (no
injection) is measured once. After the clean pass and after every pattern the result is written
atomically (``"status": "partial"``) and a rerun with identical settings continues where it stopped.
Where the cells run is the executor's business (:mod:`qmargin.engine.executors`: this process, or
Ray workers); a shard (``shard=(I, N)``) evaluates every ``N``-th cell into its own file.

:func:`stress` is the one call for the common case; :func:`run_campaign` takes an
:class:`~qmargin.engine.evaluation.Evaluation` and every option.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import qmargin
from qmargin.engine.activations import ActivationSetup, is_null_cell
from qmargin.engine.cells import CellOutcome, PassResult, evaluate_clean, prepared, reports_convergence
from qmargin.engine.evaluation import Evaluation, hash_tensor
from qmargin.engine.executors import CellJob, Executor, make_executor
from qmargin.engine.grid import Grid, check_positive_int, with_ber
from qmargin.engine.stopping import DEFAULT_MIN_PATTERNS, StoppingRule
from qmargin.engine.store import (
    CampaignState,
    campaign_csv_path,
    csv_text,
    dumps,
    jsonable,
    load_campaign,
    settings_diff,
    upgrade,
)
from qmargin.errors import CheckpointError, ConfigError, DataError
from qmargin.files import check_outputs, holds_lock, write_text_atomic
from qmargin.interop import CodeGroup
from qmargin.quant import quantized_modules

__all__ = ["CampaignProgress", "run_campaign", "stress", "model_fingerprint", "DEFAULT_REPEATS"]

DEFAULT_REPEATS = 10


@dataclass(frozen=True)
class CampaignProgress:
    """What the ``progress`` callback receives after each completed pattern.

    ``done``/``total`` count patterns (``len(bers) * repeats``), including the ones a resumed run
    found already finished. ``accuracy`` is the pattern's metric value (top-1 accuracy by default;
    also available as ``value``)."""

    done: int
    total: int
    ber: float
    pattern: int
    seed: int
    accuracy: float

    @property
    def value(self) -> float:
        return self.accuracy


def _hash_entry(h: Any, name: str, t: Tensor) -> None:
    """Hash a state-dict entry; a wrapper tensor subclass (torchao's) by its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) in (Tensor, nn.Parameter) or flatten is None:
        hash_tensor(h, name, t)
        return
    for inner in flatten()[0]:
        _hash_entry(h, f"{name}.{inner}", getattr(t, inner))


def model_fingerprint(model: nn.Module, foreign: Sequence[CodeGroup] = ()) -> str:
    """SHA-256 of the state dict plus the live integer codes (a rerun must evaluate the same model).

    ``foreign``: pinned stored tensors of other code providers (torchao, Brevitas; qmargin.interop),
    whose codes, scales and zero points are hashed too.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        _hash_entry(h, name, t)
    for mname, m in quantized_modules(model):
        if m.frozen:
            for tname in m.quant_specs:
                hash_tensor(h, f"{mname}.{tname}_codes", m.stored(tname).codes)
    for provider, group in foreign:
        name, module, tname = group[0]
        c = provider.codes(name, module, tname)
        key = f"{provider.name}:{name}.{tname}"
        hash_tensor(h, f"{key}_codes", c.codes)
        hash_tensor(h, f"{key}_scale", c.scale)
        if c.zero_point is not None:
            hash_tensor(h, f"{key}_zero_point", c.zero_point)
    return h.hexdigest()


def _mismatch(path: Path, diff: list[str]) -> ConfigError:
    return ConfigError(
        f"{path} holds a campaign with other settings: {'; '.join(diff)} (stored -> now); "
        "use another output path or overwrite"
    )


@holds_lock("out_path", kind="file")  # one process per result file, for the whole campaign
def run_campaign(
    model: nn.Module,
    evaluation: Evaluation,
    *,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    error_model: Any = None,
    out_path: str | Path | None = None,
    config: dict[str, Any] | None = None,
    progress: Callable[[CampaignProgress], None] | None = None,
    count_failures: bool | None = None,
    overwrite: bool = False,
    patterns_per_pass: int = 1,
    weights: dict[str, str] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    shard: tuple[int, int] | None = None,
    executor: Executor | None = None,
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
    activations: ActivationSetup | None = None,
) -> dict[str, Any]:
    """A campaign of ``model`` on ``evaluation`` over the grid ``bers`` x ``repeats`` patterns.

    Args:
        model: a model with quantized layers (``qmargin.quant.QuantizedTensors``), evaluated on its
            stored integer codes on ``evaluation.device`` in eval mode; layers not frozen yet are
            frozen for the campaign and unfrozen at the end; the training mode is restored.
        evaluation: data and metric (:class:`~qmargin.engine.evaluation.Evaluation`).
        bers: the BER grid (each finite in ``[0, 1]``, no duplicates; order kept).
        repeats: patterns ``R`` per BER, ``1 .. MAX_REPEATS`` (100000).
        base_seed: pattern ``r`` uses seed ``base_seed + r`` at every BER (paired comparisons).
        error_model: the template (``BitErrorModel`` or any ``ErrorModelTemplate``), its BER replaced
            by each grid value. Default ``BitErrorModel(ber=0)``: every bit of every stored weight.
        out_path: result JSON (partial after every pattern, atomically; a CSV beside it at the end,
            :func:`~qmargin.engine.store.campaign_csv_path`). An existing file with identical
            settings is resumed; otherwise a one-line ``ConfigError`` names each differing setting
            with its stored and new value, unless ``overwrite``. The file is locked while running.
        config: the resolved run configuration (JSON), stored as a setting.
        progress: called with a :class:`CampaignProgress` after every completed pattern.
        count_failures: count non-converged samples (``converged`` protocol); ``None`` = when the
            model exposes the flags.
        overwrite: discard an existing ``out_path`` whose settings differ instead of raising.
        patterns_per_pass: evaluate up to this many patterns of one BER per pass over the data
            (``torch.func.vmap`` over stacked codes; memory grows by this factor); ignored (1) when
            failures are counted or with ``activations``.
        weights: the record of the weights file the model was loaded from, stored as ``"weights"``.
        workers: evaluate the cells on this many Ray workers (a local Ray instance started and shut
            down here, unless Ray is already initialized); ``None``: in this process, without Ray.
            The result is the same, value for value (:mod:`qmargin.engine.executors`).
        ray_address: evaluate the cells on the Ray cluster at this address (``workers`` actors,
            default one per CPU of the cluster).
        shard: ``(I, N)``: evaluate only the cells of shard ``I`` of ``N`` (``1 <= I <= N``; the cells
            whose index ``k * repeats + r`` is ``I - 1`` modulo ``N``); the result records the shard
            and is combined with the others by :func:`~qmargin.engine.store.merge_results`.
        executor: evaluate the cells with this :class:`~qmargin.engine.executors.Executor` (started
            here and closed at the end) instead of the one ``workers`` / ``ray_address`` choose.
        ci_halfwidth: sequential stopping (:mod:`qmargin.engine.stopping`): at each BER add patterns
            (``base_seed + r``, ``r = 0, 1, ...``) until the 95% confidence interval of the mean has
            at most this half-width, in the metric's units (a fraction for the accuracies: 0.005 =
            half a percentage point); ``repeats`` is the cap. Patterns are added in rounds of
            ``patterns_per_pass`` per BER (the cells of a round go to the executor together). The
            result is the same on any executor and after a resume. Not with ``shard``.
        min_patterns: the minimum number of patterns per BER before the rule may stop it (>= 2).
        activations: quantized activation buffers with bit errors
            (:class:`~qmargin.engine.activations.ActivationSetup`: calibrated ranges and the
            activation BER of a cell, fixed or the grid's). Each cell injects its activation errors
            with its own seed, fresh per batch; the clean value is measured on the quantized
            activations; ``patterns_per_pass`` is 1. Recorded as the setting ``activations``
            (with the batch size: results depend on it).

    Returns the result dict (the JSON content, :mod:`qmargin.engine.store`).
    """
    from qmargin.faults import BitErrorModel, detects_errors, protection_summary, select_tensors

    if not isinstance(evaluation, Evaluation):
        raise ConfigError(f"evaluation must be a qmargin.engine.Evaluation, got {type(evaluation).__name__}")
    if out_path is not None:
        check_outputs({"result JSON": out_path, "CSV": campaign_csv_path(out_path)})
    grid = Grid.make(bers, repeats, base_seed)
    check_positive_int("patterns_per_pass", patterns_per_pass)
    shard = _check_shard(shard, grid.size)
    if ci_halfwidth is not None:
        StoppingRule(ci_halfwidth, min_patterns)  # one-line ConfigError before any work
        if shard is not None:
            raise ConfigError(
                "--ci-halfwidth needs every pattern of a BER in one run: it cannot be combined with --shard"
            )
    if executor is None:
        executor = make_executor(workers=workers, ray_address=ray_address)
    template = BitErrorModel(ber=0.0) if error_model is None else error_model
    if getattr(template, "p01", None) is not None and getattr(template, "p10", None) is not None:
        raise ConfigError(
            "the error model template fixes both p01 and p10, so the BER grid would change nothing"
        )
    cfg = jsonable(config or {})
    if activations is not None:
        if not isinstance(activations, ActivationSetup):
            raise ConfigError(f"activations must be an ActivationSetup, got {type(activations).__name__}")
        for b in grid.bers:  # every activation error model the cells will use is valid (nested, rates)
            with_ber(template, activations.act_ber(b))
    with prepared(model, evaluation.device, template) as foreign, contextlib.closing(executor):
        if activations is None or activations.weights:
            select_tensors(model, template)  # fail fast when the template selects no stored tensor
        if activations is not None:
            with activations.installed(model):  # fail fast when its layers are not the model's
                pass
        protection = protection_summary(template, model)  # per-layer protection: plan and overhead
        if foreign or activations is not None:
            patterns_per_pass = 1  # stacked code buffers exist for qmargin's layers only; no hooks
        if count_failures is None:
            count_failures = reports_convergence(model, evaluation)
        em_dict = dict(template.to_dict())
        em_dict["ber"] = None
        fingerprint: dict[str, str | None] = {"model_sha256": model_fingerprint(model, foreign)}
        known = evaluation.known_fingerprint()
        fingerprint.update(known if known is not None else {"data_sha256": None})
        n_known = evaluation.known_size()
        per_pass = 1 if count_failures else patterns_per_pass
        settings: dict[str, Any] = {
            "bers": list(grid.bers),
            "repeats": grid.repeats,
            "base_seed": grid.base_seed,
            "seeds": grid.seeds,
            "error_model": jsonable(em_dict),
            "config": cfg,
            "fingerprint": fingerprint,
            "evaluation": {
                "n_test": n_known,
                **evaluation.settings(),
                "count_failures": bool(count_failures),
                **({"count_dues": True} if detects_errors(template) else {}),
                "patterns_per_pass": per_pass,
                "seed_scheme": "pattern r uses seed base_seed + r at every BER",
                "data_fingerprint": "identity" if evaluation.identity is not None else "sha256",
            },
            "metric": jsonable(evaluation.metric.to_dict(), "metric"),
            "qmargin_version": qmargin.__version__,
        }
        if weights is not None:
            settings["weights"] = dict(weights)
        if protection is not None:
            settings["protection"] = jsonable(protection, "protection plan")
        if ci_halfwidth is not None:
            settings["stopping"] = StoppingRule(ci_halfwidth, min_patterns, per_pass).to_dict()
        if activations is not None:
            act = activations.to_dict(getattr(getattr(template, "selection", None), "protected_bits", ()))
            if evaluation.in_memory:
                act["batch_size"] = evaluation.batch_size
            settings["activations"] = jsonable(act, "activation settings")
        path = Path(out_path) if out_path is not None else None
        old = _stored(path, overwrite)
        pending = ([] if known else ["fingerprint.data_sha256"]) + ([] if n_known else ["evaluation.n_test"])
        if old is not None and path is not None and old.get("shard") != _shard_dict(shard):
            if not overwrite:
                raise ConfigError(
                    f"{path} holds {_shard_text(old.get('shard'))}, this run is {_shard_text(shard)}; "
                    "use another output path or overwrite"
                )
            old = None
        if old is not None and path is not None:
            diff = settings_diff(old, settings, skip=pending)
            if diff:
                if not overwrite:
                    raise _mismatch(path, diff)
                old = None
        state = CampaignState(grid, settings, shard=shard)
        t_start = time.perf_counter()
        job = CellJob(model, evaluation, template, bool(count_failures), per_pass, activations)
        started = old is None  # every cell is pending: workers start while the clean pass runs here
        if started:
            executor.start(job)

        def elapsed() -> float:
            return time.perf_counter() - t_start

        if old is None or pending:
            clean = evaluate_clean(
                model,
                evaluation,
                count_failures=count_failures,
                fingerprint=known is None,
                activations=activations,
            )
            if known is None:
                fingerprint["data_sha256"] = clean.data_sha256
            if n_known is None:
                settings["evaluation"]["n_test"] = clean.n
            if old is not None and path is not None:
                diff = settings_diff(old, settings)
                if diff:
                    if not overwrite:
                        raise _mismatch(path, diff)
                    old = None
            if old is None:
                state.record_clean(clean)
        if old is not None:
            state.resume_from(old)
        elif path is not None:
            state.write(path, elapsed())

        n_test = settings["evaluation"]["n_test"]
        done = state.done
        # Rounds: without a stopping rule one round holds every pending cell; with one, each round
        # holds the cells up to the next checkpoint of every BER still running (store.CampaignState).
        # A cell whose error model cannot change a bit (BER 0 of a plain grid) is the clean pass: its
        # outcome is the clean one, exactly, without a pass over the data.
        null_bers = {b for b in grid.bers if is_null_cell(template, activations, b)}
        while cells := [grid.cell(k, r) for k, r in state.pending()]:  # BER-major: a sequential order
            clean_like = [c for c in cells if c.ber in null_bers]
            cells = [c for c in cells if c.ber not in null_bers]
            if not started and cells:
                executor.start(job)
                started = True
            outcomes = itertools.chain(
                (_clean_outcome(c, state, n_test) for c in clean_like), executor.map(cells) if cells else ()
            )
            for outcome in outcomes:
                if outcome.result.n != n_test:
                    raise DataError(
                        f"the data changed between passes: {n_test} samples, then {outcome.result.n}"
                    )
                state.record(outcome)
                done += 1
                if path is not None:
                    state.write(path, elapsed())  # as outcomes arrive: a rerun resumes from here
                if progress is not None:
                    c = outcome.cell
                    assert c is not None
                    progress(CampaignProgress(done, state.total, c.ber, c.pattern, c.seed, outcome.value))
        result = state.result(elapsed())
        if path is not None:
            write_text_atomic(path, dumps(result))
            write_text_atomic(campaign_csv_path(path), csv_text(result))
        return result


def _clean_outcome(cell: Any, state: CampaignState, n_test: int) -> CellOutcome:
    """The outcome of a cell that cannot change a bit: the clean value (and failures) as recorded."""
    assert state.clean_value is not None
    failures = state.clean_failures if state.clean_failures is not None else 0
    return CellOutcome(cell, PassResult(state.clean_value, 1, int(failures), int(n_test)))


def _check_shard(shard: Any, cells: int) -> tuple[int, int] | None:
    """``(I, N)`` with ``1 <= I <= N <= cells``, or a one-line ``ConfigError``."""
    if shard is None:
        return None
    if (
        not isinstance(shard, tuple | list)
        or len(shard) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        or not 1 <= shard[0] <= shard[1]
    ):
        raise ConfigError(f"shard must be (I, N) with 1 <= I <= N, got {shard!r}")
    if shard[1] > cells:
        raise ConfigError(
            f"shard {shard[0]}/{shard[1]}: the grid has only {cells} cells; use at most {cells} shards"
        )
    return int(shard[0]), int(shard[1])


def _shard_dict(shard: tuple[int, int] | None) -> dict[str, int] | None:
    return None if shard is None else {"index": shard[0], "count": shard[1]}


def _shard_text(shard: Any) -> str:
    if isinstance(shard, dict):
        return f"shard {shard.get('index')}/{shard.get('count')}"
    if isinstance(shard, tuple):
        return f"shard {shard[0]}/{shard[1]}"
    return "the whole campaign"


def _stored(path: Path | None, overwrite: bool) -> dict[str, Any] | None:
    """The existing result at ``path`` (upgraded to the current schema), ``None`` when absent."""
    if path is None or not path.exists():
        return None
    try:
        return upgrade(load_campaign(path))
    except CheckpointError as err:
        if overwrite:
            return None
        raise ConfigError(
            f"{path} exists and is not a valid campaign result ({err}); pass overwrite to replace it"
        ) from None


def stress(
    model: nn.Module,
    data: Any,
    *,
    bers: Sequence[float],
    repeats: int = DEFAULT_REPEATS,
    metric: Any = "top1",
    base_seed: int = 0,
    error_model: Any = None,
    out: str | Path | None = None,
    identity: str | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    patterns_per_pass: int = 1,
    count_failures: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[CampaignProgress], None] | None = None,
    config: dict[str, Any] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    shard: tuple[int, int] | None = None,
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
    activations: ActivationSetup | None = None,
) -> dict[str, Any]:
    """Stress-test a quantized ``model`` under random bit errors: the one call for the common case.

    ``data`` is ``(x, y)`` tensors, any re-iterable of ``(inputs, targets)`` batches (a
    ``torch.utils.data.DataLoader``; inputs a tensor, tuple or dict) or a factory of one; it is
    streamed, never held. ``metric``: ``"top1"`` (default), ``"topK"`` (e.g. ``"top5"``),
    ``"cross_entropy"``, or a callable ``fn(outputs, targets) -> (sum, count)``. Pattern ``r`` is
    seeded ``base_seed + r`` at every BER. ``out``: a JSON file to write and resume. ``identity``
    names the data instead of hashing it. ``workers=N``: the cells on ``N`` local Ray workers
    (``pip install 'qmargin[ray]'``; the data must be picklable), ``ray_address``: on a cluster,
    ``shard=(I, N)``: one shard. ``ci_halfwidth=h``: at each BER stop adding patterns once the 95%
    confidence interval of the mean is at most ``h`` wide on each side (metric units: 0.005 = half a
    point of accuracy), ``repeats`` the cap. ``activations``: quantized activation buffers with bit
    errors (:class:`qmargin.engine.activations.ActivationSetup`). Everything else as
    :func:`run_campaign`.

    Returns the result dict: ``clean_accuracy`` and per BER ``accuracies`` (top-1) or
    ``clean_value`` / ``values`` (other metrics) with ``mean``/``std``/``min``/``max``, the
    settings and ``metric`` (name, ``higher_is_better``).
    """
    evaluation = Evaluation(data, metric, identity=identity, batch_size=batch_size, device=device)
    return run_campaign(
        model,
        evaluation,
        bers=bers,
        repeats=repeats,
        base_seed=base_seed,
        error_model=error_model,
        out_path=out,
        config=config,
        progress=progress,
        count_failures=count_failures,
        overwrite=overwrite,
        patterns_per_pass=patterns_per_pass,
        workers=workers,
        ray_address=ray_address,
        shard=shard,
        ci_halfwidth=ci_halfwidth,
        min_patterns=min_patterns,
        activations=activations,
    )
