"""Campaign results on disk: settings, fingerprints, atomic writes, resume, validation, merging.

A result file (JSON) holds the settings of a campaign (``SETTINGS_KEYS``), its clean value and per
BER the per-pattern values ``a_{p,r}`` with their mean, population standard deviation
``sqrt(mean_r (a_{p,r} - mean)^2)`` (``ddof = 0``, so ``R = 1`` gives 0, not NaN), minimum and maximum.
Top-1 values are stored under ``clean_accuracy`` / ``accuracies`` (as since the first files), other
metrics under ``clean_value`` / ``values``; ``metric`` names the metric and whether higher is better.

Schema: ``schema_version`` (:data:`SCHEMA_VERSION`); files without it (version 1, written before the
engine) load as top-1 results on in-memory tensors hashed with SHA-256, and resume.

Detected uncorrectable errors (schema 4): when the error model can detect errors (SECDED, parity:
:func:`qmargin.faults.detects_errors`), ``evaluation.count_dues`` is ``true`` and every BER entry holds
``dues`` (per pattern, the number of codewords with a DUE, whatever the DUE policy), ``flagged`` (the
fraction of patterns with at least one DUE; every inference reads every stored weight, so it is also
the fraction of inferences a system would see flagged) and ``unflagged_mean`` (the mean metric over the
patterns without a DUE, ``null`` when there is none). A campaign with per-layer protection stores the
resolved plan and its memory overhead under ``protection`` (:class:`qmargin.faults.ProtectionPlan`;
derived from ``error_model`` and the model, so not a setting of its own).

Resume: a rerun with identical settings continues where the file stopped and produces the same
result as an uninterrupted run, apart from ``timing``. Settings that differ are named, each with its
old and new value, in one line (:func:`settings_diff`). Outcomes of cells may arrive in any order
(:meth:`CampaignState.record`). Per BER the file lists the values of the patterns done; when they
are not the prefix ``r = 0 .. n-1`` (a partial run on workers, a shard) ``results[k].patterns``
names them (ascending), so nothing computed is lost. A complete result never has ``patterns``.

Shards (``--shard I/N``, :func:`shard_patterns`): the cell ``(k, r)`` has the stable index
``k * repeats + r`` (BER-major) and shard ``I`` of ``N`` (``1 <= I <= N``) holds the cells whose index
is ``I - 1`` modulo ``N``. A shard result records ``"shard": {"index": I, "count": N}`` and
``patterns`` at every BER; it is ``complete`` when it holds all of its cells. :func:`merge_results`
combines shards (or any results of one campaign) into the result of a sequential run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qmargin.engine.cells import CellOutcome, PassResult
from qmargin.engine.grid import MAX_REPEATS, MAX_SEED, Grid
from qmargin.engine.stopping import StoppingRule
from qmargin.errors import CheckpointError, ConfigError
from qmargin.files import write_text_atomic
from qmargin.stats import summarize_accuracies
from qmargin.training.validation import invalid, req_dict, req_float, req_int, req_list

__all__ = [
    "SCHEMA_VERSION",
    "SETTINGS_KEYS",
    "DATA_DERIVED",
    "CampaignState",
    "campaign_csv_path",
    "load_campaign",
    "validate_campaign",
    "upgrade",
    "settings_diff",
    "summarize_accuracies",
    "value_keys",
    "result_values",
    "jsonable",
    "dumps",
    "csv_text",
    "shard_patterns",
    "entry_patterns",
    "merge_results",
    "shard_label",
]

SCHEMA_VERSION = 4
"""4: optional ``activations`` (activation bit errors, :mod:`qmargin.engine.activations`), optional
``dues`` / ``flagged`` / ``unflagged_mean`` per BER and ``protection`` (detected errors and per-layer
protection, :mod:`qmargin.faults.protection`); 3: optional ``stopping`` (sequential stopping,
:mod:`qmargin.engine.stopping`); 2: ``metric``. Files of versions 1 to 3 load (:func:`upgrade`) and
resume: they had no activation errors and no detecting fault kinds."""

#: Keys of a campaign result that must match for a rerun to resume an existing file.
SETTINGS_KEYS = (
    "bers",
    "repeats",
    "base_seed",
    "seeds",
    "error_model",
    "config",
    "fingerprint",
    "evaluation",
    "metric",
    "qmargin_version",
    "stopping",
    "activations",
)
"""(``stopping`` only in results of campaigns with a stopping rule, ``activations`` only in those
with quantized activation buffers.)"""

#: Settings only known after a pass over streamed data (compared once the clean pass has run).
DATA_DERIVED = (
    "fingerprint.data_sha256",
    "evaluation.n_test",
    "evaluation.count_failures",
    "evaluation.patterns_per_pass",
)

TOP1 = {"name": "top1", "higher_is_better": True, "fraction": True}
_SUMMARY_TOL = 1e-9


def campaign_csv_path(out_path: str | Path) -> Path:
    """The CSV written beside a campaign JSON: same name with suffix ``.csv``."""
    return Path(out_path).with_suffix(".csv")


def value_keys(metric: Mapping[str, Any] | None) -> tuple[str, str]:
    """``("clean_accuracy", "accuracies")`` for top-1 (and files without a metric), else
    ``("clean_value", "values")``."""
    if metric is None or metric.get("name") == "top1":
        return "clean_accuracy", "accuracies"
    return "clean_value", "values"


def result_values(result: Mapping[str, Any]) -> tuple[float, list[list[float]]]:
    """The clean value and the per-BER value lists of a result, whatever its metric."""
    clean_key, key = value_keys(result.get("metric"))
    return result[clean_key], [list(e[key]) for e in result["results"]]


def jsonable(value: Any, what: str = "campaign config") -> Any:
    """Normalize through JSON (tuples become lists, ...) so stored and new settings compare equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} is not JSON-serializable: {err}") from None


def dumps(result: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=1, allow_nan=False) + "\n"


# -- loading, validation, old files ----------------------------------------------------------------
def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A result of any schema version as the current one (a copy; version-1 files get ``metric``
    top-1, ``evaluation.data_fingerprint = "sha256"`` and ``schema_version``)."""
    version = data.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return data
    out = dict(data)
    if version in (2, 3):
        out["schema_version"] = SCHEMA_VERSION
        return out
    out.setdefault("metric", dict(TOP1))
    ev = dict(out.get("evaluation", {}))
    ev.setdefault("data_fingerprint", "sha256")
    out["evaluation"] = ev
    out["schema_version"] = SCHEMA_VERSION
    return out


def load_campaign(path: str | Path) -> dict[str, Any]:
    """Read a campaign result JSON (any schema version, returned as written), validated by
    :func:`validate_campaign` (a one-line :class:`CheckpointError` when anything is wrong)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no campaign result at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a campaign result (invalid JSON: {err})") from None
    if (
        not isinstance(data, dict)
        or "results" not in data
        or not ("clean_accuracy" in data or "clean_value" in data)
    ):
        raise CheckpointError(f"{path} is not a campaign result (no 'results' / 'clean_accuracy')")
    return validate_campaign(path, data)


def validate_campaign(where: str | Path, data: Any) -> dict[str, Any]:
    """Check a campaign result (``ber.json``) against its own settings; return it unchanged.

    ``schema_version`` 1 (absent) to :data:`SCHEMA_VERSION`; ``activations`` (version 4) a mapping
    with ``bits`` in 2..8, ``layers`` and ``ber`` (a rate or ``"grid"``); ``repeats`` in
    ``[1, MAX_REPEATS]`` and
    ``seeds == base_seed + r``; one ``results`` entry per grid BER (same order); per BER at most
    ``repeats`` values (exactly ``repeats`` when ``status`` is ``"complete"``); fractions (top-1,
    top-k) in ``[0, 1]``, other metrics finite; ``mean``/``std``/``min``/``max`` present exactly
    when there are values and equal to :func:`summarize_accuracies` of them; failure counts
    non-negative integers, one per value, at most ``evaluation.n_test``.
    """
    req_dict(where, data, "campaign result")
    version = data.get("schema_version", 1)
    if version not in (1, 2, 3, SCHEMA_VERSION):
        raise invalid(
            where, f"schema_version {version!r} is not one this qmargin reads (1 to {SCHEMA_VERSION})"
        )
    status = data.get("status")
    if status not in ("partial", "complete"):
        raise invalid(where, f"status must be 'partial' or 'complete', got {status!r}")
    repeats = req_int(where, data.get("repeats"), "repeats", lo=1, hi=MAX_REPEATS)
    base_seed = req_int(where, data.get("base_seed"), "base_seed", lo=0, hi=MAX_SEED - repeats)
    seeds = req_list(where, data.get("seeds"), "seeds", length=repeats)
    if seeds != [base_seed + r for r in range(repeats)]:
        raise invalid(where, "seeds are not base_seed + r for r = 0 .. repeats - 1")
    bers = req_list(where, data.get("bers"), "bers")
    if not bers:
        raise invalid(where, "bers is empty")
    grid = [req_float(where, b, "bers entry", lo=0.0, hi=1.0) for b in bers]
    metric = req_dict(where, data.get("metric", TOP1), "metric")
    if not isinstance(metric.get("name"), str) or not isinstance(metric.get("higher_is_better"), bool):
        raise invalid(where, "metric needs a name (string) and higher_is_better (bool)")
    fraction = metric.get("fraction", True) is True
    lo, hi = (0.0, 1.0) if fraction else (None, None)
    clean_key, key = value_keys(metric)
    evaluation = req_dict(where, data.get("evaluation", {}), "evaluation")
    n_test = None
    if "n_test" in evaluation:
        n_test = req_int(where, evaluation["n_test"], "evaluation.n_test", lo=1)
    counted = evaluation.get("count_failures", False) is True
    dues_counted = evaluation.get("count_dues", False) is True
    req_float(where, data.get(clean_key), clean_key, lo=lo, hi=hi)
    if counted and "clean_failures" not in data:
        raise invalid(where, "evaluation.count_failures is set but clean_failures is missing")
    if "clean_failures" in data:
        req_int(where, data["clean_failures"], "clean_failures", lo=0, hi=n_test)
    if "activations" in data:
        _valid_activations(where, data["activations"], version)
    shard = _valid_shard(where, data.get("shard"), len(grid) * repeats)
    rule = _valid_stopping(where, data, shard)
    results = req_list(where, data.get("results"), "results", length=len(grid))
    for i, (ber, entry) in enumerate(zip(grid, results, strict=True)):
        name = f"results[{i}]"
        req_dict(where, entry, name)
        if req_float(where, entry.get("ber"), f"{name}.ber", lo=0.0, hi=1.0) != ber:
            raise invalid(where, f"{name}.ber is {entry['ber']}, the grid has {ber}")
        vals = req_list(where, entry.get(key), f"{name}.{key}")
        if len(vals) > repeats:
            raise invalid(where, f"{name} has {len(vals)} {key}, more than repeats ({repeats})")
        if status == "complete" and shard is None and rule is None and len(vals) != repeats:
            raise invalid(where, f"{name} has {len(vals)} {key}; a complete result has {repeats}")
        values = [req_float(where, a, f"{name}.{key} entry", lo=lo, hi=hi) for a in vals]
        if rule is not None:
            if "patterns" in entry:
                raise invalid(where, f"{name}: a result with a stopping rule holds a prefix of patterns")
            if status == "complete" and rule.stop_point(values, repeats) != len(values):
                raise invalid(
                    where,
                    f"{name} has {len(values)} {key}; its stopping rule stops at "
                    f"{rule.stop_point(values, repeats)}",
                )
        _valid_patterns(
            where, entry, name, len(vals), repeats, i, shard, complete=status == "complete" and rule is None
        )
        if counted and "failures" not in entry:
            raise invalid(where, f"evaluation.count_failures is set but {name}.failures is missing")
        if "failures" in entry:
            fails = req_list(where, entry["failures"], f"{name}.failures", length=len(vals))
            for f in fails:
                req_int(where, f, f"{name}.failures entry", lo=0, hi=n_test)
        if dues_counted and "dues" not in entry:
            raise invalid(where, f"evaluation.count_dues is set but {name}.dues is missing")
        if "dues" in entry:
            dues = [
                req_int(where, d, f"{name}.dues entry", lo=0)
                for d in req_list(where, entry["dues"], f"{name}.dues", length=len(vals))
            ]
            expected_due = _due_summary(values, dues)
            for k2, want in expected_due.items():
                got = entry.get(k2)
                if (got is None) != (want is None) or (
                    want is not None and abs(float(got) - want) > _SUMMARY_TOL * max(1.0, abs(want))
                ):
                    raise invalid(where, f"{name}.{k2} is {got!r}, its dues give {want!r}")
        stats = ("mean", "std", "min", "max")
        if not values:
            present = [k for k in stats if k in entry]
            if present:
                raise invalid(where, f"{name} has {present[0]} but no {key}")
            continue
        expected = summarize_accuracies(values)
        for k in stats:
            v = req_float(where, entry.get(k), f"{name}.{k}", lo=lo if k != "std" else 0.0, hi=hi)
            if abs(v - expected[k]) > _SUMMARY_TOL * max(1.0, abs(expected[k])):
                raise invalid(where, f"{name}.{k} is {v:g}, its {key} give {expected[k]:g}")
    timing = data.get("timing")
    if timing is not None:
        req_dict(where, timing, "timing")
        if "seconds" in timing:
            req_float(where, timing["seconds"], "timing.seconds", lo=0.0)
    return data


def _valid_activations(where: str | Path, act: Any, version: Any) -> None:
    """The ``activations`` settings of a version-4 result: bits, layers and the activation BER."""
    if version != SCHEMA_VERSION:
        raise invalid(
            where, f"activations appear in schema_version {SCHEMA_VERSION} results, not {version!r}"
        )
    req_dict(where, act, "activations")
    req_int(where, act.get("bits"), "activations.bits", lo=2, hi=8)
    layers = req_list(where, act.get("layers"), "activations.layers")
    if not layers or not all(isinstance(n, str) for n in layers):
        raise invalid(where, "activations.layers must be a non-empty list of layer names")
    ber = act.get("ber")
    if ber != "grid":
        req_float(where, ber, "activations.ber", lo=0.0, hi=1.0)


def _due_summary(values: Sequence[float], dues: Sequence[int]) -> dict[str, float | None]:
    """``flagged``: fraction of patterns with a DUE; ``unflagged_mean``: mean value of the others
    (``None`` without any); both ``None`` without patterns."""
    if not dues:
        return {"flagged": None, "unflagged_mean": None}
    clean = [v for v, d in zip(values, dues, strict=True) if d == 0]
    return {
        "flagged": sum(1 for d in dues if d > 0) / len(dues),
        "unflagged_mean": sum(clean) / len(clean) if clean else None,
    }


def _valid_stopping(where: str | Path, data: Mapping[str, Any], shard: Any) -> StoppingRule | None:
    """The stopping rule of a result (``None`` without one); never in a shard result."""
    if "stopping" not in data:
        return None
    if shard is not None:
        raise invalid(where, "a shard result cannot have a stopping rule")
    req_dict(where, data["stopping"], "stopping")
    try:
        return StoppingRule.from_dict(data["stopping"])
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise invalid(where, f"stopping is not a valid stopping rule ({err})") from None


def _valid_shard(where: str | Path, shard: Any, cells: int) -> tuple[int, int] | None:
    """``(index, count)`` of a shard result (``1 <= index <= count <= cells``), ``None`` for others."""
    if shard is None:
        return None
    req_dict(where, shard, "shard")
    count = req_int(where, shard.get("count"), "shard.count", lo=1, hi=cells)
    index = req_int(where, shard.get("index"), "shard.index", lo=1, hi=count)
    return index, count


def _valid_patterns(
    where: str | Path,
    entry: Mapping[str, Any],
    name: str,
    n: int,
    repeats: int,
    k: int,
    shard: tuple[int, int] | None,
    *,
    complete: bool,
) -> None:
    """``entry["patterns"]``: ascending distinct pattern indices, one per value, of the shard's cells
    (all of them when complete); required in a shard result."""
    if "patterns" not in entry:
        if shard is not None:
            raise invalid(where, f"{name} of a shard result has no patterns")
        return
    pats = req_list(where, entry["patterns"], f"{name}.patterns", length=n)
    for r in pats:
        req_int(where, r, f"{name}.patterns entry", lo=0, hi=repeats - 1)
    if any(a >= b for a, b in zip(pats, pats[1:], strict=False)):
        raise invalid(where, f"{name}.patterns are not ascending and distinct")
    own = shard_patterns(k, repeats, shard)
    if not set(pats) <= set(own):
        what = f"shard {shard[0]}/{shard[1]}" if shard is not None else "the grid"
        raise invalid(where, f"{name}.patterns hold a pattern outside {what}")
    if complete and len(pats) != len(own):
        raise invalid(where, f"{name} has {len(pats)} patterns; a complete result has {len(own)}")


def shard_patterns(k: int, repeats: int, shard: tuple[int, int] | None) -> list[int]:
    """The patterns ``r`` of BER index ``k`` that belong to ``shard = (I, N)``: the cells whose index
    ``k * repeats + r`` is ``I - 1`` modulo ``N`` (all ``0 .. repeats-1`` when ``shard`` is ``None``)."""
    if shard is None:
        return list(range(repeats))
    index, count = shard
    return [r for r in range(repeats) if (k * repeats + r) % count == index - 1]


def entry_patterns(entry: Mapping[str, Any], n: int) -> list[int]:
    """The pattern of each of the ``n`` values of a results entry (``patterns``, else ``0 .. n-1``)."""
    pats = entry.get("patterns")
    return list(pats) if isinstance(pats, list) else list(range(n))


# -- settings --------------------------------------------------------------------------------------
def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k in sorted(value):
            _flat(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = value


_MISSING = object()


def _show(v: Any) -> str:
    if v is _MISSING:
        return "(absent)"
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:28] + "..." + s[-28:]


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, skip: Sequence[str] = ()) -> list[str]:
    """``["repeats 4 -> 5", "fingerprint.model_sha256 "ab..." -> "cd..."", ...]``: every setting
    (dotted path) whose stored value differs from the new one; ``skip`` paths (and their children)
    are left out. ``seeds`` is left out when ``repeats`` or ``base_seed`` already differ."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    for key in SETTINGS_KEYS:
        _flat(key, old.get(key, _MISSING), a)
        _flat(key, new.get(key, _MISSING), b)
    out = []
    for path in sorted(set(a) | set(b), key=lambda p: (SETTINGS_KEYS.index(p.split(".")[0]), p)):
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        va, vb = a.get(path, _MISSING), b.get(path, _MISSING)
        if va != vb:
            out.append(f"{path} {_show(va)} -> {_show(vb)}")
    if any(d.split(" ")[0] in ("repeats", "base_seed") for d in out):
        out = [d for d in out if not d.startswith("seeds ")]
    return out


# -- the state of a running campaign ---------------------------------------------------------------
class CampaignState:
    """Clean outcome and per-cell outcomes of a campaign (or of one shard); assembles the result dict.

    :meth:`record` accepts cells in any order (shards, workers); :meth:`result` lists per BER the
    values of the patterns done in pattern order (with ``patterns`` when they are not the prefix
    ``0 .. n-1``), so a complete state gives the same result as a sequential run, and a partial
    one keeps every value for a resume."""

    def __init__(self, grid: Grid, settings: dict[str, Any], *, shard: tuple[int, int] | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.shard = shard
        self.clean: PassResult | None = None
        self.clean_value: float | None = None
        self.clean_failures: int | None = None
        self.values: list[dict[int, float]] = [{} for _ in grid.bers]
        self.failures: list[dict[int, int]] = [{} for _ in grid.bers]
        self.dues: list[dict[int, int]] = [{} for _ in grid.bers]
        self.prior_seconds = 0.0
        self._own = [shard_patterns(k, grid.repeats, shard) for k in range(len(grid.bers))]
        stopping = settings.get("stopping")
        self.rule = StoppingRule.from_dict(stopping) if stopping is not None else None
        if self.rule is not None and shard is not None:
            raise ConfigError("a campaign with a stopping rule (--ci-halfwidth) cannot be sharded")

    @property
    def count_failures(self) -> bool:
        return bool(self.settings["evaluation"]["count_failures"])

    @property
    def count_dues(self) -> bool:
        """Whether DUEs are stored per pattern (an error model that detects: SECDED, parity)."""
        return bool(self.settings["evaluation"].get("count_dues", False))

    def record_clean(self, res: PassResult) -> None:
        self.clean_value = res.value
        if self.count_failures:
            self.clean_failures = res.failures

    def record(self, outcome: CellOutcome) -> None:
        cell = outcome.cell
        if cell is None:
            self.record_clean(outcome.result)
            return
        if self.grid.cell(cell.k, cell.pattern) != cell:
            raise ValueError(f"{cell} is not a cell of this grid")
        self.values[cell.k][cell.pattern] = outcome.value
        if self.count_failures:
            self.failures[cell.k][cell.pattern] = outcome.result.failures
        if self.count_dues:
            self.dues[cell.k][cell.pattern] = int(outcome.result.dues)

    def prefix(self, k: int) -> int:
        """Number of leading patterns of BER ``k`` that are done."""
        r = 0
        while r in self.values[k]:
            r += 1
        return r

    def stopped_at(self, k: int) -> int | None:
        """With a stopping rule: the number of patterns BER ``k`` stopped at, ``None`` while it runs."""
        assert self.rule is not None
        n = self.prefix(k)
        return self.rule.stop_point([self.values[k][r] for r in range(n)], self.grid.repeats)

    @property
    def total(self) -> int:
        """Number of cells of this campaign (of its shard); with a stopping rule, an upper bound
        (``repeats`` for every BER still running) that shrinks as BERs stop."""
        if self.rule is None:
            return sum(len(own) for own in self._own)
        stops = [self.stopped_at(k) for k in range(len(self.grid.bers))]
        return sum(self.grid.repeats if n is None else n for n in stops)

    @property
    def done(self) -> int:
        """Number of cells done."""
        return sum(len(v) for v in self.values)

    def pending(self) -> list[tuple[int, int]]:
        """``(k, r)`` of every cell (of the shard) not done, BER-major. With a stopping rule, only
        the cells up to the next checkpoint of every BER that has not stopped (the next round): a
        pure function of the values recorded, so any executor and any resume run the same rounds."""
        if self.rule is None:
            return [(k, r) for k, own in enumerate(self._own) for r in own if r not in self.values[k]]
        out = []
        for k in range(len(self.grid.bers)):
            if self.stopped_at(k) is None:
                target = self.rule.next_checkpoint(self.prefix(k), self.grid.repeats)
                out += [(k, r) for r in range(target) if r not in self.values[k]]
        return out

    @property
    def complete(self) -> bool:
        """Every cell done, or with a stopping rule every BER stopped."""
        if self.rule is None:
            return self.done == self.total
        return all(self.stopped_at(k) is not None for k in range(len(self.grid.bers)))

    def resume_from(self, old: dict[str, Any]) -> None:
        """Take the clean value, the per-pattern values and the timing of a stored result (upgraded)."""
        clean_key, key = value_keys(old.get("metric"))
        self.clean_value = old[clean_key]
        if "clean_failures" in old:
            self.clean_failures = old["clean_failures"]
        for k, res in enumerate(old["results"]):
            pats = entry_patterns(res, len(res[key]))
            for r, v in zip(pats, res[key], strict=True):
                self.values[k][r] = v
            for r, f in zip(pats, res.get("failures", []), strict=False):
                self.failures[k][r] = f
            for r, d in zip(pats, res.get("dues", []), strict=False):
                self.dues[k][r] = d
        self.prior_seconds = float(old.get("timing", {}).get("seconds", 0.0))

    def result(self, seconds: float) -> dict[str, Any]:
        """The result dict; everything except ``timing`` is a pure function of settings and values."""
        assert self.clean_value is not None
        clean_key, key = value_keys(self.settings["metric"])
        results = []
        for k, ber in enumerate(self.grid.bers):
            pats = sorted(self.values[k])
            vals = [self.values[k][r] for r in pats]
            row: dict[str, Any] = {"ber": ber}
            if vals:
                row.update(summarize_accuracies(vals))
            row[key] = vals
            if self.count_failures:
                row["failures"] = [self.failures[k][r] for r in pats]
            if self.count_dues:
                row["dues"] = [self.dues[k][r] for r in pats]
                row.update(_due_summary(vals, row["dues"]))
            if self.shard is not None or pats != list(range(len(pats))):
                row["patterns"] = pats
            if self.rule is not None and vals:
                hw = self.rule.halfwidth_of(vals)
                row["ci_halfwidth"] = hw  # the half-width reached (None for one pattern)
                row["ci_target_met"] = hw is not None and hw <= self.rule.halfwidth
            results.append(row)
        out: dict[str, Any] = {clean_key: self.clean_value}
        if self.clean_failures is not None and self.count_failures:
            out["clean_failures"] = self.clean_failures
        out["results"] = results
        out.update({k: self.settings[k] for k in SETTINGS_KEYS if k in self.settings})
        for extra in ("weights", "protection"):
            if extra in self.settings:
                out[extra] = self.settings[extra]
        if self.shard is not None:
            out["shard"] = {"index": self.shard[0], "count": self.shard[1]}
        out["schema_version"] = SCHEMA_VERSION
        done = self.done
        out["status"] = "complete" if self.complete else "partial"
        out["timing"] = {"seconds": round(self.prior_seconds + seconds, 6), "patterns_done": done}
        for v in [self.clean_value, *(x for e in results for x in e[key])]:
            if not math.isfinite(v):
                raise ConfigError(f"non-finite metric value {v}")  # unreachable: metrics check their sums
        return out

    def write(self, path: Path, seconds: float) -> dict[str, Any]:
        result = self.result(seconds)
        write_text_atomic(path, dumps(result))
        return result


def shard_label(result: Mapping[str, Any]) -> str:
    """``"shard 2/4"`` of a shard result, ``"not a shard"`` otherwise."""
    shard = result.get("shard")
    return f"shard {shard['index']}/{shard['count']}" if isinstance(shard, dict) else "not a shard"


def merge_results(
    items: Sequence[tuple[str, Mapping[str, Any]]], *, allow_partial: bool = False
) -> dict[str, Any]:
    """Combine validated results of one campaign (shards, or any results holding disjoint cells)
    into one result, identical to a sequential run's apart from ``timing`` (the shards' seconds
    summed). ``items``: ``(name, result)`` pairs (``name`` appears in the messages).

    One-line :class:`ConfigError` when the settings differ (each differing setting named, as
    :func:`settings_diff`), the weights or the clean values differ, a cell is held twice, or cells
    are missing (unless ``allow_partial``: then a ``partial`` result that a rerun of the campaign
    with this file as its output resumes)."""
    if not items:
        raise ConfigError("nothing to merge: give the shard results")
    results = [(name, upgrade(dict(r))) for name, r in items]
    for name, stored in results:
        if "stopping" in stored:
            raise ConfigError(f"{name} ran with a stopping rule (--ci-halfwidth): it is not a shard to merge")
    name0, first = results[0]
    for name, other in results[1:]:
        diff = settings_diff(first, other)
        if diff:
            raise ConfigError(
                f"{name} and {name0} are not shards of one campaign: {'; '.join(diff)} ({name0} -> {name})"
            )
        if other.get("weights") != first.get("weights"):
            raise ConfigError(f"{name} and {name0} were computed from other weights")
        for key in ("clean_accuracy", "clean_value", "clean_failures"):
            if other.get(key) != first.get(key):
                raise ConfigError(
                    f"{name} and {name0} measured other clean values ({key} {first.get(key)} -> "
                    f"{other.get(key)}): the model or data differ"
                )
    settings = {k: first[k] for k in SETTINGS_KEYS if k in first}
    for extra in ("weights", "protection"):
        if extra in first:
            settings[extra] = first[extra]
    grid = Grid.make(first["bers"], first["repeats"], first["base_seed"])
    state = CampaignState(grid, settings)
    clean_key, key = value_keys(first.get("metric"))
    state.clean_value = first[clean_key]
    if "clean_failures" in first:
        state.clean_failures = first["clean_failures"]
    owner: dict[tuple[int, int], str] = {}
    for name, res in results:
        for k, entry in enumerate(res["results"]):
            pats = entry_patterns(entry, len(entry[key]))
            fails = entry.get("failures")
            dues = entry.get("dues")
            for i, (r, v) in enumerate(zip(pats, entry[key], strict=True)):
                if (k, r) in owner:
                    raise ConfigError(
                        f"{owner[k, r]} and {name} both hold the cell BER {grid.bers[k]:g}, pattern {r}: "
                        "give each shard once"
                    )
                owner[k, r] = name
                state.values[k][r] = v
                if fails is not None:
                    state.failures[k][r] = fails[i]
                if dues is not None:
                    state.dues[k][r] = dues[i]
        state.prior_seconds += float(res.get("timing", {}).get("seconds", 0.0))
    missing = state.pending()
    if missing and not allow_partial:
        k, r = missing[0]
        counts = {r.get("shard", {}).get("count") for _, r in results}
        hint = ""
        if len(counts) == 1 and None not in counts:
            n = counts.pop()
            have = {r["shard"]["index"]: name for name, r in results}
            absent = [f"{i}/{n}" for i in range(1, n + 1) if i not in have]
            partial = [f"{name} ({shard_label(r)})" for name, r in results if r["status"] != "complete"]
            hint = "; ".join(
                ([f"not given: shard {', '.join(absent)}"] if absent else [])
                + ([f"partial: {', '.join(partial)}"] if partial else [])
            )
            hint = f" ({hint})" if hint else ""
        raise ConfigError(
            f"{len(missing)} of {grid.size} cells are missing, the first BER {grid.bers[k]:g}, "
            f"pattern {r}{hint}; give every shard, complete (or allow a partial result: --allow-partial)"
        )
    return state.result(0.0)


def csv_text(result: Mapping[str, Any]) -> str:
    """One row per (ber, pattern): ``ber, pattern, seed, accuracy`` (top-1) or ``value`` (other
    metrics), and ``failures`` / ``dues`` when counted."""
    _, key = value_keys(result.get("metric"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with_failures = bool(result["evaluation"]["count_failures"])
    with_dues = bool(result["evaluation"].get("count_dues", False))
    name = "accuracy" if key == "accuracies" else "value"
    header = ["ber", "pattern", "seed", name] + (["failures"] if with_failures else [])
    w.writerow(header + (["dues"] if with_dues else []))
    for res in result["results"]:
        for i, (r, acc) in enumerate(zip(entry_patterns(res, len(res[key])), res[key], strict=True)):
            row = [repr(float(res["ber"])), r, result["seeds"][r], repr(float(acc))]
            if with_failures:
                row.append(res["failures"][i])
            if with_dues:
                row.append(res["dues"][i])
            w.writerow(row)
    return buf.getvalue()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
