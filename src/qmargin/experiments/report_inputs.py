"""What ``qmargin report`` reads: result files and directories as the plain document of
:func:`qmargin.report.html.report_html`.

A RESULT is one of

* a campaign result JSON (``qmargin evaluate``; validated by :func:`qmargin.engine.store.validate_campaign`);
* a run directory: its ``ber.json`` (and its ``config.json``, shown as the run's configuration);
* a certificate JSON of ``qmargin certify --out``;
* a reproduction's output directory (``qmargin reproduce mcel`` / ``mondeq``: its ``summary.json``;
  ``--preset full`` of ``mcel``: one sub-directory per preset) or such a ``summary.json`` itself
  (also the copies in ``docs/results/``).

Campaigns are compared per metric (one plot and table per metric); an MCEL reproduction gives one
comparison per bit width, a MonDEQ reproduction its certificate tables. Every file is read once: its
SHA-256 is taken of the bytes that are parsed. Anything else is a one-line
:class:`~qmargin.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qmargin.engine.store import SETTINGS_KEYS, TOP1, validate_campaign
from qmargin.errors import CheckpointError, ConfigError

__all__ = ["read_report_inputs", "classify"]

CAMPAIGN_FILE = "ber.json"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


class _Reader:
    def __init__(self) -> None:
        self.campaigns: list[tuple[str, dict[str, Any]]] = []
        self.comparisons: list[dict[str, Any]] = []
        self.certificates: list[dict[str, Any]] = []
        self.mondeq: list[dict[str, Any]] = []
        self.configurations: list[dict[str, Any]] = []
        self.inputs: list[dict[str, Any]] = []

    # -- files ------------------------------------------------------------------------------------
    def read_json(self, path: Path) -> Any:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file or directory") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path}: is a directory") from None
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a result file (invalid JSON: {err})") from None
        self.inputs.append(
            {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        )
        return value

    # -- one input --------------------------------------------------------------------------------
    def add(self, path: Path, label: str | None) -> None:
        if path.is_dir():
            if (path / CAMPAIGN_FILE).is_file():
                self.add_campaign(path / CAMPAIGN_FILE, label or path.name, run_dir=path)
            elif (path / SUMMARY_FILE).is_file():
                self.add_file(path / SUMMARY_FILE, label or path.name)
            else:
                subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / SUMMARY_FILE).is_file())
                if not subs:
                    raise CheckpointError(
                        f"{path}: neither a run directory with results ({CAMPAIGN_FILE}; run 'qmargin "
                        f"evaluate {path}' first) nor a reproduction's output ({SUMMARY_FILE})"
                    )
                for sub in subs:
                    self.add_file(sub / SUMMARY_FILE, f"{label or path.name}/{sub.name}")
            return
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        self.add_file(
            path,
            label
            or (path.parent.name if path.name in (CAMPAIGN_FILE, SUMMARY_FILE) else path.stem)
            or path.name,
        )

    def add_file(self, path: Path, label: str) -> None:
        data = self.read_json(path)
        kind = classify(data)
        if kind == "campaign":
            self.add_campaign(path, label, data=data)
        elif kind == "certificate":
            self.add_certificate(path, label, data)
        elif kind == "mcel":
            self.add_mcel(path, label, data)
        elif kind == "mondeq":
            self.add_mondeq(path, label, data)
        else:
            raise CheckpointError(
                f"{path}: not a campaign result, a certificate of 'qmargin certify' or a reproduction summary"
            )

    def add_campaign(self, path: Path, label: str, *, data: Any = None, run_dir: Path | None = None) -> None:
        if data is None:
            data = self.read_json(path)
            if classify(data) != "campaign":
                raise CheckpointError(f"{path}: not a campaign result (no 'results' / 'clean_accuracy')")
        result = validate_campaign(path, data)
        self.campaigns.append((label, result))
        config: dict[str, Any] = {k: result[k] for k in SETTINGS_KEYS if k in result and k != "seeds"}
        for k in ("weights", "status", "timing", "schema_version"):
            if k in result:
                config[k] = result[k]
        self.configurations.append({"label": f"{label}: campaign ({path})", "config": config})
        if run_dir is not None and (run_dir / CONFIG_FILE).is_file():
            run_config = self.read_json(run_dir / CONFIG_FILE)
            self.configurations.append(
                {"label": f"{label}: run ({run_dir / CONFIG_FILE})", "config": run_config}
            )

    def add_certificate(self, path: Path, label: str, data: Mapping[str, Any]) -> None:
        rows = list(data["results"])
        for i, r in enumerate(rows):
            _check_certificate_row(path, f"results[{i}]", r)
        self.certificates.append(
            {
                "title": f"{label}: MonDEQ certificates ({data.get('source', path)})",
                "rows": rows,
                "per_channel": data.get("per_channel"),
            }
        )
        self.configurations.append(
            {
                "label": f"{label}: certificate ({path})",
                "config": {k: v for k, v in data.items() if k != "results"},
            }
        )

    def add_mcel(self, path: Path, label: str, data: Mapping[str, Any]) -> None:
        repeats = data.get("repeats")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise CheckpointError(f"{path}: repeats must be a positive integer, got {repeats!r}")
        rows = data["rows"]
        by_bits: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        configs = {}
        for i, row in enumerate(rows):
            where = f"rows[{i}]"
            if not isinstance(row, Mapping) or not isinstance(row.get("method"), str):
                raise CheckpointError(f"{path}: {where} needs a method name")
            bits = row.get("bits")
            if not isinstance(bits, int) or isinstance(bits, bool):
                raise CheckpointError(f"{path}: {where}.bits must be an integer, got {bits!r}")
            clean = _fraction(path, f"{where}.clean_accuracy", row.get("clean_accuracy"))
            results = []
            entries = row.get("results")
            if not isinstance(entries, list):
                raise CheckpointError(f"{path}: {where}.results must be a list")
            for j, e in enumerate(entries):
                w = f"{where}.results[{j}]"
                if not isinstance(e, Mapping):
                    raise CheckpointError(f"{path}: {w} must be an object")
                entry: dict[str, Any] = {"ber": _fraction(path, f"{w}.ber", e.get("ber"))}
                for k in ("mean", "min", "max"):
                    entry[k] = _fraction(path, f"{w}.{k}", e.get(k))
                entry["std"] = _number(path, f"{w}.std", e.get("std"), lo=0.0)
                entry["patterns"] = repeats
                results.append(entry)
            result = {"clean_accuracy": clean, "results": results, "metric": dict(TOP1), "repeats": repeats}
            by_bits.setdefault(bits, []).append((row["method"], result))
            configs[f"{row['method']}, {bits}-bit"] = row.get("config")
        desc = data.get("description") or f"preset {data.get('preset', '?')}"
        for bits, items in sorted(by_bits.items()):
            self.comparisons.append(
                {
                    "title": f"{label}: {bits}-bit weights",
                    "results": items,
                    "note": f"MCEL reproduction ({desc}); {repeats} paired patterns per BER.",
                }
            )
        settings = {k: v for k, v in data.items() if k != "rows"}
        self.configurations.append(
            {"label": f"{label}: reproduction ({path})", "config": {**settings, "runs": configs}}
        )

    def add_mondeq(self, path: Path, label: str, data: Mapping[str, Any]) -> None:
        for key in ("float", "ptq", "displacement", "qat"):
            rows = data.get(key, [])
            if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
                raise CheckpointError(f"{path}: {key} must be a list of objects")
        for i, r in enumerate(data.get("ptq", [])):
            _check_certificate_row(path, f"ptq[{i}]", r)
        for i, r in enumerate(data.get("qat", [])):
            _check_certificate_row(path, f"qat[{i}]", r)
        self.mondeq.append(
            {"title": f"{label}: MonDEQ reproduction ({data.get('dataset', '?')})", "summary": data}
        )
        settings = {k: data[k] for k in ("preset", "dataset", "model") if k in data}
        self.configurations.append({"label": f"{label}: reproduction ({path})", "config": settings})

    # -- the document -----------------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for label, result in self.campaigns:
            metric = {
                k: v
                for k, v in result.get("metric", TOP1).items()
                if k not in ("higher_is_better", "fraction")
            }
            groups.setdefault(json.dumps(metric, sort_keys=True), []).append((label, result))
        comparisons = [{"title": None, "results": _unique(items)} for items in groups.values()]
        return {
            "comparisons": comparisons + self.comparisons,
            "certificates": self.certificates,
            "mondeq": self.mondeq,
            "configurations": self.configurations,
            "inputs": self.inputs,
        }


def classify(data: Any) -> str | None:
    """``"campaign"``, ``"certificate"``, ``"mcel"`` (reproduction summary), ``"mondeq"`` or ``None``."""
    if not isinstance(data, dict):
        return None
    if "results" in data and ("clean_accuracy" in data or "clean_value" in data):
        return "campaign"
    if isinstance(data.get("results"), list) and "format" in data and "source" in data:
        return "certificate"
    if isinstance(data.get("rows"), list) and "bers" in data and "repeats" in data:
        return "mcel"
    if isinstance(data.get("ptq"), list) and isinstance(data.get("qat"), list):
        return "mondeq"
    return None


def _number(path: Path, what: str, v: Any, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise CheckpointError(f"{path}: {what} must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise CheckpointError(f"{path}: {what} is {v!r}, outside [{lo}, {hi}]")
    return float(v)


def _fraction(path: Path, what: str, v: Any) -> float:
    return _number(path, what, v, lo=0.0, hi=1.0)


def _check_certificate_row(path: Path, where: str, r: Any) -> None:
    if not isinstance(r, Mapping):
        raise CheckpointError(f"{path}: {where} must be an object")
    bits = r.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise CheckpointError(f"{path}: {where}.bits must be an integer, got {bits!r}")
    for k in ("delta_w_norm", "margin", "margin_quantized"):
        _number(path, f"{where}.{k}", r.get(k))
    for k in ("certified", "monotone"):
        if not isinstance(r.get(k), bool):
            raise CheckpointError(f"{path}: {where}.{k} must be true or false, got {r.get(k)!r}")


def _unique(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Labels made distinct (``name``, ``name (2)``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for label, res in items:
        n = seen.get(label, 0) + 1
        seen[label] = n
        out.append((label if n == 1 else f"{label} ({n})", res))
    return out


def read_report_inputs(paths: Sequence[str | Path], *, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The document of :func:`qmargin.report.html.report_html` (without ``title``, ``provenance``
    and ``band``) for the RESULT paths, plus ``inputs``: every file read, ``{"path", "sha256",
    "bytes"}``. ``labels`` name the paths (default: a run directory's name, a JSON file's stem, or
    its directory's name for a ``ber.json`` or ``summary.json``)."""
    if not paths:
        raise ConfigError(
            "give at least one result (a campaign JSON, run directory, certificate or reproduction)"
        )
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"--labels has {len(labels)} names for {len(paths)} results")
    reader = _Reader()
    for i, p in enumerate(paths):
        reader.add(Path(p), labels[i] if labels is not None else None)
    return reader.document()
