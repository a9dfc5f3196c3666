"""Prefix reuse: evaluate a model from the first corrupted layer on, the clean prefix computed once.

When bit errors hit only some layers, every operation in front of the first of them computes the
same values with and without the errors. A per-layer sensitivity analysis (:mod:`qmargin.engine.sensitivity`)
evaluates ``R`` patterns per layer; with prefix reuse the prefix runs once per batch, and only the
suffix runs ``R`` times:

    cost(layer L) = N * (c_prefix(L) + R * c_suffix(L))   instead of   N * R * (c_prefix(L) + c_suffix(L)).

How: the model is traced with ``torch.fx`` (:func:`trace_model`). The tracer keeps every module that
holds stored codes (qmargin's :class:`~qmargin.quant.QuantizedTensors` layers and those of any code
provider of :mod:`qmargin.interop`) as one ``call_module`` node, so the graph reads the live codes at
run time. :meth:`TracedModel.split` cuts the graph before the first node that touches one of the
corrupted layers (a ``call_module`` of the layer, of one of its submodules or parents, or a
``get_attr`` of one of its tensors). The prefix graph returns the *live frontier*: the values the
prefix computes that a later node reads (one activation for a sequential network; also the skip
inputs of a residual block). The suffix graph takes them as its inputs. Both are compiled
``GraphModule`` s that call the very same modules as the model (no copies: corrupted codes are seen).

Exactness: the prefix and suffix execute the model's operations, in its order, on the same tensors,
so their output equals the model's bit for bit (deterministic kernels); :func:`trace_model` checks it
on a batch and refuses the traced graph otherwise. A model that does not trace (data-dependent
control flow, MonDEQ solvers) falls back to full passes; the reason is returned and recorded.

Memory: the live frontier of every batch is what the cache holds. Callers cache it for a group of
batches up to a byte budget and run the patterns over that group (re-injecting each pattern per
group: the patterns are pure functions of the seed, so every group sees the same pattern), so
memory is ``min(budget, N * frontier bytes)`` plus one batch, and the prefix still runs once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from qmargin.engine.evaluation import call_model
from qmargin.quant import QuantizedTensors

__all__ = ["TracedModel", "Split", "trace_model", "live_bytes"]


class _CodeLeafTracer(fx.Tracer):
    """A tracer that keeps modules holding stored codes as leaves (one ``call_module`` node each)."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or isinstance(m, QuantizedTensors):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def _touches(node: fx.Node, layers: Iterable[str]) -> bool:
    """Whether ``node`` calls or reads one of ``layers`` (a module, its submodules or a parent)."""
    if node.op not in ("call_module", "get_attr"):
        return False
    target = str(node.target)
    for layer in layers:
        if layer == "" or target == layer or target.startswith(layer + "."):
            return True
        if node.op == "call_module" and (target == "" or layer.startswith(target + ".")):
            return True
    return False


@dataclass
class Split:
    """A traced model cut before ``first``: ``prefix(inputs) -> live`` and ``suffix(*live) -> outputs``.

    ``n_prefix_nodes``: operations (call nodes) computed once per batch; ``n_suffix_nodes``: per pattern.
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    first: str
    n_prefix_nodes: int
    n_suffix_nodes: int
    n_live: int

    def run_prefix(self, inputs: Any) -> tuple[Any, ...]:
        return tuple(call_model(self.prefix, inputs))

    def run_suffix(self, live: tuple[Any, ...]) -> Any:
        return self.suffix(*live)


def _is_compute(node: fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method")


class TracedModel:
    """An ``fx`` graph of a model whose code-holding modules are leaves (module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._splits: dict[tuple[str, ...], Split] = {}

    def split(self, layers: Iterable[str]) -> Split:
        """The graph cut before the first node touching one of ``layers`` (cached per layer set).

        ``ValueError`` when no node touches them (the layer is not called in ``forward``).
        """
        key = tuple(sorted(set(layers)))
        if key in self._splits:
            return self._splits[key]
        nodes = list(self.gm.graph.nodes)
        cut = next((i for i, n in enumerate(nodes) if _touches(n, key)), None)
        if cut is None:
            raise ValueError(f"no node of the traced graph uses {list(key)}")
        head, tail = nodes[:cut], nodes[cut:]
        tail_set = set(tail)
        read_later = [n for n in head if any(u in tail_set for u in n.users)]
        live = [n for n in read_later if n.op != "get_attr"]
        attrs = [n for n in read_later if n.op == "get_attr"]  # read again by the suffix, never cached

        pre = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in head:
            env[n] = pre.node_copy(n, lambda x: env[x])
        pre.output(tuple(env[n] for n in live))

        suf = fx.Graph()
        senv: dict[fx.Node, fx.Node] = {}
        for n in live:
            senv[n] = suf.placeholder(n.name)
        for n in attrs:
            senv[n] = suf.node_copy(n, lambda x: senv[x])
        for n in tail:
            senv[n] = suf.node_copy(n, lambda x: senv[x])
        split = Split(
            prefix=fx.GraphModule(self.gm, pre),
            suffix=fx.GraphModule(self.gm, suf),
            first=str(nodes[cut].target),
            n_prefix_nodes=sum(_is_compute(n) for n in head),
            n_suffix_nodes=sum(_is_compute(n) for n in tail),
            n_live=len(live),
        )
        self._splits[key] = split
        return split


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def trace_model(
    model: nn.Module, leaves: Iterable[str], check_inputs: Any = None
) -> tuple[TracedModel | None, str | None]:
    """Trace ``model`` (``leaves``: names of modules to keep whole, e.g. every code-holding layer).

    Returns ``(traced, None)``, or ``(None, reason)`` when tracing fails or, with ``check_inputs``
    (one batch's inputs), when the traced graph's output differs from ``model``'s in any bit.
    """
    try:
        tracer = _CodeLeafTracer(leaves)
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception as e:  # any tracing failure means: full passes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.fx could not trace the model ({type(e).__name__}: {first[:160]})"
    if check_inputs is not None:
        try:
            with torch.inference_mode():
                same = _same(call_model(gm, check_inputs), call_model(model, check_inputs))
        except Exception as e:
            return None, f"the traced graph fails on a batch ({type(e).__name__})"
        if not same:
            return None, "the traced graph's outputs differ from the model's"
    return TracedModel(gm), None


def live_bytes(values: Any) -> int:
    """Bytes held by the tensors in ``values`` (nested tuples, lists, dicts)."""
    if isinstance(values, Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, tuple | list):
        return sum(live_bytes(v) for v in values)
    if isinstance(values, dict):
        return sum(live_bytes(v) for v in values.values())
    return 0
