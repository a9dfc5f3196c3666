"""Where the cells of a campaign are evaluated: in this process, or on Ray workers.

:func:`~qmargin.engine.run.run_campaign` hands an executor the :class:`CellJob` of a campaign (the
prepared model, the evaluation, the error-model template) once, then asks it for outcomes with
``executor.map(cells)`` as often as it likes (once per campaign today; once per round when the number
of patterns is decided as the campaign goes). Outcomes may come back in any order:
:class:`~qmargin.engine.store.CampaignState` records them by cell.

* :class:`SequentialExecutor`: today's loop, in this process; ``patterns_per_pass > 1`` evaluates
  up to that many consecutive cells of one BER in one vmapped pass (:func:`chunk_cells`).
* :class:`RayExecutor`: one Ray actor per worker, each holding its own prepared copy of the model and
  the evaluation, which travel through Ray's object store once (``ray.put``) and reach each actor
  once (again only when a killed actor is restarted); chunks of cells (the same chunks as a
  sequential run, so the same values) are dispatched to whichever actor is free. An actor killed
  mid-run is restarted and its chunks are retried (``max_restarts`` / ``max_task_retries``). Ray is
  imported only here, only when a :class:`RayExecutor` starts.

Cells are pure (:mod:`qmargin.engine.cells`): a cell's outcome depends on nothing but the model, the
data, the template and the cell, so where it runs does not change its value. (CPU kernels may sum in
another order with another number of threads; a worker uses one thread, as does a sequential run
under ``OMP_NUM_THREADS=1``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from qmargin.engine.activations import ActivationSetup
from qmargin.engine.cells import CellOutcome, evaluate_cell, evaluate_cells_stacked, prepared
from qmargin.engine.evaluation import Evaluation
from qmargin.engine.grid import Cell, check_positive_int
from qmargin.errors import ConfigError, UserError

__all__ = [
    "CellJob",
    "Executor",
    "SequentialExecutor",
    "RayExecutor",
    "WorkerError",
    "chunk_cells",
    "evaluate_chunk",
    "make_executor",
]

#: Restarts of a killed worker (and retries of its cells) before the campaign gives up.
MAX_RESTARTS = 3


class WorkerError(UserError):
    """Ray workers kept dying (out of memory, killed): one line, like a user's mistake, since the
    remedy is the user's (fewer workers, more memory); the finished cells are saved."""


@dataclass(frozen=True)
class CellJob:
    """What every cell of a campaign shares: the model (prepared by the caller), the evaluation, the
    error-model template, whether non-converged samples are counted, how many patterns of one BER
    share a pass over the data and the activation buffers (:mod:`qmargin.engine.activations`; plain
    data, installed on the model for one pass at a time)."""

    model: nn.Module
    evaluation: Evaluation
    template: Any
    count_failures: bool
    patterns_per_pass: int = 1
    activations: ActivationSetup | None = None


def chunk_cells(cells: Sequence[Cell], patterns_per_pass: int) -> list[list[Cell]]:
    """Runs of consecutive cells of one BER, each at most ``patterns_per_pass`` long: the passes a
    sequential run makes (BER-major order in, the same chunks out, whoever evaluates them)."""
    chunks: list[list[Cell]] = []
    for cell in cells:
        if chunks and chunks[-1][0].k == cell.k and len(chunks[-1]) < patterns_per_pass:
            chunks[-1].append(cell)
        else:
            chunks.append([cell])
    return chunks


def evaluate_chunk(job: CellJob, cells: Sequence[Cell]) -> list[CellOutcome]:
    """The outcomes of one chunk on the prepared ``job.model``: one cell per pass
    (:func:`~qmargin.engine.cells.evaluate_cell`), or the chunk stacked into one vmapped pass when
    ``patterns_per_pass > 1`` (:func:`~qmargin.engine.cells.evaluate_cells_stacked`)."""
    if job.patterns_per_pass == 1 or job.activations is not None:
        return [
            evaluate_cell(
                job.model,
                job.evaluation,
                job.template,
                c,
                count_failures=job.count_failures,
                activations=job.activations,
            )
            for c in cells
        ]
    return evaluate_cells_stacked(job.model, job.evaluation, job.template, cells)


@runtime_checkable
class Executor(Protocol):
    """Evaluates cells of one campaign: :meth:`start` once, :meth:`map` any number of times,
    :meth:`close` at the end (also after an error)."""

    def start(self, job: CellJob) -> None:
        """Take the campaign's job (the model is prepared by the caller and stays so until close)."""

    def map(self, cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        """The outcome of every cell, in any order (one per cell)."""
        ...

    def close(self) -> None:
        """Release workers (idempotent)."""


class SequentialExecutor:
    """Every cell in this process, in the order given (today's campaign loop)."""

    def __init__(self) -> None:
        self._job: CellJob | None = None

    def start(self, job: CellJob) -> None:
        self._job = job

    def map(self, cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        job = self._job
        if job is None:
            raise RuntimeError("SequentialExecutor.map before start")
        for chunk in chunk_cells(cells, job.patterns_per_pass):
            yield from evaluate_chunk(job, chunk)

    def close(self) -> None:
        self._job = None


class _CellWorker:
    """A Ray actor: one prepared copy of the model and evaluation, evaluating the chunks sent to it.

    The model and the evaluation come from the object store on the actor's first call (``refs``
    travel with every call as two ids, nested in a list so that Ray does not resolve them): once per
    actor, and once more after a restart."""

    def __init__(
        self,
        template: Any,
        count_failures: bool,
        patterns_per_pass: int,
        threads: int,
        activations: ActivationSetup | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self._params = (template, count_failures, patterns_per_pass, activations)
        self._job: CellJob | None = None
        self._stack = contextlib.ExitStack()
        self._loads = 0
        self._chunks = 0

    def _load(self, refs: list[Any]) -> CellJob:
        if self._job is None:
            import ray

            try:
                model, evaluation = ray.get(refs)
            except Exception as err:  # a module the model or data needs is missing on this node
                raise ConfigError(
                    f"a worker could not load the model or the data ({_first_line(err)}); install "
                    "qmargin and the modules your model and data need on every node"
                ) from None
            template, count_failures, per_pass, activations = self._params
            self._stack.enter_context(prepared(model, evaluation.device, template))
            self._job = CellJob(model, evaluation, template, count_failures, per_pass, activations)
            self._loads += 1
        return self._job

    def ready(self, refs: list[Any]) -> int:
        """Load the model and data; the process id."""
        self._load(refs)
        return os.getpid()

    def stats(self) -> dict[str, int]:
        """``pid``, ``loads`` (times the model and data were fetched) and ``chunks`` evaluated."""
        return {"pid": os.getpid(), "loads": self._loads, "chunks": self._chunks}

    def run(self, refs: list[Any], cells: list[Cell]) -> list[CellOutcome]:
        out = evaluate_chunk(self._load(refs), cells)
        self._chunks += 1
        return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1].strip() if text else type(err).__name__


def _user_modules() -> list[Any]:
    """Modules of user code imported from files (``file.py:name``, :func:`qmargin.data.specs.load_object`):
    not importable on a worker, so their classes and functions travel by value."""
    return [m for name, m in list(sys.modules.items()) if name.startswith("qmargin_user_") and m is not None]


class RayExecutor:
    """Cells on Ray actors, one per worker (module docstring).

    Args:
        workers: number of actors (each takes one CPU); default: the cluster's CPUs.
        address: an existing cluster (``ray.init(address=...)``); ``None`` starts a local Ray
            instance with ``workers`` CPUs that :meth:`close` shuts down. When Ray is already
            initialized in this process, that instance is used and left running.
        max_restarts: restarts of a killed actor (each retries the chunks it held).
    """

    def __init__(
        self, workers: int | None = None, address: str | None = None, *, max_restarts: int = MAX_RESTARTS
    ) -> None:
        if workers is not None:
            check_positive_int("workers", workers)
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ConfigError(f"the Ray address must be a non-empty string, got {address!r}")
        self.workers = workers
        self.address = address
        self.max_restarts = max_restarts
        self._ray: Any = None
        self._started_ray = False
        self._actors: list[Any] = []
        self._refs: list[Any] = []
        self._patterns_per_pass = 1
        self._ready: list[Any] = []

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, job: CellJob) -> None:
        if job.evaluation.device.type != "cpu":
            raise ConfigError(
                f"workers evaluate on CPU; the campaign's device is {job.evaluation.device} "
                "(run it without workers, or on the CPU)"
            )
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "workers need Ray: pip install 'qmargin[ray]' (or run without --workers)"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
                "configure_logging": True,
            }
            if self.address is None:
                kwargs.update(address="local", num_cpus=self.workers or os.cpu_count() or 1)
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as err:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise ConfigError(f"could not start {where}: {_first_line(err)}") from None
            self._started_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        n = self.workers or max(1, cpus)
        if n > cpus:  # an actor takes one CPU: the others would wait for ever
            raise ConfigError(f"{n} workers need {n} CPUs; the Ray cluster has {cpus}")
        for module in _user_modules():
            ray.cloudpickle.register_pickle_by_value(module)
        try:
            model_ref = ray.put(job.model)
            evaluation_ref = ray.put(job.evaluation)
        except Exception as err:  # what cannot be pickled: generators, open files, locks, lambdas in C
            raise ConfigError(
                f"the model or the data cannot travel to the workers (not picklable: {_first_line(err)}); "
                "give (x, y) tensors, a picklable DataLoader or a picklable factory (a module-level "
                "function), or run without workers"
            ) from None
        self._refs = [model_ref, evaluation_ref]
        self._patterns_per_pass = job.patterns_per_pass
        actor = ray.remote(num_cpus=1, max_restarts=self.max_restarts, max_task_retries=self.max_restarts)(
            _CellWorker
        )
        self._actors = [
            actor.remote(job.template, job.count_failures, job.patterns_per_pass, 1, job.activations)
            for _ in range(n)
        ]
        # each actor loads the model and data now (not waited for: the caller's clean pass runs
        # meanwhile); a failure to load surfaces with the first chunk
        self._ready = [a.ready.remote(self._refs) for a in self._actors]

    def pids(self) -> list[int]:
        """Process ids of the live actors (one per worker; a restarted actor has a new one)."""
        return [s["pid"] for s in self.stats()]

    def stats(self) -> list[dict[str, int]]:
        """Per actor: ``pid``, ``loads`` (fetches of the model and data: 1, plus 1 per restart) and
        ``chunks`` (evaluated since its last start)."""
        return list(self._get([a.stats.remote() for a in self._actors]))

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self._actors = []
        self._refs = []
        self._ready = []
        if self._started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
        self._ray = None
        self._started_ray = False

    # -- work -----------------------------------------------------------------------------------------
    def _get(self, refs: Any) -> Any:
        """``ray.get``; a user error raised on a worker is re-raised here as itself (one line)."""
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            if isinstance(cause, BaseException):
                raise cause from err
            raise
        except ray.exceptions.RayActorError as err:
            cause = getattr(err, "cause", None) or err
            text = _first_line(cause)
            if "ModuleNotFoundError" in text or "No module named" in text or "deserializ" in text.lower():
                raise ConfigError(
                    f"a worker could not load the model or the data ({text}); install qmargin and the "
                    "modules your model and data need on every node"
                ) from None
            raise WorkerError(
                f"a Ray worker died {self.max_restarts + 1} times ({text}); the cells done so far are "
                "saved: rerun to resume"
            ) from None

    def map(self, cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        if not self._actors:
            raise RuntimeError("RayExecutor.map before start")
        ray = self._ray
        todo = deque(chunk_cells(cells, self._patterns_per_pass))
        inflight: dict[Any, Any] = {}

        def submit(actor: Any) -> None:
            if todo:
                inflight[actor.run.remote(self._refs, todo.popleft())] = actor

        for _ in range(2):  # two chunks queued per actor: no idle gap between chunks
            for a in self._actors:
                submit(a)
        try:
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                actor = inflight.pop(ready[0])
                outcomes = self._get(ready[0])
                submit(actor)
                yield from outcomes
        finally:
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)


def make_executor(*, workers: int | None = None, ray_address: str | None = None) -> Executor:
    """A :class:`RayExecutor` when ``workers`` or ``ray_address`` is given, else a
    :class:`SequentialExecutor` (which never imports Ray)."""
    if workers is None and ray_address is None:
        return SequentialExecutor()
    return RayExecutor(workers, ray_address)
