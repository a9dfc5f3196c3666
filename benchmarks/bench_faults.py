"""Benchmark of the bit-error engine (qmargin.faults) against a dense sampler and a plain copy.

For 8-bit codes of N weights and bit error rates p it times (median of ``--repeats`` runs, CPU):

* ``sample``: exact sparse sampling alone (``sample_bit_sites``: flipped word indices + masks);
* ``in-place + restore``: what ``inject`` does per tensor: sampling, XOR of the sampled bits into the
  codes (``flip_bits_``) and the exact restore (``WordPatch.undo_``);
* ``flip_random_bits``: the copy-returning convenience (one copy + the sparse work);
* ``dense``: the approach of published bit-error code: one uniform draw per bit compared with p,
  the XOR mask built from the comparisons, applied to a copy (in chunks of 2**22 words, so 1e8
  weights fit memory);
* ``copy``: ``codes.clone()``, the memory-traffic floor of producing a corrupted copy.

Then ``inject`` + restore on a ResNet-20 (``qmargin.models.resnet20``, 8-bit weights) against one
forward pass of a CIFAR-sized batch. Prints markdown tables.

    python benchmarks/bench_faults.py                      # sizes 1e6,1e7,1e8
    python benchmarks/bench_faults.py --quick              # 1e6,1e7, fewer rates and repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from qmargin.faults import BitErrorModel, flip_bits_, flip_random_bits, inject, sample_bit_sites
from qmargin.quant import QuantSpec, freeze_model

DENSE_CHUNK = 1 << 22


def dense_flip(codes: torch.Tensor, bits: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Reference dense sampler: one uniform per bit, ``u < p`` -> XOR mask; returns a corrupted copy."""
    out = torch.empty_like(codes)
    flat_in, flat_out = codes.view(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    for a in range(0, flat_in.numel(), DENSE_CHUNK):
        chunk = flat_in[a : a + DENSE_CHUNK]
        hit = torch.rand((chunk.numel(), bits), generator=generator) < p
        mask = (hit.to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)
        torch.bitwise_xor(chunk, mask, out=flat_out[a : a + DENSE_CHUNK])
    return out


def timeit(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall time in ms; ``fn`` gets the repeat index (used as the seed)."""
    fn(10_000)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, nproc={os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, load average at start {load:.2f}"
    )


def bench_rate(codes: torch.Tensor, p: float, repeats: int, dense_repeats: int) -> dict[str, float]:
    """Times (ms) of the samplers on ``codes`` at rate ``p``, and the median flip count."""
    bits, n = 8, codes.numel()
    flipped: list[int] = []

    def in_place(seed: int) -> None:
        sites = sample_bit_sites(n, bits, p, seed=seed)
        flip_bits_(codes, bits, sites).undo_(codes)
        flipped.append(sites.n_bits)

    dense_gen = torch.Generator().manual_seed(1)
    return {
        "sample": timeit(lambda r: sample_bit_sites(n, bits, p, seed=r), repeats),
        "in_place": timeit(in_place, repeats),
        "copying": timeit(lambda r: flip_random_bits(codes, bits, p, seed=r), repeats),
        "dense": timeit(lambda r: dense_flip(codes, bits, p, dense_gen), dense_repeats),
        "flipped": statistics.median(flipped),
    }


def bench_samplers(sizes: list[int], rates: list[float], repeats: int, dense_repeats: int) -> None:
    print("| weights | p | flipped bits | copy ms | sample ms | in-place + restore ms | flip_random_bits ms "
          "| dense ms | dense / flip_random_bits | in-place / copy | flip_random_bits / copy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        codes = torch.randint(-127, 128, (n,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
        copy_ms = timeit(lambda r, codes=codes: codes.clone(), repeats)
        for p in rates:
            t = bench_rate(codes, p, repeats, dense_repeats)
            print(
                f"| {n:.0e} | {p:.0e} | {t['flipped']:.3g} | {copy_ms:.2f} | {t['sample']:.2f} "
                f"| {t['in_place']:.2f} | {t['copying']:.2f} | {t['dense']:.0f} "
                f"| {t['dense'] / t['copying']:.0f}x | {t['in_place'] / copy_ms:.2f} "
                f"| {t['copying'] / copy_ms:.2f} |",
                flush=True,
            )


def bench_resnet(batch: int, rates: list[float], repeats: int) -> None:
    from qmargin.models import resnet20

    torch.manual_seed(0)
    model = resnet20(spec=QuantSpec(8)).eval()
    freeze_model(model)
    n_weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "quant_specs"))
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        fwd = timeit(lambda r: model(x), repeats)
    print(f"\nResNet-20, 8-bit weights ({n_weights} stored weights, {n_weights * 8} bits), "
          f"forward of a {batch}x3x32x32 batch: {fwd:.1f} ms\n")
    print("| BER | flipped bits | inject + restore ms | ratio to one forward pass |")
    print("|---:|---:|---:|---:|")
    for p in rates:
        flipped: list[int] = []

        def run(seed: int, p: float = p, flipped: list[int] = flipped) -> None:
            with inject(model, BitErrorModel(ber=p), seed=seed) as report:
                flipped.append(report.n_flipped)

        ms = timeit(run, max(repeats, 11))
        print(f"| {p:.0e} | {statistics.median(flipped):.0f} | {ms:.2f} | {ms / fwd:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated numbers of 8-bit weights")
    ap.add_argument("--rates", default="1e-4,1e-3,1e-2,1e-1", help="comma-separated bit error rates")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per cell (median is reported)")
    ap.add_argument("--dense-repeats", type=int, default=3, help="timed runs of the (slow) dense sampler")
    ap.add_argument("--batch", type=int, default=256, help="ResNet-20 forward batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="sizes 1e6,1e7; rates 1e-3,1e-2; 3 repeats")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in ("1e6,1e7" if args.quick else args.sizes).split(",")]
    rates = [float(r) for r in ("1e-3,1e-2" if args.quick else args.rates).split(",")]
    repeats = 3 if args.quick else args.repeats
    dense_repeats = 1 if args.quick else args.dense_repeats
    print(f"Machine: {machine()}\n")
    bench_samplers(sizes, rates, repeats, dense_repeats)
    if not args.skip_resnet:
        bench_resnet(args.batch, [1e-3, 1e-2], repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at end {load:.2f}")


if __name__ == "__main__":
    main()
