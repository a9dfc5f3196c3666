"""Model-level conversion and the integer (deployment) state of a quantized model."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.quant.errors import IntegerStateError, NonFiniteTensorError, TiedParameterError
from qmargin.quant.functional import check_finite, check_stored, quantize
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
    "tied_stored_tensors",
    "link_tied",
    "StoredRef",
]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


StoredRef = tuple[str, QuantizedTensors, str]
"""``(layer name, module, tensor name)`` of one name of a stored tensor."""


def _module_names(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, nn.Module]]:
    """Every name of every module (a module registered twice has two), in module order."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        modules[id(m)] = m
    return names, modules


def tied_stored_tensors(model: nn.Module) -> list[list[StoredRef]]:
    """The stored tensors of ``model``, each with every name it is reachable under.

    One group per stored tensor: ``[(layer, module, tensor), ...]`` for every name of it, in module
    order; the first is its canonical name. Two names are one stored tensor when they are the same
    module registered under two names, or when their float tensors are one ``nn.Parameter``
    registered on each module under the tensor's name (a tie such as ``b.weight = a.weight``). A
    group whose names carry different ``QuantSpec`` s raises :class:`TiedParameterError` (one stored
    tensor has one format).
    """
    names, modules = _module_names(model)
    order = {name: i for i, name in enumerate(n for ns in names.values() for n in ns)}
    groups: dict[tuple[int, ...], list[StoredRef]] = {}
    for mid, m in modules.items():
        if not isinstance(m, QuantizedTensors):
            continue
        for t in m.quant_specs:
            p = m._parameters.get(t)
            key = (id(p),) if p is not None else (mid, hash(t))
            groups.setdefault(key, []).extend((n, m, t) for n in names[mid])
    out = []
    for group in groups.values():
        group.sort(key=lambda r: order[r[0]])
        specs = {f"{n}.{t}" if n else t: m.quant_specs[t] for n, m, t in group}
        if len(set(specs.values())) > 1:
            raise TiedParameterError(f"one tied tensor is stored with different specs: {specs}")
        out.append(group)
    out.sort(key=lambda g: order[g[0][0]])
    return out


def _key(name: str, tensor: str) -> str:
    return f"{name}.{tensor}" if name else tensor


def _distinct(group: list[StoredRef]) -> list[StoredRef]:
    """One ``(name, module, tensor)`` per distinct (module, tensor) of a group (aliases dropped)."""
    seen: set[tuple[int, str]] = set()
    out = []
    for n, m, t in group:
        if (id(m), t) not in seen:
            seen.add((id(m), t))
            out.append((n, m, t))
    return out


def link_tied(model: nn.Module, groups: list[list[StoredRef]] | None = None) -> None:
    """Make the frozen members of every tie group use one stored form (the same code tensor).

    Modules frozen separately (``m.freeze()``, ``model.to(...)``) hold equal but distinct copies; the
    first frozen member's buffers are installed in the others. Members whose stored forms differ (one
    was edited) raise :class:`TiedParameterError` before anything is changed.
    """
    groups = tied_stored_tensors(model) if groups is None else groups
    plan: list[tuple[QuantizedTensors, str, list[Tensor]]] = []
    for group in groups:
        members = [r for r in _distinct(group) if f"{r[2]}_codes" in r[1]._buffers]
        if len(members) < 2:
            continue
        src_name, src, t0 = members[0]
        a: list[Tensor] = [getattr(src, f"{t0}_{s}") for s in ("codes", "scale", "zero_point")]
        for name, m, t in members[1:]:
            b: list[Tensor] = [getattr(m, f"{t}_{s}") for s in ("codes", "scale", "zero_point")]
            if all(x is y for x, y in zip(a, b, strict=True)):
                continue
            pairs = zip(a, b, strict=True)
            if not all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in pairs):
                raise TiedParameterError(
                    f"{_key(src_name, t0)} and {_key(name, t)} are one tied tensor but their stored "
                    "forms differ; refreeze the model (freeze_model)"
                )
            plan.append((m, t, a))
    for m, t, (codes, scale, zp) in plan:
        m._set_stored(t, codes, scale, zp)


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

    Returns the names of the converted layers, in module order (a layer registered under two names
    is listed under both). Layers that are already quantized and every other module type
    (BatchNorm, activations, pooling, ...) are left alone.

    Ties are kept:

    * **one module under several names** becomes one quantized module installed at every name (the
      names must all be selected by ``include``/``exclude`` or all not; otherwise
      :class:`TiedParameterError`, since one module cannot be both float and quantized);
    * **one Parameter used by several modules** (``b.weight = a.weight``) stays one Parameter: the
      quantized modules use the original Parameter object, and when frozen the tied stored tensor is
      one code tensor (:func:`freeze_model`, :func:`link_tied`), which ``qmargin.faults.inject``
      corrupts once and :func:`export_integer_state` stores once (the other names as aliases). This
      needs every place of the Parameter to be treated alike: all quantized with the same spec, or
      all float (e.g. tied float biases). A Parameter quantized at one place and float at another
      (a Linear weight tied to an ``nn.Embedding``, a tied layer excluded at one name, a weight tied
      to a bias with another spec) cannot be kept exactly and raises :class:`TiedParameterError`
      naming the tied names; exclude all of its places or none.

    Every tensor to be quantized must be finite (:class:`NonFiniteTensorError`, naming it). All
    checks run before the model is changed.
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else None
    names, modules = _module_names(model)
    plan: dict[int, str] = {}  # id(module to convert) -> its canonical name
    for mid, mnames in names.items():
        m = modules[mid]
        if isinstance(m, QuantizedTensors) or not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        chosen = [(include is None or _matches(n, include)) and not _matches(n, exclude) for n in mnames]
        if not any(chosen):
            continue
        if "" in mnames:
            raise TypeError("quantize_model converts the layers inside a model, not a bare layer")
        if not all(chosen):
            yes = [n for n, c in zip(mnames, chosen, strict=True) if c]
            no = [n for n, c in zip(mnames, chosen, strict=True) if not c]
            raise TiedParameterError(
                f"one module is registered as {mnames}: include/exclude select {yes} but not {no}; "
                "select all of its names or none"
            )
        check_finite(m.weight, f"{mnames[0]}.weight")
        if bias_spec is not None and m.bias is not None:
            check_finite(m.bias, f"{mnames[0]}.bias")
        plan[mid] = mnames[0]

    def treatment(m: nn.Module, attr: str) -> QuantSpec | None:
        if id(m) in plan:
            return spec if attr == "weight" else bias_spec if attr == "bias" else None
        if isinstance(m, QuantizedTensors):
            return m.quant_specs.get(attr)
        return None

    uses: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for mid, m in modules.items():
        for attr, p in m._parameters.items():
            if p is not None:
                params[id(p)] = p
                uses.setdefault(id(p), []).append((names[mid][0], m, attr))
    retie: list[int] = []
    for pid, us in uses.items():
        if len(us) < 2 or not any(id(m) in plan for _, m, _ in us):
            continue
        treated = {_key(n, a): treatment(m, a) for n, m, a in us}
        if len(set(treated.values())) > 1:
            what = ", ".join(f"{k} ({'float' if v is None else v})" for k, v in treated.items())
            raise TiedParameterError(
                f"a parameter is tied between {what}: quantize every place of it with the same spec or "
                "none (include/exclude)"
            )
        retie.append(pid)

    new: dict[int, QuantizedTensors] = {}
    for mid in plan:
        m = modules[mid]
        cls = QuantLinear if isinstance(m, nn.Linear) else QuantConv2d
        new[mid] = cls.from_float(m, spec, bias_spec)  # type: ignore[arg-type]
    for pid in retie:
        for _, m, attr in uses[pid]:
            if id(m) in new:
                setattr(new[id(m)], attr, params[pid])
    converted: list[str] = []
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) not in new:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new[id(m)])
        converted.append(name)
    return converted


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantizedTensors]]:
    """``(name, module)`` for every module of ``model`` that stores quantized tensors (once each)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedTensors):
            yield name, module


def freeze_model(model: nn.Module) -> None:
    """Freeze every quantized module; tied stored tensors become one code tensor (:func:`link_tied`).

    A non-finite float tensor raises :class:`NonFiniteTensorError` naming the layer.
    """
    for name, m in quantized_modules(model):
        try:
            m.freeze()
        except NonFiniteTensorError as e:
            raise NonFiniteTensorError(f"layer {name!r}: {e}") from None
    link_tied(model)


def unfreeze_model(model: nn.Module) -> None:
    for _, m in quantized_modules(model):
        m.unfreeze()


@dataclass
class IntegerState:
    """The deployment form of a model: integer codes, scales, zero points and the float rest.

    ``tensors`` maps ``"{layer}.{tensor}.codes"`` (``int8``/``uint8``), ``".scale"`` and
    ``".zero_point"`` for every quantized tensor, plus every other state-dict entry (BatchNorm
    statistics, float biases, ...) under its usual name. ``specs`` maps ``"{layer}.{tensor}"`` to the
    ``QuantSpec`` as a dict. A tied stored tensor (:func:`tied_stored_tensors`) is stored once, under
    its canonical name; ``aliases`` maps each of its other names to that one.
    """

    tensors: dict[str, Tensor]
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from qmargin.files import write_safetensors_atomic

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        meta = {"qmargin.specs": json.dumps(self.specs)}
        if self.aliases:
            meta["qmargin.aliases"] = json.dumps(self.aliases)
        write_safetensors_atomic(path, tensors, metadata=meta)  # atomic; a full disk is an OSError

    @classmethod
    def load(cls, path: str | Path) -> IntegerState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        specs = json.loads(meta.get("qmargin.specs", "{}"))
        return cls(tensors, specs, json.loads(meta.get("qmargin.aliases", "{}")))


def export_integer_state(model: nn.Module) -> IntegerState:
    """Stored form of every quantized tensor (integer codes) plus the float remainder of the state.

    A tied stored tensor is exported once, under its canonical (first) name, with its other names in
    ``aliases``; none of its names appears among the float entries.
    """
    tensors: dict[str, Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    shadowed: set[str] = set()
    for group in tied_stored_tensors(model):
        name, m, tname = group[0]
        key = _key(name, tname)
        spec = m.quant_specs[tname]
        frozen = [r for r in _distinct(group) if r[1].frozen]
        if frozen:
            st = frozen[0][1].stored(frozen[0][2])
            codes, scale, zp = st.codes, st.scale, st.zero_point
        else:
            try:
                codes, scale, zp = quantize(m.float_tensor(tname), spec, name=key)
            except NonFiniteTensorError as e:
                raise NonFiniteTensorError(f"layer {name!r}: {e}") from None
        tensors[f"{key}.codes"] = codes.detach().clone()
        tensors[f"{key}.scale"] = scale.detach().clone()
        tensors[f"{key}.zero_point"] = zp.detach().clone()
        specs[key] = spec.to_dict()
        for n, _, t in group:
            shadowed.add(_key(n, t))
            if _key(n, t) != key:
                aliases[_key(n, t)] = key
    for k, value in model.state_dict().items():
        if k not in shadowed:
            tensors[k] = value.detach().clone()
    return IntegerState(tensors, specs, aliases)


def load_integer_state(model: nn.Module, state: IntegerState) -> nn.Module:
    """Load an :class:`IntegerState` into a model of the same architecture and freeze it.

    The quantized layers of ``model`` must already exist (``quantize_model`` with the same specs).
    Afterwards the model computes from exactly the stored codes; a tied stored tensor is one code
    tensor in every module that uses it. Every stored form is checked before anything is loaded
    (:func:`qmargin.quant.functional.check_stored`): codes of exactly the spec's dtype and the
    model's shape, within the b-bit word range; finite positive scales; ``int32`` zero points in
    range. A corrupt entry raises :class:`IntegerStateError` (a ``ValueError``) naming its key;
    nothing is cast silently.
    """
    groups = tied_stored_tensors(model)
    where: dict[str, tuple[list[StoredRef], StoredRef]] = {}
    for group in groups:
        for r in group:
            where[_key(r[0], r[2])] = (group, r)
    rest = {}
    for key, value in state.tensors.items():
        if key.endswith((".codes", ".scale", ".zero_point")):
            continue
        rest[key] = value
    plan: list[tuple[list[StoredRef], tuple[Tensor, ...]]] = []
    covered: set[str] = set()
    for qname in state.specs:
        if qname not in where:
            raise KeyError(f"integer state has quantized tensor {qname!r} but the model has no such layer")
        group, (_, m, tname) = where[qname]
        try:
            spec = QuantSpec.from_dict(state.specs[qname])
        except (TypeError, ValueError) as e:
            raise IntegerStateError(f"{qname}: bad stored spec: {e}") from None
        if m.quant_specs.get(tname) != spec:
            raise IntegerStateError(
                f"{qname}: model spec {m.quant_specs.get(tname)} differs from stored {spec}"
            )
        for suffix in ("codes", "scale", "zero_point"):
            if f"{qname}.{suffix}" not in state.tensors:
                raise IntegerStateError(f"integer state lacks {qname}.{suffix}")
        stored = tuple(state.tensors[f"{qname}.{suffix}"] for suffix in ("codes", "scale", "zero_point"))
        check_stored(stored[0], stored[1], stored[2], spec, tuple(m.float_tensor(tname).shape), qname)
        twin = next((other for g, other in plan if g is group), None)
        if twin is not None and not all(torch.equal(x, y) for x, y in zip(twin, stored, strict=True)):
            raise IntegerStateError(
                f"integer state stores the tied tensor {qname!r} twice, with different values"
            )
        plan.append((group, stored))
        covered.update(_key(n, t) for n, _, t in group)
    for alias, canonical in state.aliases.items():
        if alias not in where or canonical not in where or where[alias][0] is not where[canonical][0]:
            raise IntegerStateError(f"integer state ties {alias!r} to {canonical!r}, the model does not")
    for group, (codes, scale, zp) in plan:
        for n, m, t in _distinct(group):
            m.load_stored(t, codes, scale, zp, key=_key(n, t))
    link_tied(model, groups)
    missing, unexpected = _load_rest(model, rest, covered | set(state.aliases))
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
