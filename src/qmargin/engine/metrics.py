"""Metrics of a campaign: per batch a pair ``(sum, count)``, reduced over the data as
``value = (sum_b sum_b') / (sum_b count_b)``.

Built-in (the :func:`register_metric` registry; :func:`resolve_metric` takes a name, a
:class:`Metric`, a stored ``{"name": ..., ...}`` dict or a callable):

* ``top1`` (default): ``a = (1/N) sum_i [argmax_c z_{i,c} = y_i]``, higher is better, a fraction;
* ``topk`` (``k``; also written ``top5`` etc.): ``(1/N) sum_i [y_i in the k largest z_{i,.}]``;
* ``cross_entropy``: mean ``-log softmax(z_i)_{y_i}``, lower is better.

A user metric is any callable ``fn(outputs, targets) -> (sum, count)`` (numbers or 0-d tensors),
wrapped by :meth:`Metric.from_callable` (name, ``higher_is_better``). A non-finite ``sum`` or a
negative / non-finite ``count`` is a one-line :class:`MetricError`.

Convergence failures (``converged`` flags, :mod:`qmargin.engine.cells`): a metric with a
``failed_score`` (``0`` for the accuracies) scores a non-converged sample with it, i.e. counts it
as wrong; other metrics use the model's output as it is and the failures are only counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qmargin.errors import ConfigError, DataError

__all__ = [
    "Metric",
    "MetricError",
    "register_metric",
    "resolve_metric",
    "list_metrics",
    "batch_sum_count",
    "top1",
    "topk",
    "cross_entropy",
]

BatchFn = Callable[[Any, Any], tuple[Any, Any]]
SampleFn = Callable[[Tensor, Tensor], Tensor]


class MetricError(DataError):
    """A metric returned a non-finite sum or an invalid count (one line, exit status 2)."""


@dataclass(frozen=True)
class Metric:
    """A metric: ``name``, its options ``params`` (JSON), ``higher_is_better``, ``fraction`` (values
    are shares in ``[0, 1]``: shown in percent, stored under ``accuracies`` for ``top1``), and either
    ``per_sample(outputs, targets) -> Tensor[B]`` (built-ins; sum = its sum, count = ``B``) or
    ``batch(outputs, targets) -> (sum, count)`` (user callables)."""

    name: str
    higher_is_better: bool = True
    fraction: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    per_sample: SampleFn | None = None
    batch: BatchFn | None = None
    failed_score: float | None = None

    def __post_init__(self) -> None:
        if (self.per_sample is None) == (self.batch is None):
            raise ConfigError(f"metric {self.name!r} needs exactly one of per_sample and batch")

    @classmethod
    def from_callable(
        cls, fn: BatchFn, *, name: str | None = None, higher_is_better: bool = True, fraction: bool = False
    ) -> Metric:
        """A user metric ``fn(outputs, targets) -> (sum, count)`` per batch."""
        if not callable(fn):
            raise ConfigError(f"a metric must be a name or a callable, got {fn!r}")
        label = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        return cls(str(label), higher_is_better, fraction, {}, batch=fn)

    def to_dict(self) -> dict[str, Any]:
        """What a result stores (a setting): ``{"name", **params, "higher_is_better", "fraction"}``."""
        return {
            "name": self.name,
            **dict(self.params),
            "higher_is_better": self.higher_is_better,
            "fraction": self.fraction,
        }


def _finite(metric: Metric, v: Any, what: str) -> float | int:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise MetricError(
                f"metric {metric.name!r} returned a {what} of shape {tuple(v.shape)}, not a number"
            )
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise MetricError(f"metric {metric.name!r} returned a {what} that is not a number: {v!r}")
    if not math.isfinite(v):
        raise MetricError(f"metric {metric.name!r} returned a non-finite {what} ({v}) on a batch")
    return v


def batch_sum_count(
    metric: Metric, outputs: Any, targets: Any, converged: Tensor | None
) -> tuple[float | int, float | int]:
    """``(sum, count)`` of one batch; ``converged`` (bool per sample) applies ``failed_score``.

    Integer per-sample scores (the accuracies) sum to a Python ``int``, so ``sum / count`` is the
    correctly rounded fraction ``correct / N`` whatever the batching."""
    if metric.per_sample is not None:
        s = metric.per_sample(outputs, targets)
        if converged is not None and metric.failed_score is not None:
            s = torch.where(converged.to(s.device), s, torch.as_tensor(metric.failed_score, dtype=s.dtype))
        n = int(s.shape[0])
        if s.dtype == torch.bool or not s.dtype.is_floating_point:
            return int(s.long().sum()), n
        total = _finite(metric, s.double().sum(), "sum")
        return total, n
    assert metric.batch is not None
    out = metric.batch(outputs, targets)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise MetricError(f"metric {metric.name!r} must return a (sum, count) pair per batch, got {out!r}")
    total = _finite(metric, out[0], "sum")
    count = _finite(metric, out[1], "count")
    if count < 0:
        raise MetricError(f"metric {metric.name!r} returned a negative count ({count})")
    return total, count


# -- built-ins ------------------------------------------------------------------------------------
def _logits(outputs: Any) -> Tensor:
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise DataError(f"the built-in metrics need logits of shape [batch, classes], got {shape}")
    return outputs


def top1() -> Metric:
    """Top-1 accuracy (the default)."""
    return Metric(
        "top1", True, True, {}, per_sample=lambda z, y: _logits(z).argmax(dim=1) == y, failed_score=0
    )


def topk(k: int = 5) -> Metric:
    """Top-k accuracy: the label is among the ``k`` largest logits (``k = 1`` is ``top1``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"topk needs a positive integer k, got {k!r}")
    if k == 1:
        return top1()

    def hit(z: Tensor, y: Tensor) -> Tensor:
        z = _logits(z)
        if k > z.shape[1]:
            raise ConfigError(f"top{k} needs at least {k} classes, the model has {z.shape[1]}")
        return (z.topk(k, dim=1).indices == y[:, None]).any(dim=1)

    return Metric("topk", True, True, {"k": k}, per_sample=hit, failed_score=0)


def cross_entropy() -> Metric:
    """Mean cross-entropy ``-log softmax(z_i)_{y_i}`` in nats (lower is better)."""

    def ce(z: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(_logits(z).double(), y, reduction="none")

    return Metric("cross_entropy", False, False, {}, per_sample=ce)


_REGISTRY: dict[str, Callable[..., Metric]] = {}


def register_metric(name: str, builder: Callable[..., Metric]) -> None:
    """Register ``builder(**params) -> Metric`` under ``name`` (``resolve_metric(name)``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"a metric name is lower-case letters, digits and _, got {name!r}")
    _REGISTRY[name] = builder


def list_metrics() -> list[str]:
    return sorted(_REGISTRY)


register_metric("top1", top1)
register_metric("topk", topk)
register_metric("cross_entropy", cross_entropy)


def resolve_metric(spec: Any = "top1") -> Metric:
    """A :class:`Metric` from a name (``"top1"``, ``"top5"``, ``"cross_entropy"``, a registered
    name), a stored dict (``{"name": "topk", "k": 5, ...}``), a :class:`Metric` or a callable."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        m = re.fullmatch(r"top(\d+)", spec)
        if m:
            return topk(int(m.group(1)))
        if spec not in _REGISTRY:
            raise ConfigError(f"unknown metric {spec!r}; known: {', '.join(list_metrics())} (or topK)")
        return _REGISTRY[spec]()
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str) or name not in _REGISTRY:
            raise ConfigError(f"unknown metric {name!r}; known: {', '.join(list_metrics())}")
        params = {k: v for k, v in spec.items() if k not in ("name", "higher_is_better", "fraction")}
        try:
            return _REGISTRY[name](**params)
        except TypeError as err:
            raise ConfigError(f"metric {name!r}: {err}") from None
    if callable(spec):
        return Metric.from_callable(spec)
    raise ConfigError(f"a metric must be a name, a Metric or a callable, got {spec!r}")
