"""Cost of one bit-error pattern in a whole campaign, relative to one clean pass, next to MRFI.

Model: ResNet-20 (CIFAR layout, 0.27 M weights), weights quantized to 8 bits per output channel;
test set: ``--n`` random 3x32x32 images (the timing does not depend on the pixel values) in batches
of ``--batch`` (256). In the same run, interleaved ``--reps`` times (medians reported):

* **clean pass**: one pass over the test set, quantized model, no injection (the baseline);
* **qmargin**: ``run_ber_campaign`` at BER ``--ber`` with ``--repeats`` patterns; the cost of one
  pattern is ``(campaign time - clean time) / repeats`` (the campaign does one clean pass itself);
  each pattern corrupts the stored codes once, evaluates the whole test set, restores the codes;
* **MRFI** (PyPI ``mrfi`` 2.1.0, fffasttime/MRFI): weight fault injection with its ``weight_fi``
  preset adapted to the same model: symmetric 8-bit quantization of each weight, ``IntRandomBitFlip``
  on 8 bits, ``RandomPositionByRate`` with value rate ``8 * BER`` (MRFI flips one random bit of a
  chosen value, so ``8 * BER`` per value is the same expected number of flipped bits per bit). MRFI
  restores, re-quantizes and re-injects the float weights in a forward pre-hook, i.e. on **every
  batch**; the cost of one of its patterns is one pass over the test set with injection on, and its
  baseline is a clean pass of the same float model without MRFI.

Ratios are per-pattern cost / clean pass (goal for qmargin: <= 1.1x). MRFI needs ``pyyaml`` and
imports nothing of torchvision at run time; install it with
``pip install --no-deps mrfi==2.1.0 pyyaml`` (its metadata requires torchvision, whose wheel is a
multi-GB CUDA build here). Without it the MRFI rows are skipped and say so.

    OMP_NUM_THREADS=1 python benchmarks/bench_campaign_cost.py            # n=2048, 3 reps
    OMP_NUM_THREADS=1 python benchmarks/bench_campaign_cost.py --quick    # n=512, 2 reps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks_md import machine_description, write_section
from qmargin.experiments import run_ber_campaign
from qmargin.models import resnet20
from qmargin.quant import QuantSpec, freeze_model, quantize_model

MRFI_CONFIG = """
faultinject:
  - type: weight
    name: [weight]
    quantization:
      method: SymmericQuantization
      dynamic_range: auto
      bit_width: 8
    enabled: True
    selector:
      method: RandomPositionByRate
      poisson: True
      rate: {rate}
    error_mode:
      method: IntRandomBitFlip
      bit_width: 8
    module_type: [Conv2d, Linear]
"""


def _pass(model: nn.Module, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for xb in batches:
            model(xb)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="test images (default 2048; 512 with --quick)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None, help="patterns per campaign (default 8; 4 quick)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; 2 quick)")
    ap.add_argument("--ber", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n or (512 if args.quick else 2048)
    repeats = args.repeats or (4 if args.quick else 8)
    reps = args.reps or (2 if args.quick else 3)

    torch.manual_seed(0)
    float_model = resnet20(num_classes=10, in_channels=3).eval()
    qmodel = copy.deepcopy(float_model)
    converted = quantize_model(qmodel, QuantSpec(bits=8, per_channel=True))
    freeze_model(qmodel)
    qmodel.eval()
    x = torch.rand(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    batches = [x[i : i + args.batch] for i in range(0, n, args.batch)]

    try:
        import mrfi  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        mrfi_model = None
        mrfi_note = "MRFI not installed (pip install --no-deps mrfi==2.1.0 pyyaml): its rows are skipped."
    else:
        from mrfi import MRFI, EasyConfig

        mrfi_float = copy.deepcopy(float_model)
        mrfi_model = MRFI(mrfi_float, EasyConfig.load_string(MRFI_CONFIG.format(rate=8 * args.ber)))
        mrfi_note = "MRFI 2.1.0, weight_fi preset at 8 bits, value rate 8 x BER."

    t_clean: list[float] = []
    t_campaign: list[float] = []
    t_float: list[float] = []
    t_mrfi: list[float] = []
    for _ in range(reps):
        t_clean.append(_pass(qmodel, batches))

        def campaign() -> float:
            t = time.perf_counter()
            run_ber_campaign(
                qmodel, x, y, bers=[args.ber], repeats=repeats, base_seed=0, batch_size=args.batch
            )
            return time.perf_counter() - t

        t_campaign.append(campaign())
        if mrfi_model is not None:
            t_float.append(_pass(float_model, batches))
            t_mrfi.append(_pass(mrfi_model, batches))

    clean = statistics.median(t_clean)
    per_pattern = (statistics.median(t_campaign) - clean) / repeats
    rows = [
        ("clean pass, quantized ResNet-20 (baseline)", clean, 1.0),
        (f"qmargin: one pattern of a campaign ({repeats} patterns)", per_pattern, per_pattern / clean),
    ]
    if mrfi_model is not None:
        fclean = statistics.median(t_float)
        fi = statistics.median(t_mrfi)
        rows += [
            ("clean pass, float ResNet-20 (MRFI's baseline)", fclean, 1.0),
            ("MRFI: one pattern (a pass with weight injection)", fi, fi / fclean),
        ]

    machine = machine_description()
    lines = [
        "## Campaign cost per pattern vs a clean pass (ResNet-20, with MRFI)",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/bench_campaign_cost.py{' --quick' if args.quick else ''}`"
        f" — {machine}; {n} images, batch {args.batch}, BER {args.ber:g}, {len(converted)} quantized layers"
        f" (8 bits, per channel); medians of {reps} interleaved repetitions. {mrfi_note}",
        "",
        "| what | seconds | ratio to its clean pass |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.3f} | {ratio:.2f}x |" for name, sec, ratio in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text, Path(__file__).resolve().parents[1] / "BENCHMARKS.md", lines[0])


if __name__ == "__main__":
    main()
