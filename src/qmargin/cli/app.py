"""The ``qmargin`` command: flags, printing, progress bars and exit codes live here and nowhere else.

Goes through ``qmargin.experiments`` (and renders with ``qmargin.report``) only. Those two are
imported inside the commands: importing them loads torch or matplotlib (1-2 s), and ``qmargin
--help`` and the usage errors should answer at once.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qmargin.cli import options as opt
from qmargin.cli.interrupts import command_line
from qmargin.cli.protection import show_protection
from qmargin.errors import ConfigError
from qmargin.files import check_output, check_outputs, lock_output, write_text_atomic
from qmargin.files import write_json_atomic as atomic_write_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train, stress-test and certify low-precision neural networks (MCEL, bit errors, MonDEQ).",
)
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce the papers' experiments.")
app.add_typer(reproduce_app, name="reproduce")

# Wide enough for the result tables when the output is a file or a pipe (rich assumes 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)


# -- option values ------------------------------------------------------------------------------
# The library's names (qmargin.training.config, qmargin.experiments.mcel / mondeq) are not imported
# here (they load torch); tests/test_hardening_flags.py checks that these lists equal them.
DEFAULT_BERS = (0.0, 0.001, 0.01, 0.05)
QUANT = opt.Choice("sym", "asym")
OPTIMIZER = opt.Choice("adam", "sgd")
SCHEDULE = opt.Choice("none", "cosine", "step")
MCEL_PRESETS = ("fast", "fast-vgg3", "fast-resnet20", "full", "fashion", "cifar10", "imagenette")
MONDEQ_PRESETS = ("fast", "full", "conv")


# -- parsing helpers ----------------------------------------------------------------------------


def _logger(quiet: bool):
    """``log(msg)`` for the experiments: prints unless ``--quiet``."""
    return (lambda msg: None) if quiet else console.print


def _progress_enabled(quiet: bool) -> bool:
    return not quiet and console.is_terminal


# -- demo ---------------------------------------------------------------------------------------


@app.command()
def demo(
    bits: Annotated[
        int, typer.Option(click_type=opt.Integer(1, 8), help="Weight bits of the quantized MLP (1..8).")
    ] = 4,
    epochs: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_EPOCHS), help="Training epochs per loss.")
    ] = 30,
    ber: Annotated[
        opt.Floats,
        typer.Option(click_type=opt.Reals(0.0, 1.0), help="Comma-separated bit error rates in [0, 1]."),
    ] = DEFAULT_BERS,
    repeats: Annotated[int, typer.Option(click_type=opt.REPEATS, help="Seeded error patterns per BER.")] = 10,
    seed: Annotated[
        int, typer.Option(click_type=opt.SEED, help="Training seed (patterns use 100, 101, ...).")
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the runs and results (default: a temp dir).")
    ] = None,
    mondeq: Annotated[bool, typer.Option(help="Also train and certify a small MonDEQ.")] = True,
) -> None:
    """Train a 4-bit MLP on the built-in digits with CE and MCEL, stress it with bit errors, and
    certify a small MonDEQ across bit widths."""
    bers = list(ber)
    from qmargin.experiments.demo import run_demo  # lazy: torch (see the module docstring)
    from qmargin.report import compare_table  # lazy: matplotlib

    console.print(f"[bold]qmargin demo[/]: digits, MLP 64-256-256-10, {bits}-bit weights, CE vs MCEL")
    result = run_demo(
        bits=bits,
        epochs=epochs,
        bers=bers,
        repeats=repeats,
        seed=seed,
        out_dir=out,
        mondeq=mondeq,
        log=lambda msg: console.print(msg),
    )
    console.print(compare_table(result["campaigns"], title=f"accuracy (%), {repeats} patterns per BER"))
    for label, t in result["train_time_s"].items():
        console.print(f"  training time {label}: {t:.1f} s")
    if result.get("certificates"):
        from qmargin.report.certificates import certificate_table  # lazy: matplotlib (qmargin.report)

        console.print(certificate_table(result["certificates"], title=result["mondeq_title"]))
    console.print(f"results: {result['out_dir']}")


# -- train --------------------------------------------------------------------------------------


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run directory (config, checkpoints, metrics).")],
    dataset: Annotated[
        str,
        typer.Option(
            click_type=opt.NAME, help="digits | mnist5k | mnist | fashion-mnist | cifar10 | imagenette"
        ),
    ] = "digits",
    model: Annotated[
        str,
        typer.Option(
            click_type=opt.NAME,
            help="mlp | vgg3 | vgg7 | resnet20 | resnet18 | mobilenetv2 | mondeq | mondeq-conv | "
            "mondeq-multitier",
        ),
    ] = "mlp",
    bits: Annotated[
        int,
        typer.Option(
            click_type=opt.Integer(1, 8, also=(32,)), help="Weight bits 1..8, or 32 for a float model."
        ),
    ] = 8,
    quant: Annotated[
        str, typer.Option(click_type=QUANT, help="sym (two's complement) | asym (unsigned + zero point)")
    ] = "sym",
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="Scale per output channel.")
    ] = False,
    loss: Annotated[
        str, typer.Option(click_type=opt.NAME, help="ce | mcel | mhl (or a loss registered in Python)")
    ] = "ce",
    margin: Annotated[
        float | None,
        typer.Option(click_type=opt.Real(0.0), help="MCEL margin M (default: from the ablation)."),
    ] = None,
    bound: Annotated[
        float | None,
        typer.Option(
            click_type=opt.Real(0.0, lo_open=True, allow_inf=True),
            help="MCEL soft-clamp bound T (default: from the ablation; inf: no clamp).",
        ),
    ] = None,
    logit_scale: Annotated[
        float | None, typer.Option(click_type=opt.Real(0.0, lo_open=True), help="MCEL fixed logit scale s.")
    ] = None,
    hinge_b: Annotated[
        float | None, typer.Option(click_type=opt.Real(0.0, lo_open=True), help="MHL hinge b.")
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option(
            click_type=opt.Real(0.0, 1.0, hi_open=True),
            help="CE / MCEL label smoothing in [0, 1).",
        ),
    ] = None,
    loss_arg: Annotated[
        list[str] | None,
        typer.Option(
            click_type=opt.KeyValue(),
            help="A loss option key=value (value read as JSON, else as text); repeatable.",
        ),
    ] = None,
    train_ber: Annotated[
        float,
        typer.Option(
            click_type=opt.Real(0.0, 0.5),
            help="RandBET: train with bit errors at this BER (0: off).",
        ),
    ] = 0.0,
    w_max: Annotated[
        float | None,
        typer.Option(click_type=opt.Real(0.0, lo_open=True), help="Weight clipping to [-w_max, w_max]."),
    ] = None,
    epochs: Annotated[int, typer.Option(click_type=opt.Integer(1, opt.MAX_EPOCHS), help="Epochs.")] = 10,
    batch_size: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_BATCH), help="Mini-batch size.")
    ] = 128,
    lr: Annotated[float, typer.Option(click_type=opt.Real(0.0, lo_open=True), help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(click_type=OPTIMIZER, help="adam | sgd")] = "adam",
    weight_decay: Annotated[float, typer.Option(click_type=opt.Real(0.0), help="Weight decay.")] = 0.0,
    schedule: Annotated[str, typer.Option(click_type=SCHEDULE, help="none | cosine | step")] = "none",
    seed: Annotated[
        int, typer.Option(click_type=opt.SEED, help="Seed of everything random in training.")
    ] = 0,
    device: Annotated[str, typer.Option(click_type=opt.TRAIN_DEVICE, help="auto | cpu | cuda")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Directory of file-based datasets.")] = None,
    download: Annotated[bool, typer.Option(help="Download missing dataset files (checksummed).")] = False,
    certify: Annotated[
        bool,
        typer.Option(
            help="MonDEQ: certified (margin-aware) quantization-aware training (conv: exact per frequency)."
        ),
    ] = False,
    hidden: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(1, opt.MAX_WIDTH),
            help="Hidden width (MLP: both layers, VGG: classifier, MonDEQ: n, conv MonDEQs: channels).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Discard what the run directory holds and start over.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train one model (resumes an interrupted run in the same directory)."""
    from qmargin.experiments.runs import (  # lazy: torch
        TrainConfig,
        check_model_kwargs,
        hidden_kwargs,
        load_dataset,
        train_run,
    )

    model_kwargs: dict[str, object] = {} if hidden is None else hidden_kwargs(model, hidden)
    if certify:
        model_kwargs["certify"] = True
    check_model_kwargs(model, model_kwargs)
    knobs = {
        "margin": margin,
        "bound": bound,
        "logit_scale": logit_scale,
        "b": hinge_b,
        "label_smoothing": label_smoothing,
    }
    loss_kwargs: dict[str, object] = {k: v for k, v in knobs.items() if v is not None}
    loss_kwargs |= _key_values("--loss-arg", loss_arg or [])
    config = TrainConfig(
        dataset=dataset,
        model=model,
        bits=bits,
        quant=quant,
        per_channel=per_channel,
        loss=loss,
        loss_kwargs=loss_kwargs,
        train_ber=train_ber,
        w_max=w_max,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        schedule=schedule,
        seed=seed,
        device=device,
        data_dir=str(data_dir) if data_dir else None,
        model_kwargs=model_kwargs,
    )
    data = load_dataset(dataset, data_dir=data_dir, download=download)
    with _TrainProgress(enabled=_progress_enabled(quiet)) as progress:
        result = train_run(config, dataset=data, out_dir=out, progress=progress, force=force)
    if result.skipped:
        console.print(f"{out}: already trained (use --force to retrain)")
    for rec in result.history[-3:] if not quiet else []:
        console.print(
            f"  epoch {rec['epoch']:>3}: train loss {rec['train_loss']:.4f}  "
            f"train acc {rec['train_acc']:.4f}  test acc {rec['test_acc']:.4f}"
        )
    console.print(
        f"test accuracy {result.test_acc:.4f}  ({result.config.loss}, {_bits_label(result.config.bits)}, "
        f"train time {result.train_time_s:.1f} s)  -> {out}"
    )


def _key_values(flag: str, items: list[str]) -> dict[str, object]:
    """``["k=v", ...]`` -> ``{k: v}``; ``v`` is read as JSON (numbers, ``Infinity``, lists), else as a
    float (``inf``), else kept as text."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} needs key=value, got {item!r}")
        value: object
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        out[key.strip()] = value
    return out


def _bits_label(bits: int) -> str:
    return "float" if bits == 32 else f"{bits}-bit"


class _RichProgress:
    """A transient rich progress bar (a context manager that yields itself, or None when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return None
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


class _TrainProgress(_RichProgress):
    """Fed by the trainer's progress callback."""

    def __call__(self, epoch: int, step: int, metrics: dict) -> None:
        assert self._progress is not None
        event = metrics.get("event")
        if event == "start":
            total = metrics["epochs"] * metrics["steps_per_epoch"]
            self._task = self._progress.add_task("training", total=total, completed=step, info="")
        elif event == "step" and self._task is not None:
            self._progress.update(
                self._task, completed=step, info=f"epoch {epoch} loss {metrics['loss']:.3f}"
            )
        elif event == "epoch" and self._task is not None:
            self._progress.update(self._task, info=f"epoch {epoch} test acc {metrics['test_acc']:.3f}")


# -- evaluate -----------------------------------------------------------------------------------


@app.command()
def evaluate(
    run: Annotated[
        Path | None,
        typer.Argument(help="Run directory written by 'qmargin train' (or use --model and --data)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Text(),
            help="Your model: pkg.module:factory or path/to/file.py:factory returning an nn.Module.",
        ),
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option(
            click_type=opt.KeyValue(),
            help="A factory argument key=value (value read as JSON, else as text); repeatable.",
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="--model: weights, .safetensors or a .pt/.pth state dict.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Text(),
            help="--model: test data: a dataset name, npz:FILE (arrays x, y), folder:DIR (ImageFolder) "
            "or pkg.module:function / file.py:function returning a Dataset or DataLoader.",
        ),
    ] = None,
    ber: Annotated[
        opt.Floats,
        typer.Option(click_type=opt.Reals(0.0, 1.0), help="Comma-separated bit error rates in [0, 1]."),
    ] = DEFAULT_BERS,
    repeats: Annotated[int, typer.Option(click_type=opt.REPEATS, help="Seeded error patterns per BER.")] = 20,
    seed: Annotated[
        int, typer.Option(click_type=opt.SEED, help="Base seed: pattern r uses seed + r (paired).")
    ] = 100,
    out: Annotated[
        Path | None,
        typer.Option(help="Result JSON (CSV beside it). Default: RUN/ber.json; required with --model."),
    ] = None,
    protected_bits: Annotated[
        opt.Ints | None,
        typer.Option(
            click_type=opt.Integers(0, 7),
            help="Bit positions that never flip, e.g. 7 (bit 0 = LSB). --protect msbK is the same "
            "for the top K positions of every layer; not combinable with --protect.",
        ),
    ] = None,
    protect: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Protection(),
            help="Per-layer memory protection, first match wins: [PATTERN=]SCHEME,... with SCHEME none | "
            "msbK | secdedK | secded(72,64) | parity[K], and :keep|zero|flag for a detected "
            "uncorrectable error; e.g. secded64 or 'conv*=msb2,fc3=secded64,*=none'.",
        ),
    ] = None,
    layers: Annotated[
        str,
        typer.Option(
            click_type=opt.Text(),
            help="Comma-separated glob patterns of layers to hit; with a float --model, the layers to "
            "quantize.",
        ),
    ] = "*",
    exclude: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Text(), help="--model: comma-separated glob patterns of layers to leave alone."
        ),
    ] = None,
    include_bias: Annotated[bool, typer.Option(help="Also hit biases stored as codes.")] = False,
    bits: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(1, 8),
            help="Float runs / models: post-training quantize to these bits first (default 8).",
        ),
    ] = None,
    quant: Annotated[
        str,
        typer.Option(
            click_type=opt.Choice("sym", "asym"),
            help="--model: sym (two's complement) | asym (unsigned + zero point).",
        ),
    ] = "sym",
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="--model: one scale per output channel.")
    ] = False,
    resize: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(1, opt.MAX_WIDTH),
            help="folder: data: resize the shorter side to N pixels.",
        ),
    ] = None,
    crop: Annotated[
        int | None,
        typer.Option(click_type=opt.Integer(1, opt.MAX_WIDTH), help="folder: data: central N x N crop."),
    ] = None,
    mean: Annotated[
        opt.Floats | None,
        typer.Option(
            click_type=opt.Reals(unique=False),
            help="folder: data: normalise, per-channel means (with --std).",
        ),
    ] = None,
    std: Annotated[
        opt.Floats | None,
        typer.Option(
            click_type=opt.Reals(0.0, None, lo_open=True, unique=False),
            help="folder: data: normalise, per-channel stds.",
        ),
    ] = None,
    grayscale: Annotated[bool, typer.Option(help="folder: data: read images as one channel.")] = False,
    batch_size: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_BATCH), help="Test samples per forward pass.")
    ] = 1024,
    patterns_per_pass: Annotated[
        int,
        typer.Option(
            click_type=opt.REPEATS,
            help="Evaluate K error patterns in one vmapped pass (pays off for MLPs).",
        ),
    ] = 1,
    device: Annotated[str, typer.Option(click_type=opt.DEVICE, help="auto | cpu | cuda[:N]")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Directory of file-based datasets.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a result file with other settings.")] = False,
    plot: Annotated[bool, typer.Option(help="Also write a PNG plot beside the JSON.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Choice("twos", "offset", "sign-magnitude"),
            help="Word format of the codes: twos | offset | sign-magnitude (default: the run's).",
        ),
    ] = None,
    saturate: Annotated[
        bool | None,
        typer.Option(
            "--saturate/--no-saturate", help="Clamp corrupted words to [-qmax, qmax] (default: the run's)."
        ),
    ] = None,
    nested: Annotated[
        bool, typer.Option(help="Nested patterns: bits flipped at a lower BER are a subset (same seed).")
    ] = False,
    metric: Annotated[
        str,
        typer.Option(
            click_type=opt.Text(),
            help="top1 | topK (e.g. top5) | cross_entropy | pkg.module:name / file.py:name (a Metric, "
            "or fn(outputs, targets) -> (sum, count) per batch).",
        ),
    ] = "top1",
    data_identity: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Text(),
            help="--model: name the data with this string instead of hashing it while it streams.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(1, opt.MAX_WORKERS),
            help="Evaluate the cells on N local Ray workers (pip install 'qmargin[ray]'); same result.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            click_type=opt.Text(),
            help="Evaluate the cells on the Ray cluster at ADDR (auto, or HOST:PORT); --workers actors, "
            "default one per CPU.",
        ),
    ] = None,
    shard: Annotated[
        opt.ShardPair | None,
        typer.Option(
            click_type=opt.Shard(),
            help="Only shard I of N (1-based; every N-th cell) into --out; combine with 'qmargin merge'.",
        ),
    ] = None,
    ci_halfwidth: Annotated[
        float | None,
        typer.Option(
            click_type=opt.Real(0.0, None, lo_open=True),
            help="Stop adding patterns at a BER once the 95%% CI of the mean is at most H wide on each "
            "side (percentage points for accuracies, else the metric's units); --repeats is the cap.",
        ),
    ] = None,
    min_patterns: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(2, opt.MAX_REPEATS),
            help="--ci-halfwidth: patterns per BER before the rule may stop it (default 5).",
        ),
    ] = None,
    act_bits: opt.ActBits = None,
    act_calibration: opt.ActCalibration = "minmax",
    act_calibration_batches: opt.ActCalibrationBatches = opt.ACT_CALIBRATION_BATCHES,
    act_ber: opt.ActBer = None,
    act_ber_follows: opt.ActBerFollows = False,
    act_only: opt.ActOnly = False,
) -> None:
    """Accuracy under random bit errors: BER grid x seeded patterns (resumable).

    Either a run directory of 'qmargin train', or your own network: --model FACTORY [--weights FILE]
    --data SPEC --out r.json (a float model is quantized after training with --bits, --quant,
    --per-channel, --layers, --exclude).
    """
    bers = list(ber)
    protected = tuple(protected_bits or ())
    opt.check_seed_span(seed, repeats)
    distribute: dict[str, Any] = {
        "workers": workers,
        "ray_address": ray_address,
        "shard": None if shard is None else (int(shard[0]), int(shard[1])),
        "ci_halfwidth": ci_halfwidth,
        **({} if min_patterns is None else {"min_patterns": min_patterns}),
    }
    act = opt.activation_options(
        act_bits, act_calibration, act_calibration_batches, act_ber, act_ber_follows, act_only
    )
    if act is not None:
        from qmargin.experiments.evaluate import ActivationOptions  # lazy: torch

        distribute["activations"] = ActivationOptions(**act)
    if min_patterns is not None and ci_halfwidth is None:
        raise ConfigError("--min-patterns is for --ci-halfwidth")
    layer_patterns = tuple(p.strip() for p in layers.split(",") if p.strip())
    external = {
        "--model-arg": bool(model_arg),
        "--weights": weights is not None,
        "--data": data is not None,
        "--exclude": exclude is not None,
        "--quant": quant != "sym",
        "--per-channel": per_channel,
        "--resize": resize is not None,
        "--crop": crop is not None,
        "--mean": mean is not None,
        "--std": std is not None,
        "--grayscale": grayscale,
        "--data-identity": data_identity is not None,
    }
    if model is not None:
        if run is not None:
            raise ConfigError(f"give a run directory ({run}) or --model, not both")
        _evaluate_model(
            model,
            model_args=_key_values("--model-arg", model_arg or []),
            weights=weights,
            data=data,
            out=out,
            bers=bers,
            repeats=repeats,
            seed=seed,
            protected=protected,
            layers=layer_patterns,
            exclude=tuple(p.strip() for p in (exclude or "").split(",") if p.strip()),
            include_bias=include_bias,
            bits=bits,
            quant=quant,
            per_channel=per_channel,
            image={
                "resize": resize,
                "crop": crop,
                "mean": None if mean is None else tuple(mean),
                "std": None if std is None else tuple(std),
                "grayscale": grayscale,
            },
            batch_size=batch_size,
            patterns_per_pass=patterns_per_pass,
            device=device,
            data_dir=data_dir,
            overwrite=overwrite,
            plot=plot,
            quiet=quiet,
            metric=metric,
            data_identity=data_identity,
            storage=storage,
            saturate=saturate,
            nested=nested,
            distribute=distribute,
            protect=protect,
        )
        return
    if run is None:
        raise ConfigError("give a run directory of 'qmargin train', or --model SPEC --data SPEC --out FILE")
    given = [flag for flag, on in external.items() if on]
    if given:
        raise ConfigError(f"{given[0]} is for --model; a run directory brings its own model and data")
    out = out or run / "ber.json"
    from qmargin.experiments.evaluate import evaluate_run, run_input_files  # lazy: torch
    from qmargin.report import ber_table, plot_accuracy_vs_ber  # lazy: matplotlib

    derived = {"result JSON (--out)": out, "CSV": out.with_suffix(".csv")}
    if plot:
        derived["plot"] = out.with_suffix(".png")
    check_outputs(derived, inputs=run_input_files(run))

    with _CampaignProgress(enabled=_progress_enabled(quiet)) as progress:
        result = evaluate_run(
            run,
            bers=bers,
            repeats=repeats,
            base_seed=seed,
            out_path=out,
            protected_bits=protected,
            layers=layer_patterns,
            include_bias=include_bias,
            batch_size=batch_size,
            device=device,
            data_dir=data_dir,
            overwrite=overwrite,
            progress=progress,
            ptq_bits=bits,
            patterns_per_pass=patterns_per_pass,
            storage=storage,
            saturate=saturate,
            nested=nested,
            metric=metric,
            protect=protect,
            **distribute,
        )
    if "ptq_bits" in result.get("config", {}):
        console.print(
            f"float run: evaluated after post-training quantization to "
            f"{result['config']['ptq_bits']}-bit codes"
        )
    console.print(
        ber_table(
            result,
            title=f"{run}: {_metric_label(result)} under random bit errors "
            f"({_patterns_label(result, repeats)})",
        )
    )
    show_protection(console, result)
    if any("failures" in r for r in result["results"]):
        n_test = result.get("evaluation", {}).get("n_test", "?")
        parts = [
            f"BER {r['ber']:g}: {sum(r['failures']) / len(r['failures']):.1f}" for r in result["results"]
        ]
        console.print(
            f"MonDEQ solves that did not converge (counted as errors), mean per pattern of {n_test} samples: "
            + ", ".join(parts)
        )
    _shard_note(result)
    _activation_note(result)
    if plot:
        png = out.with_suffix(".png")
        plot_accuracy_vs_ber([(run.name, result)], png, title=f"{run.name}")
        console.print(f"wrote {out}, {out.with_suffix('.csv')}, {png}")
    else:
        console.print(f"wrote {out}, {out.with_suffix('.csv')}")


def _evaluate_model(
    model: str,
    *,
    model_args: dict[str, object],
    weights: Path | None,
    data: str | None,
    out: Path | None,
    bers: list[float],
    repeats: int,
    seed: int,
    protected: tuple[int, ...],
    layers: tuple[str, ...],
    exclude: tuple[str, ...],
    include_bias: bool,
    bits: int | None,
    quant: str,
    per_channel: bool,
    image: dict,
    batch_size: int,
    patterns_per_pass: int,
    device: str,
    data_dir: Path | None,
    overwrite: bool,
    plot: bool,
    quiet: bool,
    metric: str,
    data_identity: str | None,
    storage: str | None,
    saturate: bool | None,
    nested: bool,
    distribute: dict,
    protect: str | None = None,
) -> None:
    """``qmargin evaluate --model ...``: a user's own network (qmargin.experiments.external)."""
    if data is None:
        raise ConfigError(
            "--model needs --data (a dataset name, npz:FILE, folder:DIR or pkg.module:function)"
        )
    if out is None:
        raise ConfigError("--model needs --out FILE.json (where the result goes)")
    if quant not in ("sym", "asym"):
        raise ConfigError(f"--quant must be sym or asym, got {quant!r}")
    if bits is not None and not 1 <= bits <= 8:
        raise ConfigError(f"--bits must be in 1..8 for stored weights, got {bits}")
    from qmargin.experiments.external import (  # lazy: torch
        ImageOptions,
        QuantOptions,
        evaluate_external,
        external_input_files,
    )
    from qmargin.report import ber_table, plot_accuracy_vs_ber  # lazy: matplotlib

    derived = {"result JSON (--out)": out, "CSV": out.with_suffix(".csv")}
    if plot:
        derived["plot"] = out.with_suffix(".png")
    check_outputs(derived, inputs=external_input_files(weights, data))

    def show_layers(ext) -> None:
        how = "quantized after training" if ext.mode == "ptq" else "already quantized, stressed as stored"
        console.print(_layers_table(ext.layers, title=f"{model}: {len(ext.layers)} stored tensors ({how})"))

    with _CampaignProgress(enabled=_progress_enabled(quiet)) as progress:
        result = evaluate_external(
            model,
            data,
            bers=bers,
            repeats=repeats,
            base_seed=seed,
            out_path=out,
            model_args=model_args,
            weights=weights,
            quant=QuantOptions(
                bits=bits,
                symmetric=quant == "sym",
                per_channel=per_channel,
                layers=layers or ("*",),
                exclude=exclude,
            ),
            image=ImageOptions(**image),
            protected_bits=protected,
            include_bias=include_bias,
            batch_size=batch_size,
            device=device,
            data_dir=data_dir,
            overwrite=overwrite,
            progress=progress,
            patterns_per_pass=patterns_per_pass,
            on_model=show_layers,
            metric=metric,
            data_identity=data_identity,
            storage=storage,
            saturate=saturate,
            nested=nested,
            protect=protect,
            **distribute,
        )
    n = result.get("evaluation", {}).get("n_test", "?")
    console.print(ber_table(result, title=f"{data}: {n} samples, {_metric_label(result)}"))
    show_protection(console, result)
    _shard_note(result)
    _activation_note(result)
    if plot:
        png = out.with_suffix(".png")
        plot_accuracy_vs_ber([(out.stem, result)], png, title=f"{model} on {data}")
        console.print(f"wrote {out}, {out.with_suffix('.csv')}, {png}")
    else:
        console.print(f"wrote {out}, {out.with_suffix('.csv')}")


def _shard_note(result: dict) -> None:
    """One line under a shard's table: what it holds and how the shards are combined."""
    shard = result.get("shard")
    if isinstance(shard, dict):
        console.print(
            f"shard {shard['index']}/{shard['count']}: {result['timing']['patterns_done']} cells; when every "
            "shard is done: qmargin merge SHARD.json... --out FILE.json"
        )


def _activation_note(result: dict) -> None:
    """Under the table of a campaign with activation errors: the buffers, their calibration, the BERs."""
    act = result.get("activations")
    if not isinstance(act, dict):
        return
    cal = act.get("calibration", {})
    how = cal.get("method") if cal.get("method") != "percentile" else f"percentile {cal.get('percentile'):g}"
    ber = act.get("ber")
    if not act.get("weight_errors", True):
        errs = "activation BER = the grid's BER, no weight errors"
    elif ber == "grid":
        errs = "weights and activations both at the grid's BER"
    elif not ber:
        errs = "no activation errors, weights at the grid's BER"
    else:
        errs = f"activation BER {ber:g} in every pattern, weights at the grid's BER"
    console.print(
        f"activations: {act['bits']}-bit codes of {len(act['layers'])} layer(s) "
        f"({', '.join(act['layers'])}), "
        f"calibrated {how} on {cal.get('source')}; {errs}; "
        f"batch size {act.get('batch_size')} (errors drawn per batch)"
    )


def _patterns_label(result: dict, repeats: int) -> str:
    """``"20 patterns"``, or with a stopping rule ``"up to 200 patterns, until the 95% CI is ±0.5"``."""
    stop = result.get("stopping")
    if not isinstance(stop, dict):
        return f"{repeats} patterns"
    fraction = (result.get("metric") or {"fraction": True}).get("fraction", True)
    h = 100 * stop["halfwidth"] if fraction else stop["halfwidth"]
    return f"up to {repeats} patterns, until the {100 * stop['level']:g}% CI is ±{h:g}"


def _metric_label(result: dict) -> str:
    """``"accuracy (%)"`` for top-1 results, else the metric's name (``"top5 (%)"``, ``"cross_entropy"``)."""
    m = result.get("metric") or {"name": "top1", "fraction": True}
    name = "accuracy" if m.get("name") == "top1" else str(m.get("name"))
    return f"{name} (%)" if m.get("fraction") else name


def _layers_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("layer", "kind", "tensor", "shape", "bits", "quant", "per channel"):
        table.add_column(col, justify="right" if col == "bits" else "left")
    for r in rows:
        table.add_row(
            r["layer"],
            r["kind"],
            r["tensor"],
            "x".join(str(d) for d in r["shape"]),
            str(r["bits"]),
            r["quant"],
            "yes" if r["per_channel"] else "no",
        )
    return table


class _CampaignProgress(_RichProgress):
    """Fed by the campaign's per-pattern progress callback."""

    def __call__(self, p) -> None:
        assert self._progress is not None
        if self._task is None:  # a resumed run starts at p.done - 1: the ETA counts this run's speed only
            self._task = self._progress.add_task("patterns", total=p.total, completed=p.done - 1, info="")
        self._progress.update(self._task, completed=p.done, info=f"BER {p.ber:g}: {p.accuracy:.3f}")


class _StepsProgress(_RichProgress):
    """Fed by a reproduction's ``progress(done, total, label)`` (:mod:`qmargin.experiments.progress`)."""

    def __call__(self, done: int, total: int, label: str) -> None:
        assert self._progress is not None
        if self._task is None:
            self._task = self._progress.add_task("steps", total=total, completed=done, info="")
        self._progress.update(self._task, completed=done, info=f"done: {label}" if label else "")


# -- compare ------------------------------------------------------------------------------------


@app.command()
def compare(
    items: Annotated[
        list[Path], typer.Argument(help="Run directories (their ber.json) or campaign JSON files.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Plot PNG (default: compare.png in the current directory).")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="Comma-separated labels (default: directory names)."),
    ] = None,
    markdown: Annotated[bool, typer.Option(help="Print a markdown table instead of a rich table.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="HTML report (plots, tables, provenance). Default: the plot's name with .html."),
    ] = None,
) -> None:
    """Side-by-side table, one plot and an HTML report of several campaigns."""
    from qmargin.experiments.campaign import check_result_weights, load_campaign  # lazy: torch
    from qmargin.report import (  # lazy: matplotlib
        compare_table,
        format_markdown_table,
        paired_table,
        plot_accuracy_vs_ber,
    )

    names = [s.strip() for s in labels.split(",")] if labels else None
    if names is not None and len(names) != len(items):
        raise ConfigError(f"--labels has {len(names)} names for {len(items)} items")
    results = []
    paths = []
    for i, item in enumerate(items):
        path = item / "ber.json" if item.is_dir() else item
        if not path.is_file():
            raise ConfigError(f"{path}: no campaign results (run 'qmargin evaluate {item}' first)")
        label = names[i] if names else (item.name if item.is_dir() else item.parent.name or item.stem)
        results.append((label, check_result_weights(load_campaign(path), path)))
        paths.append(path)
    out = out or Path("compare.png")
    checked = check_outputs(
        {"plot (--out)": out, "HTML report (--html)": html or out.with_suffix(".html")},
        inputs=[*items, *(p / "ber.json" for p in items)],
    )
    out, html = checked["plot (--out)"], checked["HTML report (--html)"]
    if markdown:
        print(format_markdown_table(results, compare=True))
    else:
        console.print(compare_table(results, title="accuracy under random bit errors"))
        paired = paired_table(
            results, title=f"paired differences against {results[0][0]} over shared pattern seeds"
        )
        if paired is not None:
            console.print(paired)
    plot_accuracy_vs_ber(results, out, title="accuracy vs bit error rate")
    _write_report(html, paths, labels=[label for label, _ in results], title="qmargin compare")
    console.print(f"wrote {out}, {html}")


# -- report -------------------------------------------------------------------------------------


@app.command()
def report(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="Campaign JSON files, run directories (their ber.json), certificate JSON files of "
            "'qmargin certify', reproduction output directories (or their summary.json).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    labels: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="Comma-separated labels, one per RESULT (default: names)."),
    ] = None,
    title: Annotated[str | None, typer.Option(click_type=opt.Text(), help="Title of the page.")] = None,
    band: Annotated[
        str,
        typer.Option(
            click_type=opt.Choice("minmax", "std"),
            help="Pattern band of the plots: minmax (min..max) | std (mean ± std).",
        ),
    ] = "minmax",
) -> None:
    """One self-contained HTML file (loads nothing from the network) of stored results: metric-vs-BER
    plots with pattern bands and 95 % confidence intervals, comparison tables, MonDEQ certificate
    tables, the resolved configurations and the provenance (version, command, date, machine, SHA-256
    of every input)."""
    names = [s.strip() for s in labels.split(",")] if labels else None
    if names is not None and len(names) != len(results):
        raise ConfigError(f"--labels has {len(names)} names for {len(results)} results")
    out = check_output(out, inputs=results, what="--out")
    doc = _write_report(out, results, labels=names, title=title or "qmargin report", band=band)
    n = len(doc["comparisons"]) + len(doc["certificates"]) + len(doc["mondeq"])
    console.print(f"wrote {out} ({n} section{'s' if n != 1 else ''} from {len(doc['inputs'])} input files)")


def _write_report(
    out: Path,
    results: list[Path],
    *,
    labels: list[str] | None = None,
    title: str,
    band: str = "minmax",
) -> dict:
    """Read ``results``, render the HTML report and write it to ``out`` (checked against every file
    read, atomically, holding the output's lock); returns the document."""
    from qmargin.experiments.report_inputs import read_report_inputs  # lazy: torch
    from qmargin.report.html import report_html  # lazy: matplotlib
    from qmargin.report.provenance import provenance  # lazy: matplotlib (qmargin.report)

    doc = read_report_inputs(results, labels=labels)
    check_output(out, inputs=[*results, *(i["path"] for i in doc["inputs"])], what="HTML report")
    prov = provenance(command=command_line(), inputs=doc["inputs"])
    page = report_html({**doc, "title": title, "band": band, "provenance": prov})
    with lock_output(out):
        write_text_atomic(out, page)
    return doc


# -- merge --------------------------------------------------------------------------------------


@app.command()
def merge(
    shards: Annotated[
        list[Path], typer.Argument(help="Results of 'qmargin evaluate --shard I/N' (JSON), all shards.")
    ],
    out: Annotated[Path, typer.Option(help="Merged result JSON (CSV beside it).")],
    allow_partial: Annotated[
        bool,
        typer.Option(
            help="Write a partial result when cells are missing ('qmargin evaluate ... --out FILE' "
            "finishes it) instead of refusing."
        ),
    ] = False,
) -> None:
    """Combine the shards of a campaign into one result, identical to a run without shards.

    Refuses shards of other campaigns (the differing setting is named), a cell given twice and, unless
    --allow-partial, missing cells.
    """
    from qmargin.experiments.campaign import merge_campaigns  # lazy: torch
    from qmargin.report import ber_table  # lazy: matplotlib

    result = merge_campaigns(shards, out, allow_partial=allow_partial)
    done, total = result["timing"]["patterns_done"], len(result["bers"]) * result["repeats"]
    console.print(
        ber_table(
            result, title=f"{len(shards)} shards merged: {done} of {total} cells, {_metric_label(result)}"
        )
    )
    status = "" if result["status"] == "complete" else f" (partial: {total - done} cells missing)"
    console.print(f"wrote {out}, {out.with_suffix('.csv')}{status}")


# -- certify ------------------------------------------------------------------------------------


@app.command()
def certify(
    checkpoint: Annotated[
        Path, typer.Argument(help="MonDEQ run directory, or a .pt state dict (2020 / 2026 format).")
    ],
    bits: Annotated[
        opt.Ints,
        typer.Option(
            click_type=opt.Integers(1, 16),
            help="Comma-separated bit widths 2..8 (up to 16 for W as a study).",
        ),
    ] = (3, 4, 5, 6, 8),
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="Per-row scales for W.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write the certificates as JSON.")] = None,
    m: Annotated[
        float | None,
        typer.Option(
            click_type=opt.Real(0.0, lo_open=True),
            help="m > 0 of a 2020-format checkpoint (a constructor argument there).",
        ),
    ] = None,
    ber: Annotated[
        float | None,
        typer.Option(click_type=opt.BER, help="Also certify under random bit errors at this BER."),
    ] = None,
    patterns: Annotated[int, typer.Option(click_type=opt.PATTERNS, help="Error patterns for --ber.")] = 100,
    seed: Annotated[
        int,
        typer.Option(
            click_type=opt.SEED,
            help="Base seed of the --ber patterns: pattern r flips the bits 'qmargin evaluate --seed SEED' "
            "flips in its pattern r (same codes, paired).",
        ),
    ] = 0,
    samples: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(1, opt.MAX_BATCH),
            help="Run directories: check the displacement bound on this many test samples per bit width.",
        ),
    ] = None,
) -> None:
    """Certificates of a MonDEQ quantized at several bit widths, from the weights alone.

    Fully connected, single-convolution and multi-tier MonDEQs; convolutional ones are certified
    exactly per frequency (one c x c block per frequency of the circular convolution).

    With --ber, pattern r is drawn exactly as a bit-error campaign draws its pattern r with the same
    --seed (the stored W of the MonDEQ core, seed SEED + r), so certified shares and campaign
    accuracies refer to the same corrupted codes. With --samples, the equilibria of the float and
    the quantized network are solved on that many test samples and the displacement bound
    ||z* - z~*|| <= ||dW z~* + dU x + db|| / mu(W) is checked on each (max ratio, share that holds).
    """
    bit_list = list(bits)
    if ber is not None:
        opt.check_seed_span(seed, patterns, count_flag="--patterns")
    from qmargin.experiments.certify import certify_checkpoint  # lazy: torch
    from qmargin.experiments.evaluate import run_input_files  # lazy: torch
    from qmargin.report.certificates import certificate_table  # lazy: matplotlib (qmargin.report)

    with ExitStack() as outputs:
        if out is not None:  # checked and locked before the work, held until written
            check_output(out, inputs=run_input_files(checkpoint), what="--out")
            outputs.enter_context(lock_output(out))
        result = certify_checkpoint(
            checkpoint,
            bits=bit_list,
            per_channel=per_channel,
            m=m,
            ber=ber,
            patterns=patterns,
            seed=seed,
            samples=samples,
        )
        title = f"{checkpoint}: quantization certificates"
        if result.get("form") == "conv":
            first = result["results"][0]
            c = first["block_size"]
            title += f" (exact per frequency: {first['frequencies']} blocks of {c}x{c})"
        console.print(certificate_table(result["results"], title=title))
        if out is not None:
            atomic_write_json(out, result)
            console.print(f"wrote {out}")


# -- reproduce ----------------------------------------------------------------------------------


@reproduce_app.command("mcel")
def reproduce_mcel(
    preset: Annotated[
        str,
        typer.Option(
            click_type=opt.Choice(*MCEL_PRESETS),
            help="fast (mnist5k MLP, minutes on CPU) | fast-vgg3 | fast-resnet20 | fashion | cifar10 | "
            "imagenette | full",
        ),
    ] = "fast",
    out: Annotated[Path, typer.Option(help="Output directory (runs, results, plots).")] = Path(
        "runs/reproduce-mcel"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Directory of file-based datasets (full presets).")
    ] = None,
    results_dir: Annotated[
        Path | None, typer.Option(help="Also write tables and plots here (docs/results).")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="HTML report (default: OUT/report.html).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """CE vs MCEL vs MHL vs RandBET vs CE+clipping at 2/4/8 bits under bit errors."""
    from qmargin.experiments.mcel import run_mcel_reproduction  # lazy: torch

    report_path = check_output(html or out / "report.html", what="HTML report (--html)")
    log = _logger(quiet)
    with _StepsProgress(enabled=_progress_enabled(quiet)) as progress:
        result = run_mcel_reproduction(
            preset=preset, out_dir=out, data_dir=data_dir, log=log, results_dir=results_dir, progress=progress
        )
    print(result["markdown"])
    _write_report(report_path, [out], title=f"qmargin reproduce mcel --preset {preset}")
    console.print(f"results: {out}; report: {report_path}")


@reproduce_app.command("mcel-ablation")
def reproduce_mcel_ablation(
    out: Annotated[Path, typer.Option(help="Output directory (runs, results).")] = Path("runs/mcel-ablation"),
    seeds: Annotated[
        opt.Ints, typer.Option(click_type=opt.Integers(0, 2**31 - 1), help="Comma-separated training seeds.")
    ] = (0, 1, 2),
    epochs: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_EPOCHS), help="Epochs per run.")
    ] = 30,
    repeats: Annotated[int, typer.Option(click_type=opt.REPEATS, help="Error patterns per BER.")] = 20,
    results_dir: Annotated[
        Path | None, typer.Option(help="Also write the table here (docs/results).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Grid over MCEL's bound T, margin M and a fixed logit scale s at 2 and 4 bits (sets the defaults)."""
    seed_list = list(seeds)
    from qmargin.experiments.ablation import run_mcel_ablation  # lazy: torch

    log = _logger(quiet)
    with _StepsProgress(enabled=_progress_enabled(quiet)) as progress:
        result = run_mcel_ablation(
            out_dir=out,
            seeds=seed_list,
            epochs=epochs,
            repeats=repeats,
            results_dir=results_dir,
            log=log,
            progress=progress,
        )
    print(result["markdown"])


@reproduce_app.command("mondeq")
def reproduce_mondeq(
    preset: Annotated[
        str,
        typer.Option(
            click_type=opt.Choice(*MONDEQ_PRESETS),
            help="fast | full (fully connected) | conv (single convolution, certified 4/3-bit QAT)",
        ),
    ] = "fast",
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (runs/reproduce-mondeq; conv: runs/reproduce-mondeq-conv)."),
    ] = None,
    results_dir: Annotated[
        Path | None, typer.Option(help="Also write tables and plots here (docs/results).")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="HTML report (default: OUT/report.html).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """MonDEQ PTQ sweep with certificates, displacement validation, QAT and certified QAT.

    --preset conv: a single-convolution MonDEQ, certificates exact per frequency, the displacement
    bound checked on every test sample, certified QAT at 4 and 3 bits.
    """
    from qmargin.experiments.mondeq import run_mondeq_reproduction  # lazy: torch

    if out is None:
        out = Path("runs/reproduce-mondeq-conv" if preset == "conv" else "runs/reproduce-mondeq")
    report_path = check_output(html or out / "report.html", what="HTML report (--html)")
    log = _logger(quiet)
    with _StepsProgress(enabled=_progress_enabled(quiet)) as progress:
        result = run_mondeq_reproduction(
            preset=preset, out_dir=out, log=log, results_dir=results_dir, progress=progress
        )
    print(result["markdown"])
    _write_report(report_path, [out], title=f"qmargin reproduce mondeq --preset {preset}")
    console.print(f"results: {out}; report: {report_path}")


@app.command()
def datasets(
    data_dir: Annotated[Path | None, typer.Option(help="Also look here first (as --data-dir does).")] = None,
) -> None:
    """List the datasets: shape, split, and where their files were found (or how to get them)."""
    from rich.table import Table

    from qmargin.experiments.runs import list_datasets  # lazy: torch

    table = Table(title="datasets", title_justify="left")
    for col in ("name", "shape", "classes", "train / test", "found"):
        table.add_column(col, overflow="fold")
    missing = []
    for info in list_datasets(locate=True, data_dir=data_dir):
        loc = info["location"]
        shape = "x".join(map(str, info["input_shape"]))
        split = f"{info['num_train']:,} / {info['num_test']:,}" if info["num_train"] else "-"
        if loc["found"]:
            where = (
                "inside its Python package" if loc["rule"] == "package" else f"{loc['path']} ({loc['rule']})"
            )
        else:
            where = "no"
            missing.append(str(loc["error"]))
        table.add_row(info["name"], shape, str(info["num_classes"]), split, where)
    console.print(table)
    for line in missing:
        console.print(line, soft_wrap=True)


@app.command()
def sensitivity(
    run_or_model: Annotated[
        str | None,
        typer.Argument(
            click_type=opt.Text(),
            help="A run directory of 'qmargin train', or your model pkg.module:factory / file.py:factory.",
        ),
    ] = None,
    ber: Annotated[
        float | None,
        typer.Option(click_type=opt.Real(0.0, 1.0, lo_open=True), help="The bit error rate P, in (0, 1]."),
    ] = None,
    by: Annotated[
        str, typer.Option(click_type=opt.Choice("layer", "bit", "layer-bit"), help="layer | bit | layer-bit")
    ] = "layer",
    patterns: Annotated[
        int, typer.Option(click_type=opt.REPEATS, help="Paired error patterns per cell (seeds S, S+1, ...).")
    ] = 10,
    seed: Annotated[int, typer.Option(click_type=opt.SEED, help="Base seed: pattern r uses seed + r.")] = 100,
    out: Annotated[
        Path | None,
        typer.Option(help="Result JSON (CSV and PNG beside it). Default: RUN/sensitivity.json."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(click_type=opt.Text(), help="Your model (instead of RUN_OR_MODEL).")
    ] = None,
    model_arg: Annotated[
        list[str] | None, typer.Option(click_type=opt.KeyValue(), help="A factory argument key=value.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="--model: weights, .safetensors or a .pt/.pth state dict.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="--model: test data spec (as for 'qmargin evaluate')."),
    ] = None,
    layers: Annotated[
        str, typer.Option(click_type=opt.Text(), help="Comma-separated glob patterns of layers to analyse.")
    ] = "*",
    exclude: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="--model: glob patterns of layers to leave alone."),
    ] = None,
    include_bias: Annotated[bool, typer.Option(help="Also hit biases stored as codes.")] = False,
    bits: Annotated[
        int | None,
        typer.Option(click_type=opt.Integer(1, 8), help="Float runs / models: quantize to these bits first."),
    ] = None,
    quant: Annotated[str, typer.Option(click_type=QUANT, help="--model: sym | asym.")] = "sym",
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="--model: one scale per output channel.")
    ] = False,
    metric: Annotated[
        str, typer.Option(click_type=opt.Text(), help="top1 | topK | cross_entropy | pkg.module:name.")
    ] = "top1",
    data_identity: Annotated[
        str | None, typer.Option(click_type=opt.Text(), help="--model: name the data instead of hashing it.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_BATCH), help="Test samples per forward pass.")
    ] = 1024,
    reuse: Annotated[
        bool,
        typer.Option(help="Prefix reuse: clean activations before the first corrupted layer computed once."),
    ] = True,
    cache_mb: Annotated[
        int, typer.Option(click_type=opt.Integer(1, 1 << 20), help="Prefix cache budget in MiB.")
    ] = 512,
    device: Annotated[str, typer.Option(click_type=opt.DEVICE, help="auto | cpu | cuda[:N]")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Directory of file-based datasets.")] = None,
    plot: Annotated[
        bool, typer.Option(help="Also write a PNG (heat map or bar chart) beside the JSON.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Which layers / bit positions hurt: the metric drop at one BER with errors in one part only.

    Per layer (errors in that layer only), per bit position (that bit only, every layer) or both;
    each cell over the same paired patterns, with the mean drop and its 95% CI, and the full model
    for reference. JSON + CSV + PNG (heat map for --by layer-bit).
    """
    if ber is None:
        raise ConfigError("--ber P is required (a bit error rate in (0, 1])")
    opt.check_seed_span(seed, patterns)
    run, spec = _run_or_model_spec(run_or_model, model)
    layer_patterns = tuple(p.strip() for p in layers.split(",") if p.strip()) or ("*",)
    common: dict[str, Any] = {
        "ber": ber,
        "by": by,
        "patterns": patterns,
        "base_seed": seed,
        "include_bias": include_bias,
        "batch_size": batch_size,
        "device": device,
        "data_dir": data_dir,
        "metric": metric,
        "reuse": reuse,
        "cache_bytes": cache_mb * 2**20,
        "plot": plot,
    }
    from qmargin.experiments.sensitivity import sensitivity_external, sensitivity_run  # lazy: torch
    from qmargin.report.sensitivity import sensitivity_table  # lazy: matplotlib

    with _StepsProgress(enabled=_progress_enabled(quiet)) as progress:
        result, name, out = _on_run_or_model_spec(
            run, spec, default_out="sensitivity.json", what="result", on_spec=sensitivity_external,
            on_run=sensitivity_run,
            data=data, out=out, model_arg=model_arg, weights=weights, data_identity=data_identity,
            bits=bits, quant=quant, per_channel=per_channel, layer_patterns=layer_patterns,
            exclude=exclude, progress=progress, common=common,
        )  # fmt: skip
    reuse_note = result["prefix_reuse"]
    console.print(sensitivity_table(result, title=f"{name}: {_metric_label(result)} drop by {by}"))
    console.print(
        "prefix reuse: torch.fx, clean activations before the first corrupted layer computed once"
        if reuse_note["used"]
        else f"prefix reuse off: {reuse_note['reason']}"
    )
    files = [out, out.with_suffix(".csv")] + ([out.with_suffix(".png")] if plot else [])
    console.print("wrote " + ", ".join(str(f) for f in files))


def _run_or_model_spec(run_or_model: str | None, model: str | None) -> tuple[Path | None, str | None]:
    """``(run directory, model spec)`` of a command taking either as its argument, or ``--model``."""
    if run_or_model is None:
        return None, model
    if model is not None:
        raise ConfigError(f"give a run directory or model ({run_or_model}) or --model, not both")
    if Path(run_or_model).is_dir():
        return Path(run_or_model), None
    if ":" in run_or_model:
        return None, run_or_model
    raise ConfigError(
        f"{run_or_model} is neither a run directory nor a model spec (pkg.module:factory, file.py:factory)"
    )


def _on_run_or_model_spec(
    run: Path | None,
    spec: str | None,
    *,
    default_out: str,
    what: str,
    on_spec: Any,
    on_run: Any,
    data: str | None,
    out: Path | None,
    model_arg: list[str] | None,
    weights: Path | None,
    data_identity: str | None,
    bits: int | None,
    quant: str,
    per_channel: bool,
    layer_patterns: tuple[str, ...],
    exclude: str | None,
    progress: Any,
    common: dict[str, Any],
) -> tuple[dict[str, Any], str, Path]:
    """``(result, name, result path)``: ``on_spec`` for a user's model spec (needs ``--data`` and ``--out``),
    ``on_run`` for a run directory (refusing the model-spec flags; ``--out`` defaults to
    ``RUN/default_out``), as ``qmargin sensitivity`` and ``qmargin protect`` take them."""
    if spec is not None:
        if data is None:
            raise ConfigError("--model needs --data (a dataset name, npz:FILE, folder:DIR or pkg.module:fn)")
        if out is None:
            raise ConfigError(f"a model spec needs --out FILE.json (where the {what} goes)")
        from qmargin.experiments.external import QuantOptions  # lazy: torch

        result = on_spec(
            spec,
            data,
            out_path=out,
            model_args=_key_values("--model-arg", model_arg or []),
            weights=weights,
            data_identity=data_identity,
            progress=progress,
            quant=QuantOptions(
                bits=bits,
                symmetric=quant == "sym",
                per_channel=per_channel,
                layers=layer_patterns,
                exclude=tuple(p.strip() for p in (exclude or "").split(",") if p.strip()),
            ),
            **common,
        )
        return result, spec, out
    if run is None:
        raise ConfigError("give a run directory of 'qmargin train', or a model spec with --data and --out")
    for flag, on in (
        ("--model-arg", bool(model_arg)),
        ("--weights", weights is not None),
        ("--data", data is not None),
        ("--exclude", exclude is not None),
        ("--quant", quant != "sym"),
        ("--per-channel", per_channel),
        ("--data-identity", data_identity is not None),
    ):
        if on:
            raise ConfigError(f"{flag} is for a model spec; a run directory brings its own model and data")
    out = out or run / default_out
    result = on_run(run, out_path=out, layers=layer_patterns, ptq_bits=bits, progress=progress, **common)
    return result, str(run), out


def _dump(obj) -> str:
    return json.dumps(obj, indent=2)


@app.command()
def protect(
    run_or_model: Annotated[
        str | None,
        typer.Argument(
            click_type=opt.Text(),
            help="A run directory of 'qmargin train', or your model pkg.module:factory / file.py:factory.",
        ),
    ] = None,
    ber: Annotated[
        float | None,
        typer.Option(click_type=opt.Real(0.0, 1.0, lo_open=True), help="The bit error rate P, in (0, 1]."),
    ] = None,
    max_drop: Annotated[
        float,
        typer.Option(
            click_type=opt.Real(0.0, 1e9),
            help="Allowed mean drop of the metric at P, in points (percentage points for accuracies).",
        ),
    ] = 1.0,
    choices: Annotated[
        str,
        typer.Option(click_type=opt.Text(), help="Candidate schemes per layer (comma-separated)."),
    ] = "none,msb1,msb2,secded64",
    hardened_cost: Annotated[
        float,
        typer.Option(
            click_type=opt.Real(0.0, 1e6), help="Stored bits one hardened bit (msbK) costs."
        ),
    ] = 1.0,
    rounds: Annotated[
        int, typer.Option(click_type=opt.Integer(1, 100), help="Verification rounds at most.")
    ] = 4,
    strict: Annotated[
        bool, typer.Option(help="Meet the target with the upper end of the drop's 95% CI, not its mean.")
    ] = False,
    certify_flips: Annotated[
        int | None,
        typer.Option(
            click_type=opt.Integer(0, 1 << 40),
            help="MonDEQ run: the cheapest msbK certifying this many arbitrary flips of W (no campaign).",
        ),
    ] = None,
    patterns: Annotated[
        int, typer.Option(click_type=opt.REPEATS, help="Paired error patterns per run (seeds S, S+1, ...).")
    ] = 10,
    seed: Annotated[int, typer.Option(click_type=opt.SEED, help="Base seed: pattern r uses seed + r.")] = 100,
    out: Annotated[
        Path | None, typer.Option(help="Plan JSON. Default: RUN/protect.json (RUN/protect-certified.json).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(click_type=opt.Text(), help="Your model (instead of RUN_OR_MODEL).")
    ] = None,
    model_arg: Annotated[
        list[str] | None, typer.Option(click_type=opt.KeyValue(), help="A factory argument key=value.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="--model: weights, .safetensors or a .pt/.pth state dict.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="--model: test data spec (as for 'qmargin evaluate')."),
    ] = None,
    layers: Annotated[
        str, typer.Option(click_type=opt.Text(), help="Comma-separated glob patterns of layers to protect.")
    ] = "*",
    exclude: Annotated[
        str | None,
        typer.Option(click_type=opt.Text(), help="--model: glob patterns of layers to leave alone."),
    ] = None,
    include_bias: Annotated[bool, typer.Option(help="Also hit biases stored as codes.")] = False,
    bits: Annotated[
        int | None,
        typer.Option(click_type=opt.Integer(1, 8), help="Float runs / models: quantize to these bits first."),
    ] = None,
    quant: Annotated[str, typer.Option(click_type=QUANT, help="--model: sym | asym.")] = "sym",
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="--model: one scale per output channel.")
    ] = False,
    metric: Annotated[
        str, typer.Option(click_type=opt.Text(), help="top1 | topK | cross_entropy | pkg.module:name.")
    ] = "top1",
    data_identity: Annotated[
        str | None, typer.Option(click_type=opt.Text(), help="--model: name the data instead of hashing it.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(click_type=opt.Integer(1, opt.MAX_BATCH), help="Test samples per forward pass.")
    ] = 1024,
    reuse: Annotated[
        bool,
        typer.Option(help="Prefix reuse: clean activations before the first corrupted layer computed once."),
    ] = True,
    cache_mb: Annotated[
        int, typer.Option(click_type=opt.Integer(1, 1 << 20), help="Prefix cache budget in MiB.")
    ] = 512,
    device: Annotated[str, typer.Option(click_type=opt.DEVICE, help="auto | cpu | cuda[:N]")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Directory of file-based datasets.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """The cheapest per-layer protection keeping the metric drop at BER P within --max-drop.

    Measures per layer and candidate scheme the drop with errors in that layer only (paired
    patterns), solves the multiple-choice knapsack (min cost subject to the sum of drops), verifies
    the plan on the whole model and tightens until it holds. Prints the plan as a --protect spec
    with its overhead, beside the unprotected and fully protected model. Exit status 1 when no plan
    meets the target (the JSON says so), 2 for a usage error.
    """
    from qmargin.report.protect import (  # lazy: rich tables of the result
        certify_flips_table,
        protect_layers_table,
        protect_summary_table,
        protect_trace_lines,
    )

    if certify_flips is not None:
        if run_or_model is None or not Path(run_or_model).is_dir():
            raise ConfigError(
                "--certify-flips needs a run directory of a MonDEQ (qmargin train --model mondeq)"
            )
        if ber is not None:
            raise ConfigError("--certify-flips certifies from the weights alone; drop --ber")
        from qmargin.experiments.protect import certify_flips_plan  # lazy: torch

        run_dir = Path(run_or_model)
        out = out or run_dir / "protect-certified.json"
        cres = certify_flips_plan(
            run_dir, flips=certify_flips, bits=bits, hardened_cost=hardened_cost, out_path=out
        )
        console.print(
            certify_flips_table(cres, title=f"{run_dir}: hardened top bits of W vs certified flips")
        )
        if cres["plan"] is None:
            console.print(f"no msbK certifies {certify_flips} flips; wrote {out}")
            raise typer.Exit(1)
        console.print(
            f"cheapest: msb{cres['plan']['k']} (--protect {cres['plan']['spec']}), "
            f"{cres['plan']['hardened_bits']} hardened bits; wrote {out}"
        )
        return
    if ber is None:
        raise ConfigError("--ber P is required (a bit error rate in (0, 1])")
    opt.check_seed_span(seed, patterns)
    from qmargin.experiments.protect import parse_choices  # lazy: torch

    choice_list = parse_choices(choices)
    run, spec = _run_or_model_spec(run_or_model, model)
    layer_patterns = tuple(p.strip() for p in layers.split(",") if p.strip()) or ("*",)
    common: dict[str, Any] = {
        "ber": ber,
        "max_drop": max_drop,
        "choices": choice_list,
        "patterns": patterns,
        "base_seed": seed,
        "hardened_cost": hardened_cost,
        "rounds": rounds,
        "strict": strict,
        "include_bias": include_bias,
        "batch_size": batch_size,
        "device": device,
        "data_dir": data_dir,
        "metric": metric,
        "reuse": reuse,
        "cache_bytes": cache_mb * 2**20,
    }
    from qmargin.experiments.protect import protect_external, protect_run  # lazy: torch

    with _StepsProgress(enabled=_progress_enabled(quiet)) as progress:
        result, name, out = _on_run_or_model_spec(
            run, spec, default_out="protect.json", what="plan", on_spec=protect_external,
            on_run=protect_run,
            data=data, out=out, model_arg=model_arg, weights=weights, data_identity=data_identity,
            bits=bits, quant=quant, per_channel=per_channel, layer_patterns=layer_patterns,
            exclude=exclude, progress=progress, common=common,
        )  # fmt: skip
    title = f"{name}: {_metric_label(result)} drop per layer and scheme"
    console.print(protect_layers_table(result, title=title))
    for line in protect_trace_lines(result):
        console.print(line)
    console.print(protect_summary_table(result, title=f"{name}: protection plan at BER {ber:g}"))
    if result["plan"] is None:
        tried = "not even the strongest scheme per layer" if result["strongest_tried"] else "within --rounds"
        console.print(f"no plan meets a drop of {max_drop:g} points at BER {ber:g}, {tried}; wrote {out}")
        raise typer.Exit(1)
    console.print(f"plan: --protect {result['plan']['spec']}; wrote {out}")
