"""``qmargin evaluate``: a bit-error campaign on a trained run directory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmargin.data import dataset_info, load_dataset
from qmargin.data.specs import load_object
from qmargin.engine.activations import ActivationSetup, activation_layers, parse_calibration
from qmargin.engine.metrics import Metric, resolve_metric
from qmargin.engine.stopping import DEFAULT_MIN_PATTERNS
from qmargin.errors import ConfigError
from qmargin.experiments.campaign import run_ber_campaign, weights_record
from qmargin.faults import WEIGHT_TENSORS, BitErrorModel, ProtectedErrorModel, ProtectionSpec
from qmargin.files import check_outputs, holds_lock
from qmargin.quant import QuantSpec
from qmargin.training import load_run, resolve_device
from qmargin.training.checkpoint import CONFIG_FILE, INTEGER_FILE, METRICS_FILE, MODEL_FILE

if TYPE_CHECKING:
    from torch import Tensor, nn

    from qmargin.training import TrainConfig

__all__ = [
    "evaluate_run",
    "error_model_for",
    "protection_spec_text",
    "post_training_quantized",
    "run_input_files",
    "DEFAULT_PTQ_BITS",
    "metric_from_spec",
    "halfwidth_in_metric_units",
    "ActivationOptions",
    "activation_setup",
    "DEFAULT_CALIBRATION_BATCHES",
]

DEFAULT_CALIBRATION_BATCHES = 4
"""Batches of the evaluation batch size that calibrate activation ranges (``--act-calibration-batches``)."""


@dataclass(frozen=True)
class ActivationOptions:
    """``--act-bits`` and friends: quantized activation buffers with bit errors in a campaign.

    ``bits``: activation codes (2..8, symmetric two's complement, per tensor), the outputs of the
    quantized layers ``--layers`` selects; ``calibration``: ``"minmax"`` or ``"percentile:Q"``;
    ``calibration_batches``: how many batches of the evaluation batch size calibrate the ranges (of
    the training data for a run directory, of the test data for ``--model``); ``ber``: a fixed
    activation BER in every cell (``--act-ber``; 0: no activation errors), ``None`` for the grid's
    BER (``--act-ber-follows``); ``only``: activation errors only, at the grid's BER, weights clean
    (``--act-only``). Semantics: :mod:`qmargin.engine.activations`.
    """

    bits: int
    calibration: str = "minmax"
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES
    ber: float | None = 0.0
    only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"--act-bits must be in 2..8, got {self.bits!r}")
        parse_calibration(self.calibration)
        cb = self.calibration_batches
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 1:
            raise ConfigError(f"--act-calibration-batches must be a positive integer, got {cb!r}")
        if self.only and self.ber is not None:
            raise ConfigError("--act-only takes the activation BER from the --ber grid; drop --act-ber")


def activation_setup(
    model: nn.Module,
    options: ActivationOptions | None,
    inputs: Iterable[Tensor],
    *,
    source: str,
    batch_size: int | None,
    layers: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> ActivationSetup | None:
    """Calibrate the activation buffers of ``model`` (the outputs of its quantized layers matching
    ``layers`` and not ``exclude``) on the input batches ``inputs`` (``source`` says what they are;
    at most ``options.calibration_batches`` are used); ``None`` without options."""
    if options is None:
        return None
    names = activation_layers(model, layers, exclude)
    method, q = parse_calibration(options.calibration)

    def first() -> Iterable[Tensor]:
        for i, x in enumerate(inputs):
            if i >= options.calibration_batches:
                return
            yield x

    return ActivationSetup.calibrate(
        model,
        QuantSpec(options.bits),
        first(),
        layers=names,
        method=method,
        percentile=q,
        source=source,
        ber=None if options.only else options.ber,
        weights=not options.only,
        batch_size=batch_size,
    )


DEFAULT_PTQ_BITS = 8
"""Bit width a float run (``--bits 32``) is quantized to before a campaign, unless told otherwise."""


def error_model_for(
    *,
    protected_bits: Sequence[int] = (),
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    p01: float | None = None,
    p10: float | None = None,
    storage: str | None = None,
    saturate: bool | None = None,
    nested_bers: Sequence[float] | None = None,
    protect: str | None = None,
) -> BitErrorModel | ProtectedErrorModel:
    """The campaign's template ``BitErrorModel`` (its BER is replaced per grid point).

    ``protect``: a per-layer protection spec (``secded64``, ``conv*=msb2,fc3=secded64``;
    :mod:`qmargin.faults.protection`): the template is then a ``ProtectedErrorModel`` over the same
    layers and tensors. ``msbK`` is the spec form of ``protected_bits`` (the top K positions), so
    giving both is refused: one way of saying which bits are safe.

    Weights only by default (``WEIGHT_TENSORS``: ``weight`` of Linear/Conv layers, ``W`` and ``U`` of
    MonDEQ layers); ``include_bias`` hits every stored tensor, which includes biases stored as codes.
    ``storage`` / ``saturate`` override the word format of the run's specs (``None``: theirs);
    ``nested_bers`` (the campaign's grid) asks for nested patterns, ``nested_max = max(nested_bers)``
    (docs/bit-conventions.md). All three are recorded in the template's ``to_dict`` when set.
    """
    nested_max = None
    if nested_bers is not None:
        nested_max = max((float(b) for b in nested_bers), default=0.0)
        if nested_max <= 0.0:
            raise ConfigError("nested patterns need a positive BER in the grid")
    tensors = None if include_bias else WEIGHT_TENSORS
    if protect is not None:
        if protected_bits:
            raise ConfigError(
                "give --protect or --protected-bits, not both (--protect msbK protects the top K bits; "
                "put every scheme in the --protect spec)"
            )
        if p01 is not None or p10 is not None:
            raise ConfigError("--protect takes a symmetric BER (no p01 / p10)")
        return ProtectedErrorModel(
            protect,  # type: ignore[arg-type]  # the text is parsed (ConfigError) by the model
            ber=0.0,
            layers=tuple(layers) or ("*",),
            tensors=tensors,
            storage=storage,  # type: ignore[arg-type]  # validated (ConfigError) by the model
            saturate=saturate,
            nested_max=nested_max,
        )
    return BitErrorModel(
        ber=0.0,
        p01=p01,
        p10=p10,
        protected_bits=tuple(protected_bits),
        layers=tuple(layers) or ("*",),
        tensors=tensors,
        storage=storage,  # type: ignore[arg-type]  # validated (ConfigError) by BitErrorModel
        saturate=saturate,
        nested_max=nested_max,
    )


def protection_spec_text(text: str) -> str:
    """The canonical text of a ``--protect`` spec (:class:`qmargin.faults.ProtectionSpec`); a
    one-line ``ConfigError`` for a bad one (what the CLI's option type checks while parsing)."""
    return ProtectionSpec.parse(text).text


def run_input_files(path: str | Path) -> list[Path]:
    """The files a command reads from ``path``: a run directory's weights, config and metrics, or
    ``path`` itself. No output may be one of them (:func:`qmargin.files.check_output`)."""
    p = Path(path)
    if p.is_dir():
        return [p / name for name in (CONFIG_FILE, MODEL_FILE, INTEGER_FILE, METRICS_FILE)]
    return [p]


def halfwidth_in_metric_units(halfwidth: float | None, metric: Metric) -> float | None:
    """``--ci-halfwidth`` as the user writes it (percentage points for a metric whose values are
    fractions, such as the accuracies: 0.5 = half a point) in the units the campaign stores
    (``0.005``); other metrics are taken in their own units."""
    if halfwidth is None:
        return None
    return halfwidth / 100.0 if metric.fraction else halfwidth


def metric_from_spec(spec: str | Metric) -> Metric:
    """The metric named on the command line: a built-in (``top1``, ``topK`` such as ``top5``,
    ``cross_entropy``; :func:`qmargin.engine.metrics.resolve_metric`) or ``pkg.module:name`` /
    ``file.py:name`` naming a :class:`~qmargin.engine.metrics.Metric` or a callable
    ``fn(outputs, targets) -> (sum, count)`` (higher is better; define a ``Metric`` for the other
    direction). Anything else is a one-line ``ConfigError``."""
    if isinstance(spec, Metric):
        return spec
    if ":" not in spec:
        return resolve_metric(spec)
    obj = load_object(spec, what="metric", error=ConfigError)
    if isinstance(obj, Metric):
        return obj
    if not callable(obj):
        raise ConfigError(f"metric {spec!r} is a {type(obj).__name__}, not a Metric or a callable")
    return Metric.from_callable(obj, name=spec)


@holds_lock("out_path", kind="file")  # one campaign per result file, for the whole run
@holds_lock("run_dir", shared=True)  # readers share the run; a training into it is refused meanwhile
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
    ptq_bits: int | None = None,
    patterns_per_pass: int = 1,
    storage: str | None = None,
    saturate: bool | None = None,
    nested: bool = False,
    metric: Any = "top1",
    workers: int | None = None,
    ray_address: str | None = None,
    shard: tuple[int, int] | None = None,
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
    activations: ActivationOptions | None = None,
    protect: str | None = None,
) -> dict[str, Any]:
    """Load ``run_dir`` (``qmargin train``), run a BER campaign on its test split and return the result.

    Accuracy counts a sample as wrong when a MonDEQ solve does not converge; the per-pattern number
    of such samples is stored under ``failures``. A float run (``bits=32``) has no stored codes: it is
    first quantized post-training to ``ptq_bits`` (default :data:`DEFAULT_PTQ_BITS`) with the run's
    quantizer settings, and the result records ``config["ptq_bits"]``. ``ptq_bits`` on a quantized run
    is an error (its stored codes are what is evaluated).

    ``storage`` / ``saturate`` choose the memory's word format and decode for this campaign (the
    codes are the run's; ``None`` keeps the specs'), ``nested`` draws nested patterns across the grid
    (:func:`error_model_for`); they are recorded in the result's ``error_model`` settings, so a
    resume with other choices is refused. ``metric``: top-1 by default, or any metric of
    :func:`metric_from_spec` (a name or ``pkg.module:name``). ``workers`` / ``ray_address`` /
    ``shard``: where the cells run and which; ``ci_halfwidth`` / ``min_patterns``: sequential
    stopping (:func:`qmargin.engine.run_campaign`), the half-width as shown
    (:func:`halfwidth_in_metric_units`: percentage points for the accuracies). ``activations``:
    quantized activation buffers with bit errors (:class:`ActivationOptions`), calibrated on the
    first ``calibration_batches * batch_size`` samples of the run's *training* split (recorded as
    ``activations.calibration.source``). ``protect``: per-layer
    protection spec (:func:`error_model_for`); the result then holds ``protection`` (plan, overhead).
    """
    if out_path is not None:
        check_outputs(
            {"result JSON": out_path, "CSV": Path(out_path).with_suffix(".csv")},
            inputs=run_input_files(run_dir),
        )
    dev = resolve_device(device)
    model, config, _ = load_run(run_dir, device=dev)
    weights = weights_record(Path(run_dir) / MODEL_FILE)  # the result is only shown for these weights
    extra: dict[str, Any] = {}
    if not config.quantized:
        bits = DEFAULT_PTQ_BITS if ptq_bits is None else ptq_bits
        model = post_training_quantized(model, config, bits).to(dev)
        extra["ptq_bits"] = bits
    elif ptq_bits is not None:
        raise ConfigError(
            f"{run_dir}: a {config.bits}-bit run is evaluated on its stored codes; --bits is for float runs"
        )
    data = load_dataset(config.dataset, data_dir=data_dir or config.data_dir)
    setup = None
    if activations is not None:
        model.eval()
        n_cal = min(int(data.x_train.shape[0]), activations.calibration_batches * batch_size)
        x_cal = data.x_train[:n_cal]
        setup = activation_setup(
            model,
            activations,
            (b.to(dev) for b in x_cal.split(batch_size)),
            source=f"the first {n_cal} samples of the {config.dataset} training split",
            batch_size=batch_size,
            layers=layers,
        )
    template = error_model_for(
        protected_bits=protected_bits,
        layers=layers,
        include_bias=include_bias,
        storage=storage,
        saturate=saturate,
        nested_bers=bers if nested else None,
        protect=protect,
    )
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
        config={"run_dir": str(run_dir), **config.to_dict(), **extra},
        device=dev,
        progress=progress,
        overwrite=overwrite,
        patterns_per_pass=patterns_per_pass,
        weights=weights,
        metric=(resolved := metric_from_spec(metric)),
        workers=workers,
        ray_address=ray_address,
        shard=shard,
        ci_halfwidth=halfwidth_in_metric_units(ci_halfwidth, resolved),
        min_patterns=min_patterns,
        activations=setup,
    )


def post_training_quantized(model: nn.Module, config: TrainConfig, bits: int) -> nn.Module:
    """A quantized twin of a float run's model (same architecture, ``bits``-bit weights, eval mode)."""
    from qmargin.training.factory import make_model

    if not 1 <= int(bits) <= 8:
        raise ConfigError(f"post-training quantization needs bits in 1..8, got {bits}")
    qconfig = config.replace(bits=int(bits))
    first = next(iter(model.parameters()))
    input_shape, num_classes = _shape_of(model, config)
    q = make_model(qconfig, input_shape, num_classes).to(first.device)
    q.load_state_dict(model.state_dict())
    return q.eval()


def _shape_of(model: nn.Module, config: TrainConfig) -> tuple[tuple[int, ...], int]:
    info = dataset_info(config.dataset)
    return tuple(info.input_shape), int(info.num_classes)
