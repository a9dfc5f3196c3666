"""Nested vs independent bit-error patterns: spread of the paired difference between two models.

With nesting (``BitErrorModel(nested_max=max(grid))``) the bits one seed flips at a lower BER are a
subset of those it flips at a higher BER; without it (the baseline, the plain sampler) every BER of
the grid gets its own pattern. Both are exact in law at every BER; what differs is the correlation
*across* the grid. This measures what that does to the comparison campaigns are for: two models
(CE vs MCEL MLPs on ``digits``, trained here) see the same patterns per seed (paired), and the
quantity is their paired AUC difference

    D_s = AUC_A(s) - AUC_B(s),   AUC(s) = trapezoid of accuracy over log10(BER), divided by the span

over seeds ``s``. Reported: ``sd(D)`` with and without nesting, the variance ratio
``var_nested / var_plain`` with a seed bootstrap 95% CI, and the per-BER sd of the paired accuracy
difference (nesting cannot change those: each BER's law is the same).

    python benchmarks/nested_patterns.py                # 400 seeds, 2 and 4 bits
    python benchmarks/nested_patterns.py --seeds 40     # quicker
    python benchmarks/nested_patterns.py --write-md     # also BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from qmargin.data import load_dataset
from qmargin.faults import BitErrorModel, inject
from qmargin.quant import freeze_model
from qmargin.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine_description, write_section  # noqa: E402

GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
SECTION = "## Nested bit-error patterns"
LOSSES = ("ce", "mcel")


def trained(bits: int, loss: str, epochs: int, root: Path) -> torch.nn.Module:
    """An MLP on digits with ``bits``-bit weights trained with ``loss`` (seed 0)."""
    config = TrainConfig(
        dataset="digits", model="mlp", bits=bits, loss=loss, epochs=epochs, seed=0, device="cpu"
    )
    result = train(config, out_dir=root / f"{loss}_{bits}")
    model = result.model.eval()
    freeze_model(model)
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def curves(
    models: tuple[torch.nn.Module, torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: range,
    nested: bool,
) -> torch.Tensor:
    """``[seed, ber, model]`` accuracies; both models see the same pattern seed at every point."""
    template = BitErrorModel(nested_max=max(GRID) if nested else None)
    out = torch.empty(len(seeds), len(GRID), 2, dtype=torch.float64)
    for i, s in enumerate(seeds):
        for j, ber in enumerate(GRID):
            em = template.with_ber(ber)
            for k, m in enumerate(models):
                with inject(m, em, seed=s):
                    out[i, j, k] = accuracy(m, x, y)
    return out


def auc(acc: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over the grid in log10(BER) (trapezoid / span), along the last-but-one dim."""
    t = torch.tensor([math.log10(b) for b in GRID], dtype=torch.float64)
    return torch.trapezoid(acc, t, dim=-1) / (t[-1] - t[0])


def bootstrap_ratio(
    d_nested: torch.Tensor, d_plain: torch.Tensor, n: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile CI of ``var(d_nested) / var(d_plain)``, seeds resampled (jointly: same seeds)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d_nested.numel(), (n, d_nested.numel()), generator=g)
    ratio = d_nested[idx].var(dim=1) / d_plain[idx].var(dim=1)
    lo, hi = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--write-md", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    x, y = data.x_test.float(), data.y_test.long()
    seeds = range(1000, 1000 + args.seeds)
    lines = [
        SECTION,
        "",
        f"Command: `python benchmarks/nested_patterns.py --seeds {args.seeds} --bits {args.bits} "
        f"--epochs {args.epochs}`. Machine: {machine_description()}.",
        "",
        f"Two MLPs on `digits` ({len(y)} test samples), trained {args.epochs} epochs with CE and with MCEL "
        f"(seed 0), weights at b bits; BER grid {list(GRID)}; {args.seeds} pattern seeds, the same for both "
        "models (paired). D = AUC(CE) - AUC(MCEL), AUC = mean accuracy over log10(BER). Baseline: the "
        "plain sampler (an independent pattern per BER); nested: `nested_max = 0.1`. Ratio = "
        "var(D nested) / var(D plain), 95% CI from 4000 seed bootstraps.",
        "",
        "| bits | clean acc CE / MCEL | mean D plain | mean D nested | sd(D) plain | sd(D) nested | "
        "var ratio | 95% CI | per-BER sd ratio (min..max) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            models = tuple(trained(bits, loss, args.epochs, Path(tmp)) for loss in LOSSES)
            clean = [accuracy(m, x, y) for m in models]
            t0 = time.perf_counter()
            plain = curves(models, x, y, seeds, nested=False)  # type: ignore[arg-type]
            nested = curves(models, x, y, seeds, nested=True)  # type: ignore[arg-type]
            secs = time.perf_counter() - t0
            d_plain = auc(plain[..., 0]) - auc(plain[..., 1])
            d_nested = auc(nested[..., 0]) - auc(nested[..., 1])
            ratio = float(d_nested.var() / d_plain.var())
            lo, hi = bootstrap_ratio(d_nested, d_plain)
            sd_nested = (nested[..., 0] - nested[..., 1]).std(dim=0)
            per_ber = sd_nested / (plain[..., 0] - plain[..., 1]).std(dim=0)
            row = (
                f"| {bits} | {clean[0]:.3f} / {clean[1]:.3f} | {float(d_plain.mean()):+.4f} | "
                f"{float(d_nested.mean()):+.4f} | {float(d_plain.std()):.4f} | {float(d_nested.std()):.4f} | "
                f"{ratio:.2f} | {lo:.2f}-{hi:.2f} | {float(per_ber.min()):.2f}..{float(per_ber.max()):.2f} | "
                f"{secs:.0f} |"
            )
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_md:
        write_section(text, Path(__file__).resolve().parent.parent / "BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
