"""Benchmark of bit-error campaigns: per-pattern loop vs several patterns per (vmapped) forward pass.

For each model, the same campaign (one BER, R patterns, same seeds, same test data) runs with
``patterns_per_pass`` = 1 (the loop: inject, evaluate, restore) and larger values (K corrupted code
sets stacked and evaluated in one ``torch.func.vmap`` pass). Reports seconds per pattern (minimum over
``--reps`` interleaved repetitions), the speed-up over the loop, and checks that the accuracies are
identical. A last column times the loop with ``out_path`` set (partial JSON rewritten atomically
after every pattern) to show the cost of resumability.

    python benchmarks/bench_campaign.py            # full
    python benchmarks/bench_campaign.py --quick    # smaller test sets, fewer repetitions
    python benchmarks/bench_campaign.py --device cuda   # on a GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qmargin.experiments import run_ber_campaign
from qmargin.quant import QuantSpec, quantize_model


class SmallCNN(nn.Module):
    """conv(1->16) - BN - ReLU - pool - conv(16->32) - BN - ReLU - pool - linear(32*7*7 -> 10), 28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(h))), 2)
        return self.fc(h.flatten(1))


def _digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[1400:] / 16.0, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, x, torch.tensor(y[1400:])


def _mnist_mlp(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.rand(n, 784), torch.randint(0, 10, (n,))


def _cnn(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return SmallCNN(), torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))


def _timed(*args: Any, **kwargs: Any) -> tuple[float, dict]:
    """Wall time and result of ``run_ber_campaign(*args, **kwargs)``."""
    t = time.perf_counter()
    out = run_ber_campaign(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=16, help="patterns R per campaign")
    ap.add_argument("--ber", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (benchmarks/gpu_check.sh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 3)
    n = 1000 if args.quick else 5000
    cases = {
        "digits MLP 64-32-10, 4 bit, N=397": _digits_mlp,
        f"MLP 784-256-256-10, 8 bit, N={n}": lambda: _mnist_mlp(n),
        f"CNN 2 conv + BN + fc, 28x28, 8 bit, N={n // 5}": lambda: _cnn(n // 5),
    }
    per_pass = [1, 4, 16]
    gpu = f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}{gpu}; "
        f"BER {args.ber:g}, R = {args.repeats} patterns, "
        f"min over {reps} repetitions"
    )
    print()
    print(
        "| model | loop s/pattern | "
        + " | ".join(f"K={k} s/pattern (speed-up)" for k in per_pass[1:])
        + " | loop + partial JSON per pattern | identical |"
    )
    print("|---|---:|" + "---:|" * (len(per_pass) - 1) + "---:|---|")
    for name, make in cases.items():
        torch.manual_seed(0)
        model, x, y = make()
        bits = 4 if "4 bit" in name else 8
        quantize_model(model, QuantSpec(bits))
        model.eval()
        kw = dict(bers=[args.ber], repeats=args.repeats, base_seed=0, batch_size=1024, device=args.device)
        best: dict[str, float] = {}
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(reps):
                for k in per_pass:
                    dt, res = _timed(model, x, y, patterns_per_pass=k, **kw)
                    best[f"K{k}"] = min(best.get(f"K{k}", float("inf")), dt)
                    results[f"K{k}"] = res
                out = Path(tmp) / f"c{rep}.json"
                dt, _ = _timed(model, x, y, out_path=out, **kw)
                best["json"] = min(best.get("json", float("inf")), dt)
        same = all(results[f"K{k}"]["results"] == results["K1"]["results"] for k in per_pass)
        loop = best["K1"] / args.repeats
        cells = [
            f"{best[f'K{k}'] / args.repeats:.4f} ({best['K1'] / best[f'K{k}']:.2f}x)" for k in per_pass[1:]
        ]
        print(
            f"| {name} | {loop:.4f} | "
            + " | ".join(cells)
            + f" | {best['json'] / args.repeats:.4f} | {same} |"
        )


if __name__ == "__main__":
    main()
