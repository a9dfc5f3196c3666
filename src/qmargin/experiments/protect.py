"""``qmargin protect``: the cheapest per-layer protection that keeps the metric drop at a BER in budget.

Loads the model as ``qmargin sensitivity`` does (:func:`qmargin.experiments.sensitivity.load_run_target`
/ :func:`~qmargin.experiments.sensitivity.load_external_target`: a run directory, or a user's own
network with its data), runs the planner (:func:`qmargin.engine.planner.plan_protection`: measured
per-layer drops per scheme, a multiple-choice knapsack, verification on the full model) and writes
the plan as JSON, atomically. ``--max-drop`` is in points of the metric: percentage points for the
accuracies (1.0 = one point), the metric's own units otherwise.

MonDEQ variant (:func:`certify_flips_plan`): the cheapest ``msbK`` (top ``K`` bits of ``W``'s codes
in hardened memory) such that :func:`qmargin.deq.max_certified_bit_flips` certifies at least the
asked number of arbitrary bit flips, from the weights alone. Fully connected MonDEQs only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import qmargin
from qmargin.data.specs import ImageOptions
from qmargin.engine.planner import DEFAULT_CHOICES, DEFAULT_HARDENED_COST, DEFAULT_ROUNDS, plan_protection
from qmargin.engine.sensitivity import DEFAULT_CACHE_BYTES
from qmargin.engine.store import dumps
from qmargin.errors import ConfigError
from qmargin.experiments.evaluate import run_input_files
from qmargin.experiments.external import QuantOptions, external_input_files
from qmargin.experiments.sensitivity import Target, load_external_target, load_run_target
from qmargin.faults.protection import parse_scheme
from qmargin.files import check_outputs, holds_lock, write_text_atomic

__all__ = [
    "protect_run",
    "protect_external",
    "max_drop_in_metric_units",
    "parse_choices",
    "certify_flips_plan",
    "CERTIFY_SCHEMA",
]

CERTIFY_SCHEMA = "qmargin.protection-certified"
Progress = Callable[[int, int, str], None]


def parse_choices(text: str) -> list[str]:
    """``--choices``: comma-separated schemes of the spec language (commas inside ``secded(72,64)``
    belong to the scheme), each checked and written canonically; rules (``PATTERN=``) are refused."""
    parts: list[str] = []
    cur, depth = "", 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "=" in part:
            raise ConfigError(f"--choices takes schemes (none, msbK, secdedK, parityK), not rules: {part!r}")
        out.append(parse_scheme(part).text)
    if not out:
        raise ConfigError("--choices needs at least one scheme, e.g. none,msb1,msb2,secded64")
    return out


def max_drop_in_metric_units(max_drop: float, fraction: bool) -> float:
    """``--max-drop`` as written (points: percentage points for a fraction metric) in the metric's
    units (``1.0 -> 0.01`` for the accuracies)."""
    return max_drop / 100.0 if fraction else max_drop


def _plan(
    target: Target,
    *,
    ber: float,
    max_drop: float,
    choices: Sequence[str],
    patterns: int,
    base_seed: int,
    hardened_cost: float,
    rounds: int,
    strict: bool,
    reuse: bool,
    cache_bytes: int,
    progress: Progress | None,
    out_path: str | Path | None,
) -> dict[str, Any]:
    metric = target.evaluation.metric
    result = plan_protection(
        target.model,
        target.evaluation,
        ber=ber,
        max_drop=max_drop_in_metric_units(max_drop, metric.fraction),
        choices=choices,
        patterns=patterns,
        base_seed=base_seed,
        template=target.template,
        hardened_cost=hardened_cost,
        rounds=rounds,
        strict=strict,
        reuse=reuse,
        cache_bytes=cache_bytes,
        config={**target.config, "max_drop_points": max_drop},
        weights=target.weights,
        progress=progress,
    )
    if out_path is not None:
        write_text_atomic(out_path, dumps(result))
    return result


@holds_lock("out_path", kind="file")
@holds_lock("run_dir", shared=True)
def protect_run(
    run_dir: str | Path,
    *,
    ber: float,
    max_drop: float,
    choices: Sequence[str] = DEFAULT_CHOICES,
    patterns: int = 10,
    base_seed: int = 100,
    hardened_cost: float = DEFAULT_HARDENED_COST,
    rounds: int = DEFAULT_ROUNDS,
    strict: bool = False,
    out_path: str | Path | None = None,
    layers: Sequence[str] = ("*",),
    include_bias: bool = False,
    batch_size: int = 1024,
    device: str = "auto",
    data_dir: str | Path | None = None,
    ptq_bits: int | None = None,
    metric: Any = "top1",
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The protection plan of a trained run (``qmargin train``) on its test split; JSON to
    ``out_path`` when given. ``max_drop`` in points (module docstring)."""
    if out_path is not None:
        check_outputs({"plan JSON (--out)": out_path}, inputs=run_input_files(run_dir))
    target = load_run_target(
        run_dir,
        layers=layers,
        include_bias=include_bias,
        batch_size=batch_size,
        device=device,
        data_dir=data_dir,
        ptq_bits=ptq_bits,
        metric=metric,
    )
    return _plan(
        target,
        ber=ber,
        max_drop=max_drop,
        choices=choices,
        patterns=patterns,
        base_seed=base_seed,
        hardened_cost=hardened_cost,
        rounds=rounds,
        strict=strict,
        reuse=reuse,
        cache_bytes=cache_bytes,
        progress=progress,
        out_path=out_path,
    )


@holds_lock("out_path", kind="file")
def protect_external(
    model_spec: str,
    data_spec: str,
    *,
    ber: float,
    max_drop: float,
    out_path: str | Path,
    choices: Sequence[str] = DEFAULT_CHOICES,
    patterns: int = 10,
    base_seed: int = 100,
    hardened_cost: float = DEFAULT_HARDENED_COST,
    rounds: int = DEFAULT_ROUNDS,
    strict: bool = False,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    quant: QuantOptions | None = None,
    image: ImageOptions | None = None,
    include_bias: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: str | Path | None = None,
    metric: Any = "top1",
    data_identity: str | None = None,
    reuse: bool = True,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The protection plan of a user's own network on a data spec (loaded as ``qmargin sensitivity``
    loads it)."""
    check_outputs({"plan JSON (--out)": out_path}, inputs=external_input_files(weights, data_spec))
    target = load_external_target(
        model_spec,
        data_spec,
        model_args=model_args,
        weights=weights,
        quant=quant,
        image=image,
        include_bias=include_bias,
        batch_size=batch_size,
        device=device,
        data_dir=data_dir,
        metric=metric,
        data_identity=data_identity,
    )
    return _plan(
        target,
        ber=ber,
        max_drop=max_drop,
        choices=choices,
        patterns=patterns,
        base_seed=base_seed,
        hardened_cost=hardened_cost,
        rounds=rounds,
        strict=strict,
        reuse=reuse,
        cache_bytes=cache_bytes,
        progress=progress,
        out_path=out_path,
    )


@holds_lock("out_path", kind="file")
@holds_lock("path", shared=True)
def certify_flips_plan(
    path: str | Path,
    *,
    flips: int,
    bits: int | None = None,
    per_channel: bool | None = None,
    hardened_cost: float = DEFAULT_HARDENED_COST,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """The cheapest ``msbK`` for a fully connected MonDEQ such that every pattern of ``flips``
    arbitrary bit flips in the exposed bits of ``W``'s codes provably keeps ``mu(W~_err) > 0``.

    ``W`` is quantized as ``qmargin certify`` quantizes it (the assembled operator, ``bits`` bits:
    the run's own by default, per output channel as the run's quantizer); for ``K = 0 .. bits - 1``
    protected top bits, :func:`qmargin.deq.max_certified_bit_flips` with ``protected_bits = (-1 ..
    -K)``; ``K = bits`` leaves no bit exposed (every count certified). Cost of ``msbK`` in stored bits
    per data bit of ``W``: ``hardened_cost * K / bits``. The spec ``LAYER=msbK`` protects every
    weight tensor of the core (``W`` and ``U``) in a campaign; the certificate concerns ``W``."""
    from qmargin.deq import MonotoneLinear, max_certified_bit_flips
    from qmargin.experiments.certify import load_mondeq_for_certification
    from qmargin.quant import QuantSpec, dequantize, quantize

    if isinstance(flips, bool) or not isinstance(flips, int) or flips < 0:
        raise ConfigError(f"--certify-flips must be a non-negative integer, got {flips!r}")
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"{p}: --certify-flips needs a run directory of a MonDEQ (qmargin train --model mondeq)"
        )
    if out_path is not None:
        check_outputs({"plan JSON (--out)": out_path}, inputs=run_input_files(p))
    model, _ = load_mondeq_for_certification(p)
    from qmargin.training import load_run

    _, config, _ = load_run(p)
    core = model.core
    if not isinstance(core, MonotoneLinear):
        raise ConfigError(
            f"{p}: --certify-flips certifies fully connected MonDEQs; this core is a {type(core).__name__}"
        )
    layer = next(name for name, module in model.named_modules() if module is core)
    b = bits if bits is not None else (config.bits if config.quantized else None)
    if b is None:
        raise ConfigError(f"{p}: a float run; give --bits B (the width W is stored at)")
    if not 1 <= int(b) <= 8:
        raise ConfigError(f"--bits must be in 1..8, got {b}")
    pc = bool(config.per_channel) if per_channel is None else per_channel
    spec = QuantSpec(int(b), per_channel=pc)
    with torch.no_grad():
        W = core.assemble_W().detach().double()
        codes, scale, zp = quantize(W, spec)
        W_q = dequantize(codes, scale, zp, spec)
    rows = []
    chosen = None
    for k in range(int(b) + 1):
        protected = tuple(range(-1, -k - 1, -1))
        if k == int(b):
            row: dict[str, Any] = {"k": k, "max_flips": None, "all_bits_hardened": True, "certified": True}
        else:
            cert = max_certified_bit_flips(W_q, codes, scale, spec, protected_bits=protected).to_dict()
            mf = cert["max_flips"]
            row = {
                "k": k,
                "max_flips": mf,
                "all_bits_hardened": False,
                "certified": mf is not None and int(mf) >= flips,
                "margin_quantized": cert["margin_quantized"],
                "exposed_bits": cert["n_bits"],
                "every_exposed_bit": cert["all_bits"],
            }
        row["hardened_bits"] = k * int(codes.numel())
        row["cost"] = hardened_cost * k / int(b)
        row["spec"] = "none" if k == 0 else f"{layer}=msb{k}"
        rows.append(row)
        if chosen is None and row["certified"]:
            chosen = row
    result = {
        "schema": CERTIFY_SCHEMA,
        "schema_version": 1,
        "qmargin_version": qmargin.__version__,
        "source": str(p),
        "layer": layer,
        "tensor": "W",
        "bits": int(b),
        "per_channel": pc,
        "numel": int(codes.numel()),
        "flips": flips,
        "hardened_cost": float(hardened_cost),
        "rows": rows,
        "feasible": chosen is not None,
        "plan": chosen,
        "note": "certificates from the weights alone (Weyl: mu(W~) - beta(k) > 0); fully connected MonDEQs",
    }
    if out_path is not None:
        write_text_atomic(out_path, dumps(result))
    return result
