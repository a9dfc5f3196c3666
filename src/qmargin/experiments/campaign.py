"""Bit-error evaluation campaigns on in-memory test sets: the experiments' door to
:mod:`qmargin.engine` (design.md §4).

:func:`run_ber_campaign` is :func:`qmargin.engine.run_campaign` on ``(x_test, y_test)`` tensors with
the top-1 metric (or another); the seed scheme (pattern ``r`` uses ``base_seed + r`` at every BER and
for every model: paired comparisons), the convergence protocol (non-converged samples count as
errors and in ``"failures"``), resume and the file format are the engine's
(:mod:`qmargin.engine.store`). This module adds the record of the weights file a result belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.engine import CampaignProgress, Evaluation, run_campaign
from qmargin.engine.activations import ActivationSetup
from qmargin.engine.stopping import DEFAULT_MIN_PATTERNS
from qmargin.engine.store import (
    SETTINGS_KEYS,
    campaign_csv_path,
    csv_text,
    dumps,
    file_sha256,
    load_campaign,
    merge_results,
    summarize_accuracies,
    validate_campaign,
)
from qmargin.errors import CheckpointError, ConfigError
from qmargin.files import check_outputs, holds_lock, sigint_deferred, write_text_atomic

__all__ = [
    "CampaignProgress",
    "SETTINGS_KEYS",
    "run_ber_campaign",
    "load_campaign",
    "validate_campaign",
    "campaign_csv_path",
    "weights_record",
    "check_result_weights",
    "summarize_accuracies",
    "merge_campaigns",
]


def weights_record(weights_file: str | Path) -> dict[str, str]:
    """``{"file": absolute path, "sha256": ...}`` of the weights a result is computed from; stored in
    the result (``"weights"``) so that it is never shown for other weights (:func:`check_result_weights`)."""
    p = Path(weights_file)
    return {"file": str(p.resolve()), "sha256": file_sha256(p)}


def check_result_weights(result: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Refuse a stored result whose weights file now holds other weights (the run was retrained since)
    with a one-line :class:`CheckpointError`; return ``result``. Results without a record (older
    files, campaigns on models that are not run directories) and weights files that are gone pass."""
    rec = result.get("weights")
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
        return result
    weights = Path(rec["file"])
    if weights.is_file() and file_sha256(weights) != rec.get("sha256"):
        raise CheckpointError(
            f"{path}: these results belong to other weights than {weights} now holds (the run was "
            "trained again); evaluate it again"
        )
    return result


@holds_lock("out_path", kind="file")  # one process per result file, for the whole campaign
def run_ber_campaign(
    model: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    *,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    error_model: Any = None,
    batch_size: int = 1024,
    out_path: str | Path | None = None,
    config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[CampaignProgress], None] | None = None,
    count_failures: bool | None = None,
    overwrite: bool = False,
    patterns_per_pass: int = 1,
    weights: dict[str, str] | None = None,
    metric: Any = "top1",
    workers: int | None = None,
    ray_address: str | None = None,
    shard: tuple[int, int] | None = None,
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
    activations: ActivationSetup | None = None,
) -> dict[str, Any]:
    """Accuracy (or ``metric``) of a quantized model under random bit errors on the test tensors
    ``x_test``, ``y_test`` (batches of ``batch_size`` on ``device``); every other argument as
    :func:`qmargin.engine.run_campaign`. Returns its result dict (``clean_accuracy``, per BER
    ``accuracies`` with ``mean``/``std``/``min``/``max``, settings, ``status``, ``timing``)."""
    evaluation = Evaluation((x_test, y_test), metric, batch_size=batch_size, device=device)
    return run_campaign(
        model,
        evaluation,
        bers=bers,
        repeats=repeats,
        base_seed=base_seed,
        error_model=error_model,
        out_path=out_path,
        config=config,
        progress=progress,
        count_failures=count_failures,
        overwrite=overwrite,
        patterns_per_pass=patterns_per_pass,
        weights=weights,
        workers=workers,
        ray_address=ray_address,
        shard=shard,
        ci_halfwidth=ci_halfwidth,
        min_patterns=min_patterns,
        activations=activations,
    )


@holds_lock("out_path", kind="file")  # one writer of the merged result
def merge_campaigns(
    shards: Sequence[str | Path], out_path: str | Path, *, allow_partial: bool = False
) -> dict[str, Any]:
    """Merge the results of ``--shard I/N`` runs (or any results holding disjoint cells of one
    campaign) into ``out_path`` (JSON, and the CSV beside it), identical to a sequential run's result
    apart from ``timing``: :func:`qmargin.engine.store.merge_results` (one-line ``ConfigError`` when
    settings differ, a cell is given twice, or cells are missing unless ``allow_partial``, which
    writes a ``partial`` result that the campaign resumes). Every input is validated
    (:func:`load_campaign`); the outputs are checked against the inputs, locked and written
    atomically (the JSON and the CSV together, Ctrl-C held back between them)."""
    paths = [Path(p) for p in shards]
    if not paths:
        raise ConfigError("nothing to merge: give the shard results")
    check_outputs({"merged JSON": out_path, "CSV": campaign_csv_path(out_path)}, inputs=paths)
    seen: dict[str, Path] = {}
    for p in paths:
        key = str(p.resolve())
        if key in seen:
            raise ConfigError(f"{p} is given twice")
        seen[key] = p
    merged = merge_results([(str(p), load_campaign(p)) for p in paths], allow_partial=allow_partial)
    with sigint_deferred():
        write_text_atomic(out_path, dumps(merged))
        write_text_atomic(campaign_csv_path(out_path), csv_text(merged))
    return merged
