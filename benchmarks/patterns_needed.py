"""Patterns needed for the same confidence: fixed 50 patterns vs sequential stopping vs nested patterns.

Models: the mnist5k MLP and VGG3, 4-bit weights, CE, trained here (seed 0); the campaign runs on the
1,000 mnist5k test images. For each model and BER:

* **fixed 50** (the baseline, ``--repeats 50``): the half-width ``h50`` of the 95% CI of the mean
  accuracy that 50 patterns give;
* **sequential stopping** (``--ci-halfwidth H``, minimum 5 patterns, cap 200): the patterns it uses
  and the half-width it reaches, for a common target ``H`` (default 0.5 points), and for the target
  ``h50`` of each BER (the *same interval* as fixed 50);
* **nested patterns** (``--nested``, the same stopping rule): nesting couples the BERs of one seed;
  each BER's law is unchanged, so it is not expected to change the patterns a BER needs.

A stopped campaign is, by construction, the prefix of the fixed campaign with the same seeds
(``qmargin.engine.stopping``), so the stopping arms are computed from one 200-pattern campaign per
arm; one real ``ci_halfwidth`` campaign per model checks that its per-BER counts are exactly those.
Wall times: a real fixed-50 campaign and the real stopped campaign (the loaded machine makes them
indicative only).

    OMP_NUM_THREADS=1 python benchmarks/patterns_needed.py [--write-md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qmargin.data import load_dataset
from qmargin.engine import stress
from qmargin.engine.stopping import StoppingRule
from qmargin.experiments.evaluate import error_model_for
from qmargin.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine_description, write_section  # noqa: E402

SECTION = "## Patterns needed: fixed 50 vs sequential stopping"
BERS = (0.001, 0.005, 0.01, 0.02, 0.05)
CAP = 200
FIXED = 50


def trained(model: str, epochs: int, root: Path) -> torch.nn.Module:
    cfg = TrainConfig(dataset="mnist5k", model=model, bits=4, loss="ce", epochs=epochs, seed=0, device="cpu")
    return train(cfg, out_dir=root / model).model.eval()


def arm(
    values: list[list[float]], rule: StoppingRule, targets: list[float] | None = None
) -> list[dict[str, Any]]:
    """Per BER: the stop point of ``rule`` (or of a per-BER target) on the prefix of ``values``."""
    out = []
    for i, vals in enumerate(values):
        r = rule if targets is None else StoppingRule(targets[i], rule.min_patterns)
        n = r.stop_point(vals, len(vals))
        assert n is not None
        hw = r.halfwidth_of(vals[:n])
        out.append({"n": n, "hw": hw, "met": hw is not None and hw <= r.halfwidth})
    return out


def run_model(
    name: str, model: torch.nn.Module, data: Any, target: float, cap: int, n_test: int, check_real: bool
) -> dict[str, Any]:
    x, y = data.x_test[:n_test], data.y_test[:n_test]
    kw: dict[str, Any] = {"bers": list(BERS), "base_seed": 0, "batch_size": 500}
    t0 = time.perf_counter()
    plain = stress(model, (x, y), repeats=cap, **kw)
    t_cap = time.perf_counter() - t0
    nested = stress(model, (x, y), repeats=cap, error_model=error_model_for(nested_bers=list(BERS)), **kw)
    vals = [e["accuracies"] for e in plain["results"]]
    nvals = [e["accuracies"] for e in nested["results"]]
    rule = StoppingRule(target)
    fixed = [{"n": FIXED, "hw": rule.halfwidth_of(v[:FIXED])} for v in vals]
    h50 = [f["hw"] for f in fixed]
    stop_h = arm(vals, rule)
    stop_same = arm(vals, rule, targets=h50)
    nested_h = arm(nvals, rule)
    t_stop = t_fixed = None
    if check_real:  # the real stopped campaign equals the offline stop points (it is a prefix)
        t0 = time.perf_counter()
        real = stress(model, (x, y), repeats=cap, ci_halfwidth=target, **kw)
        t_stop = time.perf_counter() - t0
        assert [len(e["accuracies"]) for e in real["results"]] == [s["n"] for s in stop_h], "offline != real"
        t0 = time.perf_counter()
        stress(model, (x, y), repeats=FIXED, **kw)
        t_fixed = time.perf_counter() - t0
    return {
        "name": name,
        "cap": cap,
        "n_test": int(x.shape[0]),
        "clean": plain["clean_accuracy"],
        "means": [e["mean"] for e in plain["results"]],
        "fixed": fixed,
        "stop_h": stop_h,
        "stop_same": stop_same,
        "nested_h": nested_h,
        "seconds": {"fixed50": t_fixed, "stopped": t_stop, "cap_run": t_cap},
        "checked_real": check_real,
    }


def section(results: list[dict[str, Any]], target: float, argv: list[str]) -> str:
    pts = 100 * target
    lines = [
        SECTION,
        "",
        f"Fixed {FIXED} patterns per BER (the baseline) against sequential stopping (`--ci-halfwidth`, "
        "minimum 5 patterns, capped) and nested patterns with the same rule, on the mnist5k MLP and "
        "VGG3 (4-bit weights, CE, seed 0; " + ", ".join(
            f"{r['name']}: {r['n_test']} test images, cap {r['cap']}" for r in results
        ) + "). Half-widths are of the 95% Student-t CI of the mean accuracy, in points. A stopped "
        "campaign is the prefix of the fixed one with the same seeds, so the stopping columns come "
        "from one capped campaign per arm; a real `ci_halfwidth` campaign reproduced the per-BER "
        "counts exactly (asserted) where the timing columns are filled.",
        "",
        f"Machine: {machine_description()}.",
        "",
        "```",
        ("OMP_NUM_THREADS=1 python benchmarks/patterns_needed.py " + " ".join(argv)).strip(),
        "```",
        "",
        f"| model | BER | mean acc (%) | fixed {FIXED}: half-width "
        f"| stopping at {pts:g} pt: patterns (half-width) "
        f"| stopping at the fixed-{FIXED} half-width: patterns | nested, stopping at {pts:g} pt: patterns |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for i, ber in enumerate(BERS):
            f, s, same, nest = r["fixed"][i], r["stop_h"][i], r["stop_same"][i], r["nested_h"][i]
            cap = "" if s["met"] else " (cap)"
            ncap = "" if nest["met"] else " (cap)"
            lines.append(
                f"| {r['name']} | {ber:g} | {100 * r['means'][i]:.2f} | {100 * f['hw']:.2f} | "
                f"{s['n']}{cap} ({100 * s['hw']:.2f}) | {same['n']} | {nest['n']}{ncap} |"
            )
        tot_fixed = FIXED * len(BERS)
        tot_same = sum(x["n"] for x in r["stop_same"])
        tot_h = sum(x["n"] for x in r["stop_h"])
        sec = r["seconds"]
        t_fixed = "" if sec["fixed50"] is None else f", {sec['fixed50']:.1f} s"
        t_stop = "" if sec["stopped"] is None else f", {sec['stopped']:.1f} s"
        lines.append(
            f"| {r['name']} | **all** | clean {100 * r['clean']:.2f} | {tot_fixed} patterns{t_fixed} | "
            f"{tot_h} patterns{t_stop} | **{tot_same} ({tot_fixed / tot_same:.2f}x fewer)** | "
            f"{sum(x['n'] for x in r['nested_h'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="common CI half-width, points")
    ap.add_argument("--mlp-epochs", type=int, default=10)
    ap.add_argument("--vgg-epochs", type=int, default=4)
    ap.add_argument("--vgg-cap", type=int, default=100, help="VGG3: cap (and patterns of each arm)")
    ap.add_argument("--vgg-test", type=int, default=500, help="VGG3: test images (CPU time)")
    ap.add_argument("--write-md", action="store_true")
    args = ap.parse_args()
    argv = [a for a in sys.argv[1:] if a != "--write-md"]
    torch.set_num_threads(1)
    data = load_dataset("mnist5k")
    target = args.target / 100.0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, epochs, cap, n_test, check in (
            ("mlp", args.mlp_epochs, CAP, 1000, True),
            ("vgg3", args.vgg_epochs, args.vgg_cap, args.vgg_test, False),
        ):
            t0 = time.perf_counter()
            model = trained(name, epochs, Path(tmp))
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            results.append(run_model(name, model, data, target, cap, n_test, check))
            print(section(results, target, argv), flush=True)
    text = section(results, target, argv)
    if args.write_md:
        write_section(text, Path(__file__).resolve().parents[1] / "BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
