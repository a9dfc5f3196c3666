"""Stress a user's own network: ``qmargin evaluate --model pkg.module:factory --data SPEC ...``.

The steps, each failing with a one-line :class:`qmargin.errors.UserError` before anything is written:

1. **Build**: the factory named ``pkg.module:factory`` or ``path/to/file.py:factory``
   (:func:`qmargin.data.specs.load_object`) is called with the ``--model-arg`` keywords and must
   return an ``nn.Module``. An import that fails or a factory that raises is a :class:`ConfigError`
   naming the spec and the exception's first line.
2. **Weights** (optional): a ``.safetensors`` file or a ``.pt`` / ``.pth`` state dict read by
   :func:`qmargin.weights.read_state_dict` (``torch.load(..., weights_only=True)``: a pickle payload
   is refused, never run). Loading is strict: missing, unexpected and mis-shaped entries are named
   with their shapes (:func:`check_fit`); dtypes must match and every floating tensor be finite
   (:func:`qmargin.training.validation.check_weights`, the check qmargin's own checkpoints pass).
3. **Quantize**: a float model is quantized after training (:func:`qmargin.quant.quantize_model`:
   every ``nn.Linear`` / ``nn.Conv2d`` selected by ``layers`` and not by ``exclude`` gets ``bits``-bit
   stored weights, symmetric or asymmetric, per tensor or per output channel). A model that already
   holds qmargin quantized layers is used as it is (its stored formats are what is stressed); its
   ``layers``/``exclude`` then only select the layers bit errors hit. Tensors in another quantized
   layout (``torch.ao`` quantized tensors) are refused.
4. **Stress**: a paired bit-error campaign over the data spec (:func:`qmargin.data.specs.open_data`),
   streamed through :class:`qmargin.engine.Evaluation` (never held whole in memory) with any metric
   (:func:`qmargin.experiments.evaluate.metric_from_spec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.data.specs import DataSource, ImageOptions, load_object, open_data
from qmargin.engine import Evaluation, run_campaign
from qmargin.engine.metrics import Metric
from qmargin.engine.stopping import DEFAULT_MIN_PATTERNS
from qmargin.errors import CheckpointError, ConfigError, DataError
from qmargin.experiments.campaign import weights_record
from qmargin.experiments.evaluate import (
    DEFAULT_PTQ_BITS,
    ActivationOptions,
    activation_setup,
    error_model_for,
    halfwidth_in_metric_units,
    metric_from_spec,
)
from qmargin.files import check_outputs, holds_lock
from qmargin.quant import QuantSpec, quantize_model, quantized_modules
from qmargin.training import resolve_device
from qmargin.training.validation import check_weights
from qmargin.weights import one_line, read_state_dict

__all__ = [
    "QuantOptions",
    "ExternalModel",
    "build_model",
    "check_fit",
    "load_weights",
    "check_layout",
    "quantize_external",
    "load_external_model",
    "open_external",
    "evaluate_external",
    "external_input_files",
    "ImageOptions",
]


@dataclass(frozen=True)
class QuantOptions:
    """Post-training quantization of a float model (step 3 of the module docstring).

    ``bits=None`` means :data:`qmargin.experiments.evaluate.DEFAULT_PTQ_BITS` for a float model and
    "as stored" for a model that is already quantized (an explicit ``bits`` is then an error).
    """

    bits: int | None = None
    symmetric: bool = True
    per_channel: bool = False
    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def spec(self) -> QuantSpec:
        bits = DEFAULT_PTQ_BITS if self.bits is None else self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"--bits must be in 1..8 for stored weights, got {bits!r}")
        return QuantSpec(bits=bits, symmetric=self.symmetric, per_channel=self.per_channel)

    @property
    def is_default_format(self) -> bool:
        return self.bits is None and self.symmetric and not self.per_channel


@dataclass
class ExternalModel:
    """A user's model ready to stress, and what it was built from (``config``, plain JSON)."""

    model: nn.Module
    layers: list[dict[str, Any]]
    mode: str  # "ptq" (quantized here) or "given" (already quantized)
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] | None = None


# -- build ----------------------------------------------------------------------------------------


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory ``spec`` (``pkg.module:factory`` or ``file.py:factory``) with ``kwargs``."""
    factory = load_object(spec, what="model factory", error=ConfigError)
    if not callable(factory):
        raise ConfigError(f"model factory {spec!r} is a {type(factory).__name__}, not callable")
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as e:
        raise ConfigError(f"model factory {spec!r} raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_fit(where: str | Path, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Names and shapes of ``tensors`` equal ``expected`` (a model's ``state_dict()``); else one
    :class:`CheckpointError` naming the first three missing, unexpected and mis-shaped entries."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:3]))
    if unexpected:
        parts.append("unexpected " + ", ".join(f"{k} {_shape(tensors[k])}" for k in unexpected[:3]))
    if shapes:
        parts.append(
            "shape mismatch "
            + ", ".join(f"{k} {_shape(tensors[k])} vs model {_shape(expected[k])}" for k in shapes[:3])
        )
    if parts:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped"
        raise CheckpointError(f"{where} does not fit the model ({counts}): {'; '.join(parts)}")


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a weights file into ``model`` strictly (module docstring, step 2); return its
    :func:`weights_record` (file and SHA-256, stored in the result)."""
    sd = read_state_dict(path)
    own = model.state_dict()
    check_fit(path, sd, own)
    check_weights(path, sd, own)  # dtypes (nothing is cast) and finite values
    model.load_state_dict(sd, strict=True)
    return weights_record(path)


_GIVE = "give the float model (qmargin quantizes it, --bits) or one built from qmargin.quant layers"


def check_layout(model: nn.Module) -> None:
    """Refuse tensors stored in a quantized layout qmargin does not read (``torch.ao`` quantized
    tensors): bit errors act on qmargin's stored codes (``QuantizedTensors``)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_quantized:
            raise ConfigError(
                f"unsupported quantized layout: {name} is a torch quantized tensor ({t.dtype}); {_GIVE}"
            )
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            raise ConfigError(
                f"unsupported quantized layout: layer {name!r} is a {cls.__module__}.{cls.__name__}; {_GIVE}"
            )


def _layer_rows(model: nn.Module, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    chosen = None if names is None else set(names)
    rows = []
    for name, m in quantized_modules(model):
        if chosen is not None and name not in chosen:
            continue
        for tname, spec in m.quant_specs.items():
            rows.append(
                {
                    "layer": name,
                    "kind": type(m).__name__,
                    "tensor": tname,
                    "shape": list(m.float_tensor(tname).shape),
                    "bits": spec.bits,
                    "quant": "sym" if spec.symmetric else "asym",
                    "per_channel": spec.per_channel,
                }
            )
    return rows


def quantize_external(model: nn.Module, options: QuantOptions) -> tuple[list[dict[str, Any]], str]:
    """Quantize a float model in place, or keep a quantized one (module docstring, step 3).

    Returns the layer table (one row per stored tensor: layer, kind, tensor, shape, bits, quant,
    per_channel) and the mode (``"ptq"`` or ``"given"``).
    """
    check_layout(model)
    if any(True for _ in quantized_modules(model)):
        if not options.is_default_format:
            raise ConfigError(
                "the model already holds qmargin quantized layers, which are stressed as they are stored; "
                "--bits, --quant asym and --per-channel are for float models"
            )
        return _layer_rows(model), "given"
    spec = options.spec()
    include = None if tuple(options.layers) in ((), ("*",)) else list(options.layers)
    try:
        converted = quantize_model(model, spec, include=include, exclude=list(options.exclude) or None)
    except TypeError as e:  # a bare nn.Linear / nn.Conv2d as the whole model
        raise ConfigError(f"cannot quantize the model: {one_line(e)}") from None
    if not converted:
        sel = f" matching --layers {','.join(options.layers)}" if include else ""
        sel += f" outside --exclude {','.join(options.exclude)}" if options.exclude else ""
        raise ConfigError(f"the model has no nn.Linear or nn.Conv2d layer{sel} to quantize")
    return _layer_rows(model, converted), "ptq"


def load_external_model(
    spec: str,
    *,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    quant: QuantOptions | None = None,
) -> ExternalModel:
    """Steps 1-3 of the module docstring: the model in eval mode, quantized, with its record."""
    quant = quant or QuantOptions()
    model = build_model(spec, model_args)
    check_layout(model)  # before the weights: a foreign layout's state dict is not ours to read
    record = load_weights(model, weights) if weights is not None else None
    layers, mode = quantize_external(model, quant)
    model.eval()
    config: dict[str, Any] = {
        "model": spec,
        "model_args": dict(model_args or {}),
        "weights_file": None if weights is None else str(Path(weights).resolve()),
        "quantization": {
            "mode": mode,
            **(
                {
                    "bits": quant.spec().bits,
                    "quant": "sym" if quant.symmetric else "asym",
                    "per_channel": quant.per_channel,
                    "layers": list(quant.layers),
                    "exclude": list(quant.exclude),
                }
                if mode == "ptq"
                else {}
            ),
        },
        "quantized_layers": layers,
    }
    return ExternalModel(model, layers, mode, config, record)


# -- stress ---------------------------------------------------------------------------------------


def external_input_files(weights: str | Path | None, data: str) -> list[Path]:
    """Files the command reads (no output may be one of them)."""
    files = [Path(weights)] if weights is not None else []
    kind, _, rest = data.partition(":")
    if kind in ("npz", "folder") and rest:
        files.append(Path(rest))
    elif data.rpartition(":")[0].endswith(".py"):
        files.append(Path(data.rpartition(":")[0]))
    return files


def _preflight(model: nn.Module, source: DataSource, device: torch.device, *, logits: bool) -> int | None:
    """Run the model once on the first batch. With ``logits`` (a classification metric) it must give
    ``(B, C)`` logits and ``C`` is returned; otherwise any output is accepted (``None``)."""
    try:
        xb, yb = next(iter(source.loader))
    except StopIteration:
        raise DataError(f"{source.spec}: the data is empty") from None
    try:
        with torch.inference_mode():
            out = model.to(device)(xb.to(device))
    except Exception as e:
        raise ConfigError(
            f"the model fails on the first batch of {source.spec} (inputs {tuple(xb.shape)}): "
            f"{type(e).__name__}: {one_line(e)}"
        ) from None
    if not logits:
        return None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != xb.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits (batch, classes) on {source.spec}, got {got}")
    return int(out.shape[1])


def open_external(
    model_spec: str,
    data_spec: str,
    *,
    model_args: Mapping[str, Any] | None,
    weights: str | Path | None,
    quant: QuantOptions,
    image: ImageOptions | None,
    batch_size: int,
    device: str,
    data_dir: str | Path | None,
    metric: Any,
) -> tuple[ExternalModel, DataSource, Any, torch.device]:
    """A user's network and data spec, ready to evaluate: ``(model, data source, resolved metric,
    device)``. The model is built, loaded and quantized (:func:`load_external_model`), one batch is run
    through it (:func:`_preflight`), and the data's labels are checked against its outputs (a data
    spec with more classes than outputs is a ``DataError``; the rest is checked as batches stream)."""
    resolved = metric_from_spec(metric)
    dev = resolve_device(device)
    source = open_data(data_spec, batch_size=batch_size, image=image, data_dir=data_dir)
    ext = load_external_model(model_spec, model_args=model_args, weights=weights, quant=quant)
    num_classes = _preflight(ext.model, source, dev, logits=resolved.batch is None)
    if num_classes is not None:
        if source.num_classes is not None and source.num_classes > num_classes:
            raise DataError(
                f"{source.spec} has {source.num_classes} classes, the model {num_classes} outputs"
            )
        source.loader.num_classes = num_classes  # labels are checked against the outputs as they stream
    return ext, source, resolved, dev


@holds_lock("out_path", kind="file")
def evaluate_external(
    model_spec: str,
    data_spec: str,
    *,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    out_path: str | Path,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    quant: QuantOptions | None = None,
    image: ImageOptions | None = None,
    protected_bits: Sequence[int] = (),
    include_bias: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
    patterns_per_pass: int = 1,
    on_model: Callable[[ExternalModel], None] | None = None,
    metric: str | Metric = "top1",
    data_identity: str | None = None,
    storage: str | None = None,
    saturate: bool | None = None,
    nested: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    shard: tuple[int, int] | None = None,
    ci_halfwidth: float | None = None,
    min_patterns: int = DEFAULT_MIN_PATTERNS,
    activations: ActivationOptions | None = None,
    protect: str | None = None,
) -> dict[str, Any]:
    """Build, load, quantize and stress a user's model on a data spec (module docstring).

    The data is streamed batch by batch on every pass (:class:`qmargin.engine.Evaluation` over the
    spec's checked batches; never held whole in memory) and fingerprinted while it streams, unless
    ``data_identity`` names it. ``metric``: :func:`qmargin.experiments.evaluate.metric_from_spec`.
    ``storage`` / ``saturate`` / ``nested`` / ``protect``: as
    :func:`qmargin.experiments.evaluate.error_model_for`. ``ci_halfwidth``: as shown (percentage
    points for the accuracies;
    :func:`qmargin.experiments.evaluate.halfwidth_in_metric_units`), ``min_patterns``: sequential
    stopping. ``workers`` / ``ray_address`` / ``shard``: as :func:`qmargin.engine.run_campaign` (with workers
    the data spec's loader travels to each worker once).
    ``on_model`` is called with the prepared :class:`ExternalModel` before the campaign starts (the
    CLI prints the quantized layers). The result is the campaign dict of
    :func:`qmargin.engine.run_campaign`; its ``config`` holds the model spec, arguments, weights
    file, quantization, the layer table and the data
    description. ``activations``: quantized activation buffers with bit errors
    (:class:`qmargin.experiments.evaluate.ActivationOptions`), calibrated on the first
    ``calibration_batches`` batches of the *test* data (there is no other data here; recorded as
    ``activations.calibration.source``).
    """
    check_outputs(
        {"result JSON": out_path, "CSV": Path(out_path).with_suffix(".csv")},
        inputs=external_input_files(weights, data_spec),
    )
    quant = quant or QuantOptions()
    ext, source, resolved, dev = open_external(
        model_spec, data_spec, model_args=model_args, weights=weights, quant=quant, image=image,
        batch_size=batch_size, device=device, data_dir=data_dir, metric=metric,
    )  # fmt: skip
    if on_model is not None:
        on_model(ext)
    layers = tuple(quant.layers) if ext.mode == "given" else ("*",)
    template = error_model_for(
        protected_bits=protected_bits,
        layers=layers,
        include_bias=include_bias,
        storage=storage,
        saturate=saturate,
        nested_bers=bers if nested else None,
        protect=protect,
    )
    if ext.mode == "given" and quant.exclude:
        template = dataclasses.replace(template, exclude=tuple(quant.exclude))
    config = {**ext.config, "data": data_spec, "data_source": source.describe}
    evaluation = Evaluation(source.loader, resolved, identity=data_identity, device=dev)
    setup = None
    if activations is not None:
        ext.model.to(dev).eval()
        setup = activation_setup(
            ext.model,
            activations,
            (b[0] for b in evaluation.batches()),
            source=f"the first {activations.calibration_batches} batches of the test data {data_spec}",
            batch_size=batch_size,
            layers=layers,
            exclude=tuple(quant.exclude) if ext.mode == "given" else (),
        )
    return run_campaign(
        ext.model,
        evaluation,
        bers=bers,
        repeats=repeats,
        base_seed=base_seed,
        error_model=template,
        out_path=out_path,
        config=config,
        progress=progress,
        overwrite=overwrite,
        patterns_per_pass=patterns_per_pass,
        weights=ext.weights,
        workers=workers,
        ray_address=ray_address,
        shard=shard,
        ci_halfwidth=halfwidth_in_metric_units(ci_halfwidth, resolved),
        min_patterns=min_patterns,
        activations=setup,
    )
