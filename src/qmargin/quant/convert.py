"""Model-level conversion and the integer (deployment) state of a quantized model."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qmargin.quant.modules import QuantConv2d, QuantizedTensors, QuantLinear
from qmargin.quant.spec import QuantSpec

__all__ = [
    "quantize_model",
    "quantized_modules",
    "IntegerState",
    "export_integer_state",
    "load_integer_state",
    "freeze_model",
    "unfreeze_model",
]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    bias_spec: QuantSpec | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` in place by its quantized twin.

    Args:
        include: glob patterns on module names (``"features.*"``); when given, only matching layers
            are converted.
        exclude: glob patterns of layers to leave in float (e.g. ``["fc"]`` for a float head).
        bias_spec: also store biases as codes with this spec (default: biases stay float).

    Returns the names of the converted layers, in module order. Layers that are already quantized and
    every other module type (BatchNorm, activations, pooling, ...) are left alone.
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else None
    converted: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedTensors) or not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
        new = cls.from_float(module, spec, bias_spec)  # type: ignore[arg-type]
        if name == "":
            raise TypeError("quantize_model converts the layers inside a model, not a bare layer")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        converted.append(name)
    return converted


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantizedTensors]]:
    """``(name, module)`` for every module of ``model`` that stores quantized tensors."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedTensors):
            yield name, module


def freeze_model(model: nn.Module) -> None:
    for _, m in quantized_modules(model):
        m.freeze()


def unfreeze_model(model: nn.Module) -> None:
    for _, m in quantized_modules(model):
        m.unfreeze()


@dataclass
class IntegerState:
    """The deployment form of a model: integer codes, scales, zero points and the float rest.

    ``tensors`` maps ``"{layer}.{tensor}.codes"`` (``int8``/``uint8``), ``".scale"`` and
    ``".zero_point"`` for every quantized tensor, plus every other state-dict entry (BatchNorm
    statistics, float biases, ...) under its usual name. ``specs`` maps ``"{layer}.{tensor}"`` to the
    ``QuantSpec`` as a dict.
    """

    tensors: dict[str, Tensor]
    specs: dict[str, dict] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(tmp), metadata={"qmargin.specs": json.dumps(self.specs)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> IntegerState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return cls(tensors, json.loads(meta.get("qmargin.specs", "{}")))


def export_integer_state(model: nn.Module) -> IntegerState:
    """Stored form of every quantized tensor (integer codes) plus the float remainder of the state."""
    tensors: dict[str, Tensor] = {}
    specs: dict[str, dict] = {}
    shadowed: set[str] = set()
    for name, m in quantized_modules(model):
        prefix = f"{name}." if name else ""
        for tname, spec in m.quant_specs.items():
            st = m.stored(tname) if m.frozen else None
            if st is None:
                from qmargin.quant.functional import quantize

                codes, scale, zp = quantize(m.float_tensor(tname), spec)
            else:
                codes, scale, zp = st.codes, st.scale, st.zero_point
            tensors[f"{prefix}{tname}.codes"] = codes.detach().clone()
            tensors[f"{prefix}{tname}.scale"] = scale.detach().clone()
            tensors[f"{prefix}{tname}.zero_point"] = zp.detach().clone()
            specs[f"{prefix}{tname}"] = spec.to_dict()
            shadowed.add(f"{prefix}{tname}")
    for key, value in model.state_dict().items():
        if key not in shadowed:
            tensors[key] = value.detach().clone()
    return IntegerState(tensors, specs)


def load_integer_state(model: nn.Module, state: IntegerState) -> nn.Module:
    """Load an :class:`IntegerState` into a model of the same architecture and freeze it.

    The quantized layers of ``model`` must already exist (``quantize_model`` with the same specs).
    Afterwards the model computes from exactly the stored codes.
    """
    qmods = dict(quantized_modules(model))
    rest = {}
    for key, value in state.tensors.items():
        if key.endswith((".codes", ".scale", ".zero_point")):
            continue
        rest[key] = value
    for qname in state.specs:
        layer, _, tname = qname.rpartition(".")
        if layer not in qmods:
            raise KeyError(f"integer state has quantized tensor {qname!r} but the model has no such layer")
        m = qmods[layer]
        spec = QuantSpec.from_dict(state.specs[qname])
        if m.quant_specs.get(tname) != spec:
            raise ValueError(f"{qname}: model spec {m.quant_specs.get(tname)} differs from stored {spec}")
        m.load_stored(
            tname,
            state.tensors[f"{qname}.codes"],
            state.tensors[f"{qname}.scale"],
            state.tensors[f"{qname}.zero_point"],
        )
    missing, unexpected = _load_rest(model, rest, set(state.specs))
    if unexpected:
        raise KeyError(f"integer state has entries the model lacks: {sorted(unexpected)[:5]}")
    if missing:
        raise KeyError(f"integer state lacks entries of the model: {sorted(missing)[:5]}")
    return model


def _load_rest(model: nn.Module, rest: dict[str, Tensor], quantized: set[str]) -> tuple[set[str], set[str]]:
    own = model.state_dict()
    missing = {k for k in own if k not in rest and k not in quantized}
    unexpected = {k for k in rest if k not in own}
    with torch.no_grad():
        for k, v in rest.items():
            if k in own:
                own[k].copy_(v)
    return missing, unexpected
