"""Bit-error evaluation campaigns (design.md §4).

For every bit error rate ``p`` of a grid and every pattern index ``r = 0 .. R-1``: inject random bit
errors into the stored integer codes of the model (``qmargin.faults.inject``), measure the test
accuracy, restore the codes exactly. The clean accuracy (no injection) is measured once.

Seed scheme (paired comparisons, the protocol of Stutz et al., MLSys 2021): pattern ``r`` uses the
seed ``s_r = base_seed + r`` **at every BER and for every model**. ``qmargin.faults`` derives the seed
of each tensor from ``s_r`` and the tensor's identity, so two models with the same layer names and
shapes see exactly the same flipped bit positions, and the comparison of their accuracies is paired.

Per BER the result holds the per-pattern accuracies ``a_{p,r}`` (fractions in ``[0, 1]``) and their
mean, population standard deviation ``sqrt(mean_r (a_{p,r} - mean)^2)`` (``ddof = 0``, so ``R = 1``
gives 0, not NaN), minimum and maximum.

Convergence protocol (MonDEQ models; :class:`qmargin.models.protocols.ReportsConvergence`): if, after
a forward pass, the model has an attribute ``converged`` holding a bool tensor with one entry per
sample of that batch, samples whose flag
is ``False`` count as errors (wrong predictions whatever their argmax) and are counted in
``"failures"`` (one count per pattern; ``"clean_failures"`` for the clean run).

Resumable: after the clean run and after every pattern the partial result is written atomically to
``out_path`` (``"status": "partial"``). A rerun with the same ``out_path`` and identical settings
continues where it stopped and produces the same final JSON as an uninterrupted run, apart from the
``"timing"`` field (the only field that depends on wall-clock time).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import qmargin
from qmargin.errors import CheckpointError, ConfigError, DataError
from qmargin.files import check_outputs, holds_lock, write_text_atomic
from qmargin.interop import CodeGroup, stored_code_groups
from qmargin.models.protocols import ReportsConvergence
from qmargin.quant import quantized_modules
from qmargin.training.validation import invalid, req_accuracy, req_dict, req_float, req_int, req_list

__all__ = [
    "CampaignProgress",
    "run_ber_campaign",
    "load_campaign",
    "validate_campaign",
    "campaign_csv_path",
    "weights_record",
    "check_result_weights",
    "summarize_accuracies",
]

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
    "qmargin_version",
)


@dataclass(frozen=True)
class CampaignProgress:
    """What the ``progress`` callback receives after each completed pattern.

    ``done``/``total`` count patterns (``len(bers) * repeats``), including the ones a resumed run
    found already finished.
    """

    done: int
    total: int
    ber: float
    pattern: int
    seed: int
    accuracy: float


def campaign_csv_path(out_path: str | Path) -> Path:
    """The CSV written beside a campaign JSON: same name with suffix ``.csv``."""
    return Path(out_path).with_suffix(".csv")


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_record(weights_file: str | Path) -> dict[str, str]:
    """``{"file": absolute path, "sha256": ...}`` of the weights a result is computed from; stored in
    the result (``"weights"``) so that it is never shown for other weights (:func:`check_result_weights`)."""
    p = Path(weights_file)
    return {"file": str(p.resolve()), "sha256": _file_sha256(p)}


def check_result_weights(result: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Refuse a stored result whose weights file now holds other weights (the run was retrained since)
    with a one-line :class:`CheckpointError`; return ``result``. Results without a record (older
    files, campaigns on models that are not run directories) and weights files that are gone pass."""
    rec = result.get("weights")
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
        return result
    weights = Path(rec["file"])
    if weights.is_file() and _file_sha256(weights) != rec.get("sha256"):
        raise CheckpointError(
            f"{path}: these results belong to other weights than {weights} now holds (the run was "
            "trained again); evaluate it again"
        )
    return result


def summarize_accuracies(accuracies: Sequence[float]) -> dict[str, float]:
    """``mean``, population ``std`` (ddof 0), ``min``, ``max`` of per-pattern accuracies."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no accuracies to summarize")
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def load_campaign(path: str | Path) -> dict[str, Any]:
    """Read a campaign result JSON written by :func:`run_ber_campaign`, validated by
    :func:`validate_campaign` (a one-line :class:`CheckpointError` when anything is wrong)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no campaign result at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a campaign result (invalid JSON: {err})") from None
    if not isinstance(data, dict) or "results" not in data or "clean_accuracy" not in data:
        raise CheckpointError(f"{path} is not a campaign result (no 'results' / 'clean_accuracy')")
    return validate_campaign(path, data)


_SUMMARY_TOL = 1e-9


def validate_campaign(where: str | Path, data: Any) -> dict[str, Any]:
    """Check a campaign result (``ber.json``) against its own settings; return it unchanged.

    Accuracies are fractions in ``[0, 1]``; ``repeats`` >= 1 and ``seeds == base_seed + r``; one
    ``results`` entry per grid BER (same order); per BER at most ``repeats`` accuracies (exactly
    ``repeats`` when ``status`` is ``"complete"``); ``mean``/``std``/``min``/``max`` present exactly
    when there are accuracies and equal to :func:`summarize_accuracies` of them; failure counts
    non-negative integers, one per accuracy, at most ``evaluation.n_test``.
    """
    req_dict(where, data, "campaign result")
    status = data.get("status")
    if status not in ("partial", "complete"):
        raise invalid(where, f"status must be 'partial' or 'complete', got {status!r}")
    repeats = req_int(where, data.get("repeats"), "repeats", lo=1)
    base_seed = req_int(where, data.get("base_seed"), "base_seed", lo=0)
    seeds = req_list(where, data.get("seeds"), "seeds", length=repeats)
    if seeds != [base_seed + r for r in range(repeats)]:
        raise invalid(where, "seeds are not base_seed + r for r = 0 .. repeats - 1")
    bers = req_list(where, data.get("bers"), "bers")
    if not bers:
        raise invalid(where, "bers is empty")
    grid = [req_float(where, b, "bers entry", lo=0.0, hi=1.0) for b in bers]
    evaluation = req_dict(where, data.get("evaluation", {}), "evaluation")
    n_test = None
    if "n_test" in evaluation:
        n_test = req_int(where, evaluation["n_test"], "evaluation.n_test", lo=1)
    counted = evaluation.get("count_failures", False) is True
    req_accuracy(where, data.get("clean_accuracy"), "clean_accuracy")
    if counted and "clean_failures" not in data:
        raise invalid(where, "evaluation.count_failures is set but clean_failures is missing")
    if "clean_failures" in data:
        req_int(where, data["clean_failures"], "clean_failures", lo=0, hi=n_test)
    results = req_list(where, data.get("results"), "results", length=len(grid))
    for i, (ber, entry) in enumerate(zip(grid, results, strict=True)):
        name = f"results[{i}]"
        req_dict(where, entry, name)
        if req_float(where, entry.get("ber"), f"{name}.ber", lo=0.0, hi=1.0) != ber:
            raise invalid(where, f"{name}.ber is {entry['ber']}, the grid has {ber}")
        accs = req_list(where, entry.get("accuracies"), f"{name}.accuracies")
        if len(accs) > repeats:
            raise invalid(where, f"{name} has {len(accs)} accuracies, more than repeats ({repeats})")
        if status == "complete" and len(accs) != repeats:
            raise invalid(where, f"{name} has {len(accs)} accuracies; a complete result has {repeats}")
        values = [req_accuracy(where, a, f"{name}.accuracies entry") for a in accs]
        if counted and "failures" not in entry:
            raise invalid(where, f"evaluation.count_failures is set but {name}.failures is missing")
        if "failures" in entry:
            fails = req_list(where, entry["failures"], f"{name}.failures", length=len(accs))
            for f in fails:
                req_int(where, f, f"{name}.failures entry", lo=0, hi=n_test)
        stats = ("mean", "std", "min", "max")
        if not values:
            present = [k for k in stats if k in entry]
            if present:
                raise invalid(where, f"{name} has {present[0]} but no accuracies")
            continue
        expected = summarize_accuracies(values)
        for k in stats:
            v = req_float(where, entry.get(k), f"{name}.{k}", lo=0.0, hi=1.0)
            if abs(v - expected[k]) > _SUMMARY_TOL:
                raise invalid(where, f"{name}.{k} is {v:g}, its accuracies give {expected[k]:g}")
    timing = data.get("timing")
    if timing is not None:
        req_dict(where, timing, "timing")
        if "seconds" in timing:
            req_float(where, timing["seconds"], "timing.seconds", lo=0.0)
    return data


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Normalize through JSON (tuples become lists, ...) so stored and new settings compare equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"campaign config is not JSON-serializable: {err}") from None


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_entry(h: Any, name: str, t: Tensor) -> None:
    """Hash a state-dict entry; a wrapper tensor subclass (torchao's) by its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) in (Tensor, nn.Parameter) or flatten is None:
        _hash_tensor(h, name, t)
        return
    for inner in flatten()[0]:
        _hash_entry(h, f"{name}.{inner}", getattr(t, inner))


def _model_fingerprint(model: nn.Module, foreign: Sequence[CodeGroup] = ()) -> str:
    """SHA-256 of the state dict plus the live integer codes (a rerun must evaluate the same model).

    ``foreign``: pinned stored tensors of other code providers (torchao, Brevitas; qmargin.interop),
    whose codes, scales and zero points are hashed too.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        _hash_entry(h, name, t)
    for mname, m in quantized_modules(model):
        if m.frozen:
            for tname in m.quant_specs:
                _hash_tensor(h, f"{mname}.{tname}_codes", m.stored(tname).codes)
    for provider, group in foreign:
        name, module, tname = group[0]
        c = provider.codes(name, module, tname)
        key = f"{provider.name}:{name}.{tname}"
        _hash_tensor(h, f"{key}_codes", c.codes)
        _hash_tensor(h, f"{key}_scale", c.scale)
        if c.zero_point is not None:
            _hash_tensor(h, f"{key}_zero_point", c.zero_point)
    return h.hexdigest()


def _data_fingerprint(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, "x", x)
    _hash_tensor(h, "y", y)
    return h.hexdigest()


def _with_ber(template: Any, ber: float) -> Any:
    """The template error model with its BER replaced."""
    from qmargin.faults import ErrorModelTemplate

    if isinstance(template, ErrorModelTemplate):
        return template.with_ber(ber)
    return dataclasses.replace(template, ber=ber)


def _check_inputs(
    x: Tensor,
    y: Tensor,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    batch_size: int,
    patterns_per_pass: int,
) -> list[float]:
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x_test has {x.shape[0]} samples but y_test has {y.shape[0]}")
    if x.shape[0] == 0:
        raise DataError("the test set is empty")
    if y.dim() != 1:
        raise DataError(f"y_test must be a 1-d tensor of class indices, got shape {tuple(y.shape)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ConfigError(f"base_seed must be a non-negative integer, got {base_seed!r}")
    for name, v in (("batch_size", batch_size), ("patterns_per_pass", patterns_per_pass)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    out = [float(b) for b in bers]
    if not out:
        raise ConfigError("the BER grid is empty")
    for b in out:
        if not (math.isfinite(b) and 0.0 <= b <= 1.0):
            raise ConfigError(f"every BER must be in [0, 1], got {b}")
    if len(set(out)) != len(out):
        raise ConfigError(f"the BER grid has duplicates: {out}")
    return out


class _Evaluator:
    """Batched accuracy of a (frozen, eval-mode) model on a fixed test set."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> None:
        self.model = model
        self.n = int(x.shape[0])
        self.batches = [
            (x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
            for i in range(0, self.n, batch_size)
        ]

    def converged_flags(self) -> bool:
        """Whether the model exposes per-sample convergence flags (``converged``)."""
        xb, _ = self.batches[0]
        with torch.inference_mode():
            self.model(xb)
        flags = self.model.converged if isinstance(self.model, ReportsConvergence) else None
        return isinstance(flags, Tensor) and flags.dtype == torch.bool and flags.shape == (xb.shape[0],)

    def __call__(self, count_failures: bool) -> tuple[float, int]:
        correct = 0
        failures = 0
        with torch.inference_mode():
            for xb, yb in self.batches:
                logits = self.model(xb)
                ok = logits.argmax(dim=1) == yb
                if count_failures:
                    flags = self.model.converged if isinstance(self.model, ReportsConvergence) else None
                    if not (isinstance(flags, Tensor) and flags.shape == (xb.shape[0],)):
                        raise ConfigError(
                            "count_failures needs the model to set `converged` (bool per sample) "
                            "after every forward pass"
                        )
                    flags = flags.to(device=ok.device, dtype=torch.bool)
                    ok = ok & flags
                    failures += int((~flags).sum())
                correct += int(ok.sum())
        return correct / self.n, failures

    def many(self, codes: dict[str, Tensor]) -> list[float]:
        """Accuracies of ``K`` corrupted versions of the model in one batched pass per test batch.

        ``codes`` maps buffer names (``"{layer}.{tensor}_codes"``) to stacked codes ``[K, ...]``. The
        forward pass is vectorized over the pattern axis with ``torch.func.vmap`` and
        ``functional_call``: for a ``QuantLinear`` the K weight copies become one batched matmul.
        """
        fn = torch.func.vmap(
            lambda bufs, xb: torch.func.functional_call(self.model, bufs, (xb,)), in_dims=(0, None)
        )
        k = next(iter(codes.values())).shape[0]
        correct = torch.zeros(k, dtype=torch.long)
        with torch.inference_mode():
            for xb, yb in self.batches:
                logits = fn(codes, xb)  # [K, B, C]
                correct += (logits.argmax(dim=-1) == yb).sum(dim=1).cpu()
        return [int(c) / self.n for c in correct]


def _code_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Live integer-code buffers of every quantized tensor, by their name in ``model``."""
    out = {}
    for mname, m in quantized_modules(model):
        for tname in m.quant_specs:
            out[f"{mname}.{tname}_codes" if mname else f"{tname}_codes"] = m.stored(tname).codes
    return out


# ------------------------------------------------------------------------------------------------
# the campaign
# ------------------------------------------------------------------------------------------------
@holds_lock("out_path", kind="file")  # one process per result file, for the whole campaign
def run_ber_campaign(
    model: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    *,
    bers: Sequence[float],
    repeats: int,
    base_seed: int,
    error_model: Any = None,
    batch_size: int = 1024,
    out_path: str | Path | None = None,
    config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[CampaignProgress], None] | None = None,
    count_failures: bool | None = None,
    overwrite: bool = False,
    patterns_per_pass: int = 1,
    weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Accuracy of a quantized model under random bit errors, over a BER grid and R patterns.

    Args:
        model: a model with quantized layers (``qmargin.quant.QuantizedTensors``). It is moved to
            ``device`` and evaluated in eval mode on its stored integer codes; quantized layers that
            are not frozen yet are frozen once for the campaign (no re-quantization per pattern, no
            copies of the model) and unfrozen again at the end, and the training mode is restored.
            The codes are restored exactly after every pattern.
        x_test, y_test: test inputs and integer class labels (same first dimension).
        bers: the BER grid ``p_1, ..., p_K`` (each in ``[0, 1]``, no duplicates; order is kept).
        repeats: number of error patterns ``R`` per BER.
        base_seed: pattern ``r`` uses seed ``base_seed + r`` at every BER (paired comparisons).
        error_model: a ``qmargin.faults.BitErrorModel`` used as template (layers, tensors, protected
            bits, ...); its ``ber`` is replaced by each grid value. Default ``BitErrorModel(ber=0)``:
            every bit of every stored weight code may flip.
        batch_size: test batch size.
        out_path: campaign JSON to write (partial after every pattern, atomically). A CSV with one
            row per ``(ber, pattern)`` is written beside it (:func:`campaign_csv_path`) at the end.
            An existing file with identical settings is resumed; with different settings a
            ``ConfigError`` is raised unless ``overwrite`` is true. The campaign holds the lock of
            ``out_path`` (:func:`qmargin.files.lock_output`) while it runs; a path that is not a
            regular file, or whose CSV would be the same file (``r.csv``), raises
            :class:`qmargin.files.OutputError` before anything runs.
        config: the resolved run configuration (JSON-serializable), stored beside the results.
        device: where to evaluate.
        progress: called with a :class:`CampaignProgress` after every completed pattern (after the
            codes are restored); an exception it raises stops the campaign, which can be resumed.
        count_failures: count non-converged samples (the ``converged`` protocol of the module
            docstring). ``None`` = automatically when the model exposes the flags.
        overwrite: discard an existing ``out_path`` whose settings differ instead of raising.
        patterns_per_pass: evaluate up to this many patterns of one BER in a single forward pass
            (``torch.func.vmap`` over stacked corrupted codes; memory grows by this factor). Pays
            off for small models (see BENCHMARKS.md); the model's forward pass must be vmappable
            (quantized linear / conv layers, elementwise activations, pooling, eval BatchNorm).
            Ignored (one pattern per pass) when convergence failures are counted.
        weights: :func:`weights_record` of the file the model was loaded from, stored as
            ``"weights"`` (not a setting: the model fingerprint already pins a resumed campaign).

    Returns the result dict (the JSON content): ``clean_accuracy``, ``results`` (one entry per BER
    with ``ber``, ``mean``, ``std``, ``min``, ``max``, ``accuracies`` and, when counted,
    ``failures``), ``bers``, ``repeats``, ``base_seed``, ``seeds``, ``error_model`` (the template,
    ``ber`` set to ``None``), ``config``, ``fingerprint`` (SHA-256 of model state and test data),
    ``evaluation``, ``qmargin_version``, ``status`` and ``timing``.
    """
    # Looked up per call, not at import: callers (and tests) may substitute qmargin.faults.inject.
    from qmargin.faults import BitErrorModel, inject, select_tensors

    if out_path is not None:
        check_outputs({"result JSON": out_path, "CSV": campaign_csv_path(out_path)})
    x = torch.as_tensor(x_test)
    y = torch.as_tensor(y_test).long()
    grid = _check_inputs(x, y, bers, repeats, base_seed, batch_size, patterns_per_pass)
    template = BitErrorModel(ber=0.0) if error_model is None else error_model
    if getattr(template, "p01", None) is not None and getattr(template, "p10", None) is not None:
        raise ConfigError(
            "the error model template fixes both p01 and p10, so the BER grid would change nothing"
        )
    dev = torch.device(device)
    qmods = list(quantized_modules(model))
    # stored tensors of other code providers (torchao, Brevitas: qmargin.interop) the template hits
    foreign = [(p, g) for p, g in stored_code_groups(model) if p.name != "qmargin"]
    if not qmods and not foreign:
        raise ConfigError("the model has no quantized layers: bit errors act on stored integer codes")
    select_tensors(model, template)  # fail fast when the template selects no stored tensor
    foreign = [(p, g) for p, g in foreign if template.selection.selects_stored(g)]
    if foreign:
        patterns_per_pass = 1  # stacked code buffers exist for qmargin's layers only

    was_training = model.training
    model.to(dev)
    model.eval()
    newly_frozen = [m for _, m in qmods if not m.frozen]
    for m in newly_frozen:
        m.freeze()
    pinned: list[tuple[Any, Any]] = []
    try:
        for p, g in foreign:
            for ref in g:
                if p.pin(*ref):
                    pinned.append((p, ref))
        evaluator = _Evaluator(model, x, y, batch_size, dev)
        if count_failures is None:
            count_failures = evaluator.converged_flags()
        em_dict = dict(template.to_dict())
        em_dict["ber"] = None
        seeds = [base_seed + r for r in range(repeats)]
        settings: dict[str, Any] = {
            "bers": grid,
            "repeats": repeats,
            "base_seed": base_seed,
            "seeds": seeds,
            "error_model": _jsonable(em_dict),
            "config": _jsonable(config or {}),
            "fingerprint": {
                "model_sha256": _model_fingerprint(model, foreign),
                "data_sha256": _data_fingerprint(x, y),
            },
            "evaluation": {
                "n_test": int(x.shape[0]),
                "batch_size": batch_size,
                "device": str(dev),
                "count_failures": bool(count_failures),
                "patterns_per_pass": 1 if count_failures else patterns_per_pass,
                "seed_scheme": "pattern r uses seed base_seed + r at every BER",
            },
            "qmargin_version": qmargin.__version__,
        }
        if weights is not None:
            settings["weights"] = dict(weights)
        path = Path(out_path) if out_path is not None else None
        state = _resume_state(path, settings, overwrite)
        t_start = time.perf_counter()
        prior_seconds = float(state.get("timing", {}).get("seconds", 0.0))

        def snapshot(status: str) -> dict[str, Any]:
            return _assemble(settings, state, status, prior_seconds + time.perf_counter() - t_start)

        if "clean_accuracy" not in state:
            acc, fails = evaluator(count_failures)
            state["clean_accuracy"] = acc
            if count_failures:
                state["clean_failures"] = fails
            if path is not None:
                write_text_atomic(path, _dumps(snapshot("partial")))

        total = len(grid) * repeats
        done = sum(len(e["accuracies"]) for e in state["per_ber"])
        per_pass = 1 if count_failures else patterns_per_pass
        live_codes = _code_buffers(model) if per_pass > 1 else {}
        for k, ber in enumerate(grid):
            entry = state["per_ber"][k]
            em = _with_ber(template, ber)
            r0 = len(entry["accuracies"])
            while r0 < repeats:
                chunk = range(r0, min(repeats, r0 + per_pass))
                if per_pass == 1:
                    with inject(model, em, seeds[r0]):
                        acc, fails = evaluator(count_failures)
                    outcomes = [(acc, fails)]
                else:
                    stacks: dict[str, list[Tensor]] = {n: [] for n in live_codes}
                    for r in chunk:
                        with inject(model, em, seeds[r]):
                            for n, buf in live_codes.items():
                                stacks[n].append(buf.clone())
                    outcomes = [
                        (a, 0) for a in evaluator.many({n: torch.stack(v) for n, v in stacks.items()})
                    ]
                for r, (acc, fails) in zip(chunk, outcomes, strict=True):
                    entry["accuracies"].append(acc)
                    if count_failures:
                        entry["failures"].append(fails)
                    done += 1
                    if path is not None:
                        write_text_atomic(path, _dumps(snapshot("partial" if done < total else "complete")))
                    if progress is not None:
                        progress(CampaignProgress(done, total, ber, r, seeds[r], acc))
                r0 = chunk.stop
        result = snapshot("complete")
        if path is not None:
            write_text_atomic(path, _dumps(result))
            write_text_atomic(campaign_csv_path(path), _csv_text(result))
        return result
    finally:
        for p, ref in reversed(pinned):
            p.unpin(*ref)
        for m in newly_frozen:
            m.unfreeze()
        model.train(was_training)


def _dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, allow_nan=False) + "\n"


def _resume_state(path: Path | None, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Per-BER progress of an existing result at ``path`` with the same settings (or a fresh state)."""
    fresh: dict[str, Any] = {"per_ber": [{"accuracies": [], "failures": []} for _ in settings["bers"]]}
    if path is None or not path.exists():
        return fresh
    try:
        old = load_campaign(path)
    except CheckpointError as err:
        if overwrite:
            return fresh
        raise ConfigError(
            f"{path} exists and is not a valid campaign result ({err}); pass overwrite to replace it"
        ) from None
    diff = [k for k in SETTINGS_KEYS if old.get(k) != settings[k]]
    if diff:
        if overwrite:
            return fresh
        raise ConfigError(
            f"{path} holds a campaign with different {', '.join(diff)}; use another output path or overwrite"
        )
    state: dict[str, Any] = {"clean_accuracy": old["clean_accuracy"], "timing": old.get("timing", {})}
    if "clean_failures" in old:
        state["clean_failures"] = old["clean_failures"]
    per_ber = []
    for ber, res in zip(settings["bers"], old["results"], strict=True):
        if res.get("ber") != ber:
            raise ConfigError(f"{path} is inconsistent (BER {res.get('ber')} where {ber} was expected)")
        per_ber.append({"accuracies": list(res["accuracies"]), "failures": list(res.get("failures", []))})
    state["per_ber"] = per_ber
    return state


def _assemble(settings: dict[str, Any], state: dict[str, Any], status: str, seconds: float) -> dict[str, Any]:
    """The result dict; everything except ``timing`` is a pure function of settings and accuracies."""
    results = []
    for ber, entry in zip(settings["bers"], state["per_ber"], strict=True):
        row: dict[str, Any] = {"ber": ber}
        if entry["accuracies"]:
            row.update(summarize_accuracies(entry["accuracies"]))
        row["accuracies"] = list(entry["accuracies"])
        if settings["evaluation"]["count_failures"]:
            row["failures"] = list(entry["failures"])
        results.append(row)
    out: dict[str, Any] = {"clean_accuracy": state["clean_accuracy"]}
    if "clean_failures" in state:
        out["clean_failures"] = state["clean_failures"]
    out["results"] = results
    out.update({k: settings[k] for k in SETTINGS_KEYS})
    if "weights" in settings:
        out["weights"] = settings["weights"]
    out["status"] = status
    n_done = sum(len(e["accuracies"]) for e in state["per_ber"])
    out["timing"] = {"seconds": round(seconds, 6), "patterns_done": n_done}
    return out


def _csv_text(result: dict[str, Any]) -> str:
    """One row per (ber, pattern): ``ber, pattern, seed, accuracy`` (and ``failures`` when counted)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with_failures = bool(result["evaluation"]["count_failures"])
    w.writerow(["ber", "pattern", "seed", "accuracy"] + (["failures"] if with_failures else []))
    for res in result["results"]:
        for r, acc in enumerate(res["accuracies"]):
            row = [repr(float(res["ber"])), r, result["seeds"][r], repr(float(acc))]
            if with_failures:
                row.append(res["failures"][r])
            w.writerow(row)
    return buf.getvalue()
