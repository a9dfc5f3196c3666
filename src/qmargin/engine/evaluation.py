"""What a campaign evaluates a model on: data (batches ``(inputs, targets)``) and a metric.

Data, one of:

* ``(x, y)``: two tensors with the same first dimension, held in memory and cut into batches of
  ``batch_size`` (the in-memory campaign; its data fingerprint is the SHA-256 of ``x`` and ``y``);
* any re-iterable of ``(inputs, targets)`` batches (a ``torch.utils.data.DataLoader``, a list);
* a zero-argument factory returning such an iterable (called once per pass).

Streamed data is never held: one batch at a time is moved to ``device`` and dropped after use, so
memory does not grow with the test set. ``inputs`` is a tensor (``model(x)``), a tuple or list
(``model(*x)``) or a dict (``model(**x)``); tensors inside are moved to ``device``.

Data fingerprint: for ``(x, y)`` the hash of both tensors; for streamed data the SHA-256 of every
batch's tensors (names, dtypes, shapes, bytes, in order) computed while the clean pass streams them;
or, where hashing is too costly, the user's ``identity`` string. The result records which
(``evaluation.data_fingerprint``: ``"sha256"`` or ``"identity"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qmargin.engine.grid import check_positive_int
from qmargin.engine.metrics import Metric, resolve_metric
from qmargin.errors import ConfigError, DataError

__all__ = ["Evaluation", "Batch", "call_model", "hash_tensor", "tensor_fingerprint", "StreamHash"]

Batch = tuple[Any, Any]


def hash_tensor(h: Any, name: str, t: Tensor) -> None:
    """Feed ``name|dtype|shape|`` and the raw bytes of ``t`` to the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy of the data


def tensor_fingerprint(x: Tensor, y: Tensor) -> str:
    """SHA-256 of an in-memory test set ``(x, y)`` (unchanged since the first result files)."""
    h = hashlib.sha256()
    hash_tensor(h, "x", x)
    hash_tensor(h, "y", y)
    return h.hexdigest()


class StreamHash:
    """SHA-256 of a stream of batches, fed one batch at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._i = 0

    def update(self, batch: Batch) -> None:
        self._feed(f"b{self._i}", batch)
        self._i += 1

    def _feed(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            hash_tensor(self._h, name, value)
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                self._feed(f"{name}.{key}", value[key])
        elif isinstance(value, tuple | list):
            for i, v in enumerate(value):
                self._feed(f"{name}[{i}]", v)
        elif value is None or isinstance(value, bool | int | float | str):
            self._h.update(f"{name}={value!r}|".encode())
        else:
            raise ConfigError(
                f"cannot fingerprint a batch entry of type {type(value).__name__}; "
                "give the data an identity string instead"
            )

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return (
            type(value)(_to(v, device) for v in value)
            if isinstance(value, tuple)
            else [_to(v, device) for v in value]
        )
    return value


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: Any, targets: Any) -> int:
    """Number of samples of a batch: the first dimension of ``targets`` (or of the first input tensor)."""
    for v in (targets, inputs):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, Mapping | tuple | list):
            for t in v.values() if isinstance(v, Mapping) else v:
                if isinstance(t, Tensor) and t.dim() > 0:
                    return int(t.shape[0])
    raise DataError("a batch has no tensor with a batch dimension")


class Evaluation:
    """Data and metric of a campaign (see the module docstring).

    Args:
        data: ``(x, y)`` tensors, a re-iterable of ``(inputs, targets)`` batches, or a factory of one.
        metric: a metric name, :class:`qmargin.engine.metrics.Metric` or callable (``"top1"``).
        identity: a string that names the data, recorded instead of hashing it.
        batch_size: batch size of ``(x, y)`` data (streamed data comes in its own batches).
        device: where batches go.
    """

    def __init__(
        self,
        data: Any,
        metric: Any = "top1",
        *,
        identity: str | None = None,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        self.metric: Metric = resolve_metric(metric)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.device = torch.device(device)
        if identity is not None and (not isinstance(identity, str) or not identity.strip()):
            raise ConfigError(f"the data identity must be a non-empty string, got {identity!r}")
        self.identity = identity
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._cached: list[Batch] | None = None
        self._factory: Callable[[], Iterable[Any]] | None = None
        if (
            isinstance(data, tuple | list)
            and len(data) == 2
            and all(isinstance(t, Tensor | np.ndarray) for t in data)
        ):
            x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1]).long()
            if x.dim() == 0 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"x_test has {x.shape[0] if x.dim() else 0} samples but y_test has {y.shape[0]}"
                )
            if x.shape[0] == 0:
                raise DataError("the test set is empty")
            if y.dim() != 1:
                raise DataError(f"y_test must be a 1-d tensor of class indices, got shape {tuple(y.shape)}")
            self._tensors = (x, y)
        elif isinstance(data, Iterable):
            if iter(data) is data:
                raise ConfigError(
                    "the data is a one-shot iterator (a generator?); a campaign passes over it many "
                    "times: give a re-iterable (a DataLoader, a list) or a factory returning one"
                )
            self._factory = lambda: data
        elif callable(data):
            self._factory = data
        else:
            raise ConfigError(
                f"data must be (x, y) tensors, an iterable of (inputs, targets) batches or a factory, "
                f"got {type(data).__name__}"
            )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for workers) without the batches cut from ``(x, y)``: they are cut again on use."""
        state = dict(self.__dict__)
        state["_cached"] = None
        return state

    # -- what the store records -------------------------------------------------------------------
    @property
    def in_memory(self) -> bool:
        return self._tensors is not None

    def known_fingerprint(self) -> dict[str, str] | None:
        """The data fingerprint when it is known without a pass (tensors, identity), else ``None``."""
        if self.identity is not None:
            return {"data_identity": self.identity}
        if self._tensors is not None:
            return {"data_sha256": tensor_fingerprint(*self._tensors)}
        return None

    def known_size(self) -> int | None:
        return None if self._tensors is None else int(self._tensors[0].shape[0])

    def settings(self) -> dict[str, Any]:
        """The evaluation settings that do not depend on a pass over the data."""
        return {
            "batch_size": self.batch_size if self.in_memory else None,
            "device": str(self.device),
        }

    # -- passes -----------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """One pass: ``(inputs, targets)`` on ``device``, one batch at a time."""
        if self._tensors is not None:
            if self._cached is None:
                x, y = self._tensors
                n, b = int(x.shape[0]), self.batch_size
                self._cached = [
                    (x[i : i + b].to(self.device), y[i : i + b].to(self.device)) for i in range(0, n, b)
                ]
            yield from self._cached
            return
        assert self._factory is not None
        source = self._factory()
        if not isinstance(source, Iterable):
            raise ConfigError(
                f"the data factory returned {type(source).__name__}, not an iterable of batches"
            )
        for i, batch in enumerate(source):
            if not (isinstance(batch, tuple | list) and len(batch) == 2):
                raise DataError(f"batch {i} is not an (inputs, targets) pair (got {type(batch).__name__})")
            yield _to(batch[0], self.device), _to(batch[1], self.device)

    def first_batch(self) -> Batch:
        for batch in self.batches():
            return batch
        raise DataError("the test set is empty")
