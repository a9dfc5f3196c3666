"""Checked option types of the ``qmargin`` command: every flag value is validated while it is parsed.

A bad value (``nan``, ``inf``, ``-1`` where a count is expected, ``1e400``, ``abc``, an empty string,
an unknown device, a seed the generator cannot take) is a click usage error, which the CLI prints as
one line ``qmargin: error: Invalid value for '--flag': ...`` with exit status 2, before any file is
read or written (:func:`qmargin.cli.errors.run_guarded`). The library checks the same values again
where they enter it (``ConfigError``), so a Python caller gets the same refusal.

How to declare an option
------------------------
Every option and argument of every command takes its type from this module (or is a ``Path``, or a
boolean flag); ``tests/test_hardening_flags.py`` walks the command tree and fails on any parameter
with a plain ``int``, ``float`` or ``str`` type, and feeds each declared type its invalid values.
Pass the type as ``click_type`` to ``typer.Option`` / ``typer.Argument`` and keep the Python
annotation that the type returns::

    from qmargin.cli import options as opt

    lr: Annotated[float, typer.Option(click_type=opt.Real(lo=0.0, lo_open=True), help="...")] = 1e-3
    hidden: Annotated[int | None, typer.Option(click_type=opt.Integer(1, opt.MAX_WIDTH))] = None
    seed: Annotated[int, typer.Option(click_type=opt.SEED)] = 0
    repeats: Annotated[int, typer.Option(click_type=opt.REPEATS)] = 20
    device: Annotated[str, typer.Option(click_type=opt.DEVICE)] = "auto"
    metric: Annotated[str, typer.Option(click_type=opt.Choice("accuracy", "loss"))] = "accuracy"
    model: Annotated[str, typer.Option(click_type=opt.NAME)] = "mlp"   # a registry name
    ber: Annotated[opt.Floats, typer.Option(click_type=opt.Reals(0.0, 1.0))] = (0.0, 0.01)  # a list
    storage: Annotated[Path | None, typer.Option(help="...")] = None  # paths: plain Path (checked)
    plot: Annotated[bool, typer.Option(help="...")] = True  # boolean flags: plain bool

Lists are annotated ``opt.Floats`` / ``opt.Ints`` (not ``list[...]``, which typer makes a repeatable
option) and take a tuple default. A cross-flag condition (a base seed plus its patterns) is checked
at the top of the command body with a click ``UsageError`` (:func:`check_seed_span`), still before
any file is touched. Help shows the short metavar (``FLOAT``, ``INT``, ``SEED``...); the error
message names the range.

Types:

* :class:`Real` ``(lo, hi, lo_open, hi_open, allow_inf)``: a finite float in the range (``nan`` always
  refused; ``+inf`` only with ``allow_inf``, for "no limit" values);
* :class:`Integer` ``(lo, hi)``: a base-10 integer (no ``1.5``, ``1e3``) in ``[lo, hi]``; every integer
  option has an upper bound (``MAX_*`` below), so no value allocates or loops without limit;
* :data:`SEED` (``[0, 2**63)``, what a seeded generator takes), :data:`REPEATS` / :data:`PATTERNS`
  (``[1, MAX_REPEATS]``); a base seed plus its patterns must stay below ``2**63``: call
  :func:`check_seed_span` in the command;
* :class:`Device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; CUDA only when a GPU is there);
* :class:`Choice` (a fixed list), :class:`Name` (a registry name, checked by the registry: non-blank,
  no spaces), :class:`Text` (non-blank free text such as glob patterns);
* :class:`Reals` / :class:`Integers`: comma-separated lists of the above (returned as lists);
* :class:`KeyValue`: ``key=value`` (repeatable options);
* :class:`Shard`: ``I/N`` with ``1 <= I <= N <= MAX_SHARDS`` (``--shard``), returned as ``(I, N)``;
* :class:`Calibration`: ``minmax`` or ``percentile:Q`` with ``Q`` in (50, 100] (``--act-calibration``).

The activation-error options of ``evaluate`` (``--act-bits`` ...) are declared here once
(:data:`ActBits` and the other ``Act*`` annotations) and checked together by
:func:`activation_options`, so the command's body stays short.
* :class:`Protection`: a per-layer protection spec (``--protect``; :mod:`qmargin.faults.protection`),
  returned as its canonical text.

A new kind of value gets a new :class:`QmarginType` subclass here, with its invalid values in
``invalid_examples`` (the flag test feeds them to every option of that type).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

import click
import typer

from qmargin.errors import ConfigError

__all__ = [
    "QmarginType",
    "Real",
    "Integer",
    "Seed",
    "Device",
    "Choice",
    "Name",
    "Text",
    "Reals",
    "Integers",
    "KeyValue",
    "Shard",
    "Calibration",
    "ActBits",
    "ActCalibration",
    "ActCalibrationBatches",
    "ActBer",
    "ActBerFollows",
    "ActOnly",
    "activation_options",
    "ACT_CALIBRATION_BATCHES",
    "Protection",
    "Floats",
    "Ints",
    "ShardPair",
    "SEED",
    "SEED_LIMIT",
    "REPEATS",
    "PATTERNS",
    "DEVICE",
    "TRAIN_DEVICE",
    "NAME",
    "BER",
    "MAX_REPEATS",
    "MAX_EPOCHS",
    "MAX_BATCH",
    "MAX_WIDTH",
    "MAX_WORKERS",
    "MAX_SHARDS",
    "check_seed_span",
]

SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, SEED_LIMIT)`` (``qmargin.faults.functional.SEED_RANGE``; a test checks
that the two agree: this module may not import torch)."""
MAX_REPEATS = 100_000
"""Most error patterns per BER (``--repeats``, ``--patterns``)."""
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 24
MAX_WIDTH = 1 << 16
"""Widest hidden layer ``--hidden`` builds."""
MAX_WORKERS = 4096
"""Most Ray workers (``--workers``) a campaign starts."""
MAX_SHARDS = 1 << 20
"""Most shards of ``--shard I/N`` (the library also refuses more shards than the campaign has cells)."""

Floats = Sequence[float]
"""Annotation of a :class:`Reals` option (typer must not see ``list``: it would make it repeatable)."""
Ints = Sequence[int]
"""Annotation of an :class:`Integers` option."""
ShardPair = Sequence[int]
"""Annotation of a :class:`Shard` option (``(I, N)``; typer must not see ``tuple``: it would take two
values)."""


def _fmt(x: float | int | None, *, low: bool) -> str:
    if x is None:
        return "-inf" if low else "inf"
    return repr(x)


class QmarginType(click.ParamType):
    """Base of the checked types: ``parse(text) -> value`` raises ``ValueError`` with the reason."""

    name = "value"
    metavar = "VALUE"
    """What ``--help`` shows after the flag (``name``, with the range, is in the error messages)."""

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        return self.metavar

    def parse(self, text: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def invalid_examples(self) -> list[str]:
        """Values this type must refuse (fed to every option of the type by the flag test)."""
        return ["", " "]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default that is already the value (not a string)
            value = str(value) if not isinstance(value, list | tuple) else ",".join(map(str, value))
        try:
            return self.parse(value)
        except ValueError as err:
            self.fail(" ".join(str(err).split()), param, ctx)


# -- numbers ------------------------------------------------------------------------------------


class Real(QmarginType):
    """A finite float in ``[lo, hi]`` (``(`` / ``)`` with ``lo_open`` / ``hi_open``); ``nan`` is never
    accepted, ``+inf`` only with ``allow_inf`` (a value that means "no limit")."""

    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        allow_inf: bool = False,
    ) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open, self.allow_inf = lo, hi, lo_open, hi_open, allow_inf
        self.name = f"real in {self.range_text()}"
        self.metavar = "FLOAT"

    def range_text(self) -> str:
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return f"{left}{_fmt(self.lo, low=True)}, {_fmt(self.hi, low=False)}{right}"

    def parse(self, text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if math.isnan(v) or (math.isinf(v) and not (self.allow_inf and v > 0)):
            raise ValueError(f"{text.strip()} is not a finite number")
        lo, hi = self.lo, self.hi
        if lo is not None and (v <= lo if self.lo_open else v < lo):
            raise ValueError(f"must be in {self.range_text()}, got {text.strip()}")
        if hi is not None and (v >= hi if self.hi_open else v > hi):
            raise ValueError(f"must be in {self.range_text()}, got {text.strip()}")
        return v

    def invalid_examples(self) -> list[str]:
        bad = [*super().invalid_examples(), "nan", "-inf", "abc", "1e400" if not self.allow_inf else "-1e400"]
        if not self.allow_inf:
            bad.append("inf")
        if self.lo is not None:
            bad.append(repr(self.lo - max(1.0, abs(self.lo))))
            if self.lo_open:
                bad.append(repr(self.lo))
        if self.hi is not None:
            bad.append(repr(self.hi + max(1.0, abs(self.hi))))
            if self.hi_open:
                bad.append(repr(self.hi))
        return bad


_INT = re.compile(r"[+-]?[0-9]+")


class Integer(QmarginType):
    """A base-10 integer in ``[lo, hi]`` (and ``also``: single extra values, e.g. 32 float bits)."""

    def __init__(self, lo: int, hi: int, *, also: Sequence[int] = ()) -> None:
        self.lo, self.hi, self.also = lo, hi, tuple(also)
        extra = "".join(f" or {a}" for a in self.also)
        self.name = f"integer in [{lo}, {hi}]{extra}"
        self.metavar = "INT"

    def parse(self, text: str) -> int:
        t = text.strip().replace("_", "")
        if not _INT.fullmatch(t):
            raise ValueError(f"{text!r} is not an integer")
        v = int(t)
        if not (self.lo <= v <= self.hi or v in self.also):
            raise ValueError(f"must be an {self.name}, got {t}")
        return v

    def invalid_examples(self) -> list[str]:
        bad = [*super().invalid_examples(), "abc", "1.5", "nan", "inf", "1e3"]
        bad += [str(self.lo - 1), str(self.hi + 1), str(10**30), str(-(10**30))]
        return [b for b in bad if not (_INT.fullmatch(b) and int(b) in self.also)]


class Seed(Integer):
    """A seed: an integer in ``[0, 2**63)``."""

    def __init__(self) -> None:
        super().__init__(0, SEED_LIMIT - 1)
        self.name = "seed in [0, 2**63)"
        self.metavar = "SEED"

    def parse(self, text: str) -> int:
        t = text.strip().replace("_", "")
        if not _INT.fullmatch(t):
            raise ValueError(f"{text!r} is not an integer")
        v = int(t)
        if not 0 <= v < SEED_LIMIT:
            raise ValueError(f"a seed must be in [0, 2**63), got {t}")
        return v


def check_seed_span(
    base_seed: int, count: int, seed_flag: str = "--seed", count_flag: str = "--repeats"
) -> None:
    """Patterns ``0..count-1`` use seeds ``base_seed + r``: the last must be below ``2**63``.

    Raises a click usage error (one line, exit 2) naming both flags.
    """
    if base_seed + count > SEED_LIMIT:
        raise click.UsageError(
            f"{seed_flag} {base_seed} with {count_flag} {count} needs seeds up to {base_seed + count - 1}, "
            f"beyond 2**63 - 1; use {seed_flag} <= {SEED_LIMIT - count}"
        )


# -- names and choices --------------------------------------------------------------------------


class Device(QmarginType):
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (``indexed``); CUDA only when a GPU is available."""

    def __init__(self, *, indexed: bool = True) -> None:
        self.indexed = indexed
        self.name = "auto|cpu|cuda" + ("[:N]" if indexed else "")
        self.metavar = self.name

    def parse(self, text: str) -> str:
        t = text.strip().lower()
        pattern = r"cuda(:[0-9]+)?" if self.indexed else "cuda"
        if t not in ("auto", "cpu") and not re.fullmatch(pattern, t):
            raise ValueError(f"{text!r} is not a device; use {self.name}")
        if t.startswith("cuda"):
            import torch  # lazy: only when a GPU is asked for (qmargin --help must not load torch)

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(t.split(":")[1]) if ":" in t else 0
            if count == 0:
                raise ValueError(f"{t}: no CUDA GPU is available; use --device cpu or auto")
            if index >= count:
                raise ValueError(f"{t}: there are {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
        return t

    def invalid_examples(self) -> list[str]:
        return [*super().invalid_examples(), "foo", "gpu", "cuda:x", "cuda:-1", "cpu:0", "cuda:99999"]


class Choice(QmarginType):
    """One of a fixed list of words (case-insensitive; returned as written in the list)."""

    def __init__(self, *choices: str) -> None:
        self.choices = tuple(choices)
        self.name = self.metavar = "|".join(self.choices)

    def parse(self, text: str) -> str:
        t = text.strip().lower()
        for c in self.choices:
            if c.lower() == t:
                return c
        raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")

    def invalid_examples(self) -> list[str]:
        return [*super().invalid_examples(), "no-such-choice", "nan", "-1"]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class Name(QmarginType):
    """A registry name (dataset, model, loss): letters, digits, ``_.+-``; the registry says if it exists
    (an unknown name is its ``ConfigError``, one line)."""

    name = "name"
    metavar = "NAME"

    def parse(self, text: str) -> str:
        t = text.strip()
        if not _NAME.fullmatch(t):
            raise ValueError(f"{text!r} is not a name")
        return t

    def invalid_examples(self) -> list[str]:
        return [*super().invalid_examples(), "a b", "-1", "../x"]


class Text(QmarginType):
    """Non-blank free text (e.g. comma-separated glob patterns)."""

    name = "text"
    metavar = "TEXT"

    def parse(self, text: str) -> str:
        if not text.strip():
            raise ValueError("an empty value")
        return text


class KeyValue(QmarginType):
    """``key=value`` (``key`` non-blank); returned as the text, the command parses the value."""

    name = "key=value"
    metavar = "KEY=VALUE"

    def parse(self, text: str) -> str:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"needs key=value, got {text!r}")
        return text

    def invalid_examples(self) -> list[str]:
        return [*super().invalid_examples(), "novalue", "=1"]


class Shard(QmarginType):
    """``I/N``: shard ``I`` of ``N`` (``1 <= I <= N <= MAX_SHARDS``, 1-based like a SLURM array
    ``--array=1-N``) -> ``(I, N)``."""

    name = f"shard I/N with 1 <= I <= N <= {MAX_SHARDS}"
    metavar = "I/N"

    def parse(self, text: str) -> tuple[int, int]:
        i, sep, n = text.strip().partition("/")
        if not sep or not _INT.fullmatch(i.strip()) or not _INT.fullmatch(n.strip()):
            raise ValueError(f"{text!r} is not I/N (e.g. 2/8: the second of eight shards)")
        index, count = int(i), int(n)
        if not 1 <= count <= MAX_SHARDS:
            raise ValueError(f"the number of shards must be in [1, {MAX_SHARDS}], got {count}")
        if not 1 <= index <= count:
            raise ValueError(f"the shard must be in 1..{count} (counted from 1), got {index}")
        return index, count

    def invalid_examples(self) -> list[str]:
        return [
            *super().invalid_examples(),
            "abc",
            "1",
            "0/4",
            "5/4",
            "1/0",
            "-1/4",
            "1.5/4",
            "1/2/3",
            "a/b",
            f"1/{MAX_SHARDS + 1}",
            "nan/4",
        ]


class Calibration(QmarginType):
    """``minmax`` | ``percentile:Q`` (``Q`` in (50, 100], e.g. 99.9): how activation ranges are
    calibrated; returned normalised (``"percentile:99.9"``)."""

    name = "minmax or percentile:Q with Q in (50, 100]"
    metavar = "minmax|percentile:Q"

    def parse(self, text: str) -> str:
        t = text.strip().lower()
        if t == "minmax":
            return t
        method, sep, arg = t.partition(":")
        if method == "percentile" and sep:
            try:
                q = float(arg)
            except ValueError:
                q = math.nan
            if math.isfinite(q) and 50.0 < q <= 100.0:
                return f"percentile:{q:g}"
            raise ValueError(f"percentile:Q needs Q in (50, 100], got {arg.strip()!r}")
        raise ValueError(f"{text!r} is not minmax or percentile:Q (e.g. percentile:99.9)")

    def invalid_examples(self) -> list[str]:
        return [
            *super().invalid_examples(),
            "mse",
            "percentile",
            "percentile:",
            "percentile:50",
            "percentile:101",
            "percentile:nan",
            "percentile:abc",
            "minmax:1",
        ]


class Protection(QmarginType):
    """A protection spec, ``[PATTERN=]SCHEME,...`` with SCHEME ``none | msbK | secdedK | secded(N,K) |
    parity[K]`` (``:keep|zero|flag`` for secded / parity): :mod:`qmargin.faults.protection`, parsed
    there through ``qmargin.experiments`` (imported only when the flag is given: it loads torch) ->
    the canonical spec text."""

    name = "protection spec"
    metavar = "SPEC"

    def parse(self, text: str) -> str:
        from qmargin.experiments.evaluate import protection_spec_text  # lazy: torch

        return protection_spec_text(text)  # ConfigError is a ValueError: one line, exit 2

    def invalid_examples(self) -> list[str]:
        return [
            *super().invalid_examples(),
            "foo",
            "msb0",
            "msb9",
            "secded(73,64)",
            "parity:maybe",
            "*=none,fc=msb1",
            "fc=msb1,fc=none",
            "fc=",
            ",",
            "none:flag",
        ]


# -- lists --------------------------------------------------------------------------------------


class Reals(QmarginType):
    """Comma-separated :class:`Real` values, at least one, no duplicates (unless ``unique=False``) ->
    ``list[float]``."""

    def __init__(
        self, lo: float | None = None, hi: float | None = None, *, unique: bool = True, **kwargs: Any
    ) -> None:
        self.item = Real(lo, hi, **kwargs)
        self.unique = unique  # False: repeats allowed (per-channel values, e.g. --mean 0.5,0.5,0.5)
        self.name = f"comma-separated reals in {self.item.range_text()}"
        self.metavar = "FLOAT,..."

    def parse(self, text: str) -> list[float]:
        parts = [p for p in (p.strip() for p in text.split(",")) if p]  # "0,0.01," is two values
        if not parts:
            raise ValueError("give at least one value")
        values = [self.item.parse(p) for p in parts]
        if self.unique and len(set(values)) != len(values):
            raise ValueError(f"duplicate values in {text!r}")
        return values

    def invalid_examples(self) -> list[str]:
        return [*self.item.invalid_examples(), ",", "abc,", f"{self.item.invalid_examples()[-1]},abc"]


class Integers(QmarginType):
    """Comma-separated :class:`Integer` values (or seeds), at least one, no duplicates -> ``list[int]``."""

    def __init__(self, lo: int, hi: int) -> None:
        self.item: Integer = Seed() if (lo, hi) == (0, SEED_LIMIT - 1) else Integer(lo, hi)
        self.name = f"comma-separated {self.item.name}s"
        self.metavar = "INT,..."

    def parse(self, text: str) -> list[int]:
        parts = [p for p in (p.strip() for p in text.split(",")) if p]  # "0,0.01," is two values
        if not parts:
            raise ValueError("give at least one value")
        values = [self.item.parse(p) for p in parts]
        if len(set(values)) != len(values):
            raise ValueError(f"duplicate values in {text!r}")
        return values

    def invalid_examples(self) -> list[str]:
        return [*self.item.invalid_examples(), f"{self.item.lo},{self.item.lo}", ",", f"{self.item.lo},x"]


SEED = Seed()
REPEATS = Integer(1, MAX_REPEATS)
PATTERNS = REPEATS
DEVICE = Device(indexed=True)
TRAIN_DEVICE = Device(indexed=False)
"""``train`` stores its device in the run's config, which names ``auto``, ``cpu`` or ``cuda``."""
NAME = Name()
BER = Real(0.0, 1.0)


# -- activation errors (qmargin evaluate) ---------------------------------------------------------

ACT_CALIBRATION_BATCHES = 4
"""Default of ``--act-calibration-batches`` (``qmargin.experiments.evaluate.DEFAULT_CALIBRATION_BATCHES``;
a test checks that the two agree: this module may not import torch)."""

ActBits = Annotated[
    int | None,
    typer.Option(
        click_type=Integer(2, 8),
        help="Quantize the outputs of the selected quantized layers (activation buffers) to B-bit "
        "codes (symmetric, per tensor) and hit them with bit errors too (--act-ber, --act-ber-follows, "
        "--act-only). Results then depend on --batch-size (errors are drawn per batch).",
    ),
]
ActCalibration = Annotated[
    str,
    typer.Option(
        click_type=Calibration(),
        help="--act-bits: activation ranges from minmax or percentile:Q (e.g. percentile:99.9).",
    ),
]
ActCalibrationBatches = Annotated[
    int,
    typer.Option(
        click_type=Integer(1, MAX_REPEATS),
        help="--act-bits: calibrate on N batches of --batch-size: the start of the training split for "
        "a run directory, the first N test batches for --model.",
    ),
]
ActBer = Annotated[
    float | None,
    typer.Option(
        click_type=Real(0.0, 1.0),
        help="--act-bits: activation BER P in every pattern while --ber sweeps the weights (default 0: "
        "quantized activations without errors).",
    ),
]
ActBerFollows = Annotated[
    bool,
    typer.Option(help="--act-bits: activations take the --ber grid's BER too (both swept by one grid)."),
]
ActOnly = Annotated[
    bool,
    typer.Option(help="--act-bits: the --ber grid hits the activations only; weights stay clean."),
]


def activation_options(
    bits: int | None,
    calibration: str,
    calibration_batches: int,
    ber: float | None,
    follows: bool,
    only: bool,
    *,
    calibration_default: str = "minmax",
    batches_default: int = ACT_CALIBRATION_BATCHES,
) -> dict[str, Any] | None:
    """The ``--act-*`` flags as the keywords of ``qmargin.experiments.evaluate.ActivationOptions``
    (``None`` without ``--act-bits``), or a one-line ``ConfigError`` (exit 2) for a combination that
    means nothing."""
    if bits is None:
        given = [
            flag
            for flag, on in (
                ("--act-ber", ber is not None),
                ("--act-ber-follows", follows),
                ("--act-only", only),
                ("--act-calibration", calibration != calibration_default),
                ("--act-calibration-batches", calibration_batches != batches_default),
            )
            if on
        ]
        if given:
            raise ConfigError(f"{given[0]} needs --act-bits B (the activation codes to corrupt)")
        return None
    if ber is not None and (follows or only):
        other = "--act-ber-follows" if follows else "--act-only"
        raise ConfigError(
            f"--act-ber P fixes the activation BER; {other} takes it from the --ber grid: give one"
        )
    return {
        "bits": bits,
        "calibration": calibration,
        "calibration_batches": calibration_batches,
        "ber": None if (follows or only) else (0.0 if ber is None else ber),
        "only": only,
    }
