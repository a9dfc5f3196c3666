"""``qmargin certify``: certificates of a MonDEQ quantized at several bit widths, from the weights alone.

Accepts a run directory of ``qmargin train --model mondeq`` or a ``.pt`` state dict of the two public
reference implementations (recognised by its keys, read with ``torch.load(weights_only=True)``).
For each bit width b: ``W~ = Q_b(W)`` (the assembled matrix), ``U~``, ``b~`` and
:func:`qmargin.deq.certify`, plus the largest number of arbitrary bit flips in W's stored codes that
provably keeps W~ monotone and, with a BER, the share of random error patterns that stay certified.

Error pattern ``r`` of ``--ber`` flips the bits ``qmargin.faults.inject`` flips with seed ``seed + r``
in the stored ``W`` of the MonDEQ's core (:func:`qmargin.deq.bit_error_pattern`), i.e. the patterns a
``qmargin evaluate`` campaign with the same base ``--seed`` evaluates: the certified share and the
campaign's accuracies refer to the same corrupted codes (for the same clean codes, i.e. the same
quantizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qmargin.deq import MonDEQClassifier, MonotoneLinear
from qmargin.deq.bit_certificates import MONDEQ_LAYER
from qmargin.errors import CheckpointError, ConfigError

__all__ = [
    "load_mondeq_for_certification",
    "certify_weights",
    "certify_checkpoint",
    "demo_mondeq_certificates",
]


def load_mondeq_for_certification(
    path: str | Path, *, m: float | None = None
) -> tuple[MonDEQClassifier, str]:
    """``(classifier, source format)`` from a run directory or an imported ``.pt`` state dict.

    ``m`` (a finite number > 0) is the constructor argument of a 2020-format checkpoint; given with a
    run directory or a 2026-format file (which store their ``m``) it is a ``ConfigError``, not ignored.
    """
    from qmargin.deq import check_m, detect_format, load_mondeq_checkpoint, read_state_dict

    p = Path(path)
    if m is not None:
        m = check_m(m)
    if p.is_dir():
        if m is not None:
            raise ConfigError(f"{p}: a qmargin run stores its m; m (--m) is for 2020-format .pt checkpoints")
        from qmargin.training import load_run

        model, config, _ = load_run(p)
        if not isinstance(model, MonDEQClassifier):
            raise CheckpointError(
                f"{p}: a {config.model!r} run, not a MonDEQ (train one with --model mondeq)"
            )
        return model, "qmargin run"
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or run directory")
    if m is None:
        return load_mondeq_checkpoint(p), "imported state dict"
    state_dict = read_state_dict(p)
    if detect_format(state_dict) == "companion2026":
        raise ConfigError(f"{p}: a 2026-format checkpoint stores its m; m (--m) is for the 2020 format")
    return load_mondeq_checkpoint(state_dict, m=m), "imported state dict"


def certify_weights(
    core: MonotoneLinear,
    bits: int,
    per_channel: bool,
    *,
    ber: float | None = None,
    patterns: int = 100,
    seed: int = 0,
    layer: str = MONDEQ_LAYER,
) -> dict[str, Any]:
    """Certificate of a fully connected monotone parameterization quantized at ``bits``.

    With ``ber``: ``patterns`` random error patterns, pattern ``r`` drawn as ``inject`` draws it with
    seed ``seed + r`` for the tensor ``W`` of the module named ``layer`` (the core's name in its model).
    """
    from qmargin.deq import certify, certify_under_bit_errors, max_certified_bit_flips
    from qmargin.quant import QuantSpec, dequantize, quantize

    spec = QuantSpec(bits, per_channel=per_channel)
    with torch.no_grad():
        W = core.assemble_W().detach().double()
        U = core.U.detach().double()
        b = core.b.detach().double()
        codes, scale, zp = quantize(W, spec)
        W_q = dequantize(codes, scale, zp, spec)
        U_q = dequantize(*quantize(U, spec), spec)
        b_spec = QuantSpec(bits)  # one scale for the bias vector (per-element scales would be exact)
        b_q = dequantize(*quantize(b, b_spec), b_spec)
    row: dict[str, Any] = {
        "bits": bits,
        "per_channel": per_channel,
        **certify(W, W_q, U=U, U_q=U_q, b=b, b_q=b_q).to_dict(),
    }
    if bits <= 8:
        flips = max_certified_bit_flips(W_q, codes, scale, spec).to_dict()
        row["max_certified_bit_flips"] = flips["max_flips"]
        if bits >= 3:  # the same with the two most significant bits protected (e.g. by ECC)
            prot = max_certified_bit_flips(W_q, codes, scale, spec, protected_bits=(-1, -2)).to_dict()
            row["max_certified_bit_flips_msb2_protected"] = prot["max_flips"]
        if ber is not None:
            be = certify_under_bit_errors(W_q, codes, scale, zp, spec, ber, patterns, seed, layer=layer)
            row["ber"] = ber
            row["ber_seed"] = seed
            row["ber_certified_share"] = be.certified_share
            row["ber_monotone_share"] = be.monotone_share
    return row


def certify_checkpoint(
    path: str | Path,
    *,
    bits: Sequence[int],
    per_channel: bool = False,
    m: float | None = None,
    ber: float | None = None,
    patterns: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"source", "format", "results": [one certificate dict per bit width]}``.

    ``seed``: base seed of the ``ber`` patterns (pattern ``r`` uses ``seed + r``, as campaigns do).
    """
    model, fmt = load_mondeq_for_certification(path, m=m)
    core = model.core
    if not isinstance(core, MonotoneLinear):
        raise CheckpointError(
            f"{path}: certify handles fully connected MonDEQs; use qmargin.deq.certify with "
            "frequency blocks for convolutional ones"
        )
    layer = next(name for name, module in model.named_modules() if module is core)
    results = [
        certify_weights(core, b, per_channel, ber=ber, patterns=patterns, seed=seed, layer=layer)
        for b in bits
    ]
    return {"source": str(path), "format": fmt, "per_channel": per_channel, "results": results}


def demo_mondeq_certificates(
    data: Any,
    out_dir: str | Path,
    *,
    seed: int,
    bits: Sequence[int],
    epochs: int = 8,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[list[dict[str, Any]], str]:
    """Train a small float MonDEQ on the demo data and certify it at ``bits`` (per-row scales)."""
    from qmargin.training import TrainConfig, train

    cfg = TrainConfig(
        dataset=data.info.name,
        model="mondeq",
        bits=32,
        epochs=epochs,
        seed=seed,
        device="cpu",
        model_kwargs={"n": 64, "r": 16, "m": 0.5},
    )
    res = train(cfg, dataset=data, out_dir=Path(out_dir))
    log(f"trained float MonDEQ (n=64): clean test accuracy {res.test_acc:.4f}")
    core = res.model.core
    if not isinstance(core, MonotoneLinear):
        raise TypeError(f"the demo MonDEQ is fully connected, got {type(core).__name__}")
    rows = [certify_weights(core, b, True) for b in bits]
    return (
        rows,
        f"MonDEQ (n=64, m0=0.5) on {data.info.name}: certificates from the weights alone (per-row scales)",
    )
