"""``qmargin sensitivity``: which layers and bit positions of a model are sensitive to bit errors.

Loads the model the way ``qmargin evaluate`` does (a run directory of ``qmargin train``: its
weights, test split and quantizer, a float run quantized after training; or a user's own network:
:mod:`qmargin.experiments.external`, the same factory, weights, quantization and data specs), runs
:func:`qmargin.engine.sensitivity.sensitivity` and writes the result: JSON, a CSV beside it and a
PNG (heat map or bar chart, :mod:`qmargin.report.sensitivity`), each atomically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmargin.data import load_dataset
from qmargin.data.specs import ImageOptions
from qmargin.engine import Evaluation
from qmargin.engine.sensitivity import DEFAULT_CACHE_BYTES, sensitivity
from qmargin.engine.store import dumps
from qmargin.errors import ConfigError
from qmargin.experiments.campaign import weights_record
from qmargin.experiments.evaluate import (
    DEFAULT_PTQ_BITS,
    error_model_for,
    metric_from_spec,
    post_training_quantized,
    run_input_files,
)
from qmargin.experiments.external import QuantOptions, external_input_files, open_external
from qmargin.faults import BitErrorModel
from qmargin.files import check_outputs, holds_lock, write_text_atomic
from qmargin.report.sensitivity import plot_sensitivity, sensitivity_csv
from qmargin.training import load_run, resolve_device
from qmargin.training.checkpoint import MODEL_FILE

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "sensitivity_run",
    "sensitivity_external",
    "output_paths",
    "write_sensitivity",
    "Target",
    "load_run_target",
    "load_external_target",
]


@dataclass
class Target:
    """A model ready for a bit-error analysis: the model, its evaluation (data and metric), the
    template error model (which stored tensors are hit), the configuration to record and the record
    of its weights file. What ``sensitivity`` and ``protect`` load, one way for both."""

    model: nn.Module
    evaluation: Evaluation
    template: BitErrorModel
    config: dict[str, Any]
    weights: dict[str, str] | None
    run_config: Any = None


def load_run_target(
    run_dir: str | Path,
    *,
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    batch_size: int = 1024,
    device: str = "auto",
    data_dir: str | Path | None = None,
    ptq_bits: int | None = None,
    metric: Any = "top1",
) -> Target:
    """A run directory of ``qmargin train`` on its test split, as ``qmargin evaluate`` loads it (a
    float run quantized to ``ptq_bits``, default 8; ``ptq_bits`` on a quantized run is an error)."""
    dev = resolve_device(device)
    model, config, _ = load_run(run_dir, device=dev)
    extra: dict[str, Any] = {}
    if not config.quantized:
        bits = DEFAULT_PTQ_BITS if ptq_bits is None else ptq_bits
        model = post_training_quantized(model, config, bits).to(dev)
        extra["ptq_bits"] = bits
    elif ptq_bits is not None:
        raise ConfigError(
            f"{run_dir}: a {config.bits}-bit run is analysed on its stored codes; --bits is for float runs"
        )
    data = load_dataset(config.dataset, data_dir=data_dir or config.data_dir)
    template = error_model_for(layers=layers, include_bias=include_bias)
    assert isinstance(template, BitErrorModel)  # no protect spec: a plain template
    evaluation = Evaluation(
        (data.x_test, data.y_test), metric_from_spec(metric), batch_size=batch_size, device=dev
    )
    return Target(
        model,
        evaluation,
        template,
        {"run_dir": str(run_dir), **config.to_dict(), **extra},
        weights_record(Path(run_dir) / MODEL_FILE),
        config,
    )


def load_external_target(
    model_spec: str,
    data_spec: str,
    *,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    quant: QuantOptions | None = None,
    image: ImageOptions | None = None,
    include_bias: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: str | Path | None = None,
    metric: Any = "top1",
    data_identity: str | None = None,
) -> Target:
    """A user's own network (built, loaded and quantized by
    :func:`qmargin.experiments.external.load_external_model`) on a data spec, streamed."""
    quant = quant or QuantOptions()
    ext, source, resolved, dev = open_external(
        model_spec, data_spec, model_args=model_args, weights=weights, quant=quant, image=image,
        batch_size=batch_size, device=device, data_dir=data_dir, metric=metric,
    )  # fmt: skip
    template = error_model_for(
        layers=tuple(quant.layers) if ext.mode == "given" else ("*",), include_bias=include_bias
    )
    assert isinstance(template, BitErrorModel)  # no protect spec: a plain template
    if ext.mode == "given" and quant.exclude:
        template = dataclasses.replace(template, exclude=tuple(quant.exclude))
    evaluation = Evaluation(source.loader, resolved, identity=data_identity, device=dev)
    return Target(
        ext.model,
        evaluation,
        template,
        {**ext.config, "data": data_spec, "data_source": source.describe},
        ext.weights,
    )


def output_paths(out_path: str | Path, plot: bool = True) -> dict[str, Path]:
    """The files a sensitivity result is written to: the JSON, its CSV and (``plot``) PNG beside it."""
    out = Path(out_path)
    paths = {"result JSON (--out)": out, "CSV": out.with_suffix(".csv")}
    if plot:
        paths["plot"] = out.with_suffix(".png")
    return paths


def write_sensitivity(result: Mapping[str, Any], out_path: str | Path, *, plot: bool = True) -> list[Path]:
    """Write ``result`` as JSON, CSV (and PNG) beside each other, each atomically; returns the paths."""
    paths = output_paths(out_path, plot)
    out = paths["result JSON (--out)"]
    write_text_atomic(out, dumps(dict(result)))
    write_text_atomic(paths["CSV"], sensitivity_csv(result))
    if plot:
        plot_sensitivity(result, paths["plot"])
    return list(paths.values())


@holds_lock("out_path", kind="file")
@holds_lock("run_dir", shared=True)
def sensitivity_run(
    run_dir: str | Path,
    *,
    ber: float,
    by: str = "layer",
    patterns: int = 10,
    base_seed: int = 100,
    out_path: str | Path | None = None,
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    batch_size: int = 1024,
    device: str = "auto",
    data_dir: str | Path | None = None,
    ptq_bits: int | None = None,
    metric: Any = "top1",
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    plot: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Sensitivity of a trained run (``qmargin train``) on its test split; written to ``out_path``
    (JSON + CSV + PNG) when given. A float run is quantized to ``ptq_bits`` (default 8) first, as
    ``qmargin evaluate`` does; ``ptq_bits`` on a quantized run is an error."""
    if out_path is not None:
        check_outputs(output_paths(out_path, plot), inputs=run_input_files(run_dir))
    target = load_run_target(
        run_dir,
        layers=layers,
        include_bias=include_bias,
        batch_size=batch_size,
        device=device,
        data_dir=data_dir,
        ptq_bits=ptq_bits,
        metric=metric,
    )
    model, evaluation, template = target.model, target.evaluation, target.template
    result = sensitivity(
        model,
        evaluation,
        ber=ber,
        by=by,
        patterns=patterns,
        base_seed=base_seed,
        template=template,
        reuse=reuse,
        cache_bytes=cache_bytes,
        config=target.config,
        weights=target.weights,
        progress=progress,
    )
    if out_path is not None:
        write_sensitivity(result, out_path, plot=plot)
    return result


@holds_lock("out_path", kind="file")
def sensitivity_external(
    model_spec: str,
    data_spec: str,
    *,
    ber: float,
    out_path: str | Path,
    by: str = "layer",
    patterns: int = 10,
    base_seed: int = 100,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    quant: QuantOptions | None = None,
    image: ImageOptions | None = None,
    include_bias: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: str | Path | None = None,
    metric: Any = "top1",
    data_identity: str | None = None,
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    plot: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Sensitivity of a user's own network (built, loaded and quantized by
    :func:`qmargin.experiments.external.load_external_model`) on a data spec, streamed."""
    check_outputs(output_paths(out_path, plot), inputs=external_input_files(weights, data_spec))
    target = load_external_target(
        model_spec,
        data_spec,
        model_args=model_args,
        weights=weights,
        quant=quant,
        image=image,
        include_bias=include_bias,
        batch_size=batch_size,
        device=device,
        data_dir=data_dir,
        metric=metric,
        data_identity=data_identity,
    )
    result = sensitivity(
        target.model,
        target.evaluation,
        ber=ber,
        by=by,
        patterns=patterns,
        base_seed=base_seed,
        template=target.template,
        reuse=reuse,
        cache_bytes=cache_bytes,
        config=target.config,
        weights=target.weights,
        progress=progress,
    )
    write_sensitivity(result, out_path, plot=plot)
    return result
