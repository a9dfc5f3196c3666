"""Runs as the experiments and the command line use them: train one run, train-then-stress, datasets.

* :func:`train_and_stress` is the sequence the demo, the MCEL reproduction and the MCEL ablation
  share: train a :class:`TrainConfig` into a resumable run directory, then a paired bit-error
  campaign on its model (``RUN/ber.json``), the patterns seeded from :data:`PATTERN_BASE_SEED`.
* :func:`train_run`, :func:`load_dataset`, :class:`TrainConfig` and :func:`list_datasets` are what
  ``qmargin train`` / ``qmargin datasets`` need, so that ``qmargin.cli`` imports only ``experiments``
  (and ``report``), never ``training`` or ``data`` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmargin.data import Dataset, available_datasets, dataset_info, load_dataset, locate_dataset
from qmargin.engine.stopping import DEFAULT_MIN_PATTERNS
from qmargin.experiments.campaign import run_ber_campaign
from qmargin.models import check_model_kwargs, hidden_kwargs
from qmargin.training import TrainConfig, TrainResult
from qmargin.training import train as train_run

__all__ = [
    "PATTERN_BASE_SEED",
    "Stressed",
    "train_and_stress",
    "TrainConfig",
    "TrainResult",
    "train_run",
    "load_dataset",
    "list_datasets",
    "hidden_kwargs",
    "check_model_kwargs",
]

PATTERN_BASE_SEED = 100
"""Default base seed of the bit-error patterns: pattern ``r`` uses seed ``PATTERN_BASE_SEED + r``, the
same for every model of an experiment (paired comparison). Also ``qmargin evaluate --seed``'s default."""


@dataclass(frozen=True)
class Stressed:
    """A trained run and its bit-error campaign (the plain result dict of :func:`run_ber_campaign`)."""

    result: TrainResult
    campaign: dict[str, Any]


def train_and_stress(
    config: TrainConfig,
    data: Dataset,
    run_dir: str | Path,
    *,
    bers: Sequence[float],
    repeats: int,
    error_model: Any,
    base_seed: int = PATTERN_BASE_SEED,
    device: str = "cpu",
    on_trained: Callable[[TrainResult], None] | None = None,
    result_name: str = "ber.json",
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
) -> Stressed:
    """Train ``config`` into ``run_dir`` (resumes; a finished run is reused), call ``on_trained``, then
    run the paired campaign ``bers`` x ``repeats`` on the model, stored in ``run_dir/result_name``
    (``ci_halfwidth`` / ``min_patterns``: sequential stopping, :func:`qmargin.engine.run_campaign`).

    ``error_model`` is the campaign's template (:func:`qmargin.experiments.evaluate.error_model_for`)."""
    run_dir = Path(run_dir)
    result = train_run(config, dataset=data, out_dir=run_dir)
    if on_trained is not None:
        on_trained(result)
    campaign = run_ber_campaign(
        result.model,
        data.x_test,
        data.y_test,
        bers=bers,
        repeats=repeats,
        base_seed=base_seed,
        error_model=error_model,
        out_path=run_dir / result_name,
        config=result.config.to_dict(),
        device=device,
        ci_halfwidth=ci_halfwidth,
        min_patterns=min_patterns,
    )
    return Stressed(result, campaign)


def list_datasets(*, locate: bool = False, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every registered dataset as its plain ``DatasetInfo.to_dict()``, sorted by name; with
    ``locate``, each also under ``"location"``: where its files were found or why not
    (:func:`qmargin.data.locate_dataset`)."""
    out = []
    for name in available_datasets():
        d = dataset_info(name).to_dict()
        if locate:
            d["location"] = locate_dataset(name, data_dir)
        out.append(d)
    return out
