"""``qmargin evaluate``: a bit-error campaign on a trained run directory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmargin.errors import ConfigError
from qmargin.experiments.campaign import run_ber_campaign

__all__ = ["evaluate_run", "error_model_for"]


def error_model_for(
    *,
    protected_bits: Sequence[int] = (),
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    p01: float | None = None,
    p10: float | None = None,
):
    """The campaign's template ``BitErrorModel`` (its BER is replaced per grid point).

    Weights only by default (``WEIGHT_TENSORS``: ``weight`` of Linear/Conv layers, ``W`` and ``U`` of
    MonDEQ layers); ``include_bias`` hits every stored tensor, which includes biases stored as codes.
    """
    from qmargin.faults import WEIGHT_TENSORS, BitErrorModel

    return BitErrorModel(
        ber=0.0,
        p01=p01,
        p10=p10,
        protected_bits=tuple(protected_bits),
        layers=tuple(layers) or ("*",),
        tensors=None if include_bias else WEIGHT_TENSORS,
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    out_path: str | Path | None = None,
    protected_bits: Sequence[int] = (),
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    batch_size: int = 1024,
    device: str = "auto",
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Load ``run_dir`` (``qmargin train``), run a BER campaign on its test split and return the result.

    Accuracy counts a sample as wrong when a MonDEQ solve does not converge; the per-pattern number
    of such samples is stored under ``failures``.
    """
    from qmargin.data import load_dataset
    from qmargin.training import load_run, resolve_device

    dev = resolve_device(device)
    model, config, _ = load_run(run_dir, device=dev)
    if not config.quantized:
        raise ConfigError(f"{run_dir}: a float model (bits=32) has no stored integer codes to corrupt")
    data = load_dataset(config.dataset, data_dir=data_dir or config.data_dir)
    template = error_model_for(protected_bits=protected_bits, layers=layers, include_bias=include_bias)
    return run_ber_campaign(
        model,
        data.x_test,
        data.y_test,
        bers=bers,
        repeats=repeats,
        base_seed=base_seed,
        error_model=template,
        batch_size=batch_size,
        out_path=out_path,
        config={"run_dir": str(run_dir), **config.to_dict()},
        device=dev,
        progress=progress,
        overwrite=overwrite,
    )
