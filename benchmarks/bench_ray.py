"""Benchmark of campaigns on Ray workers: 2 local workers against a sequential run of the same campaign.

Campaign: VGG3 with 4-bit weights (random init: speed does not depend on training) on synthetic
28x28 inputs (``--n`` samples, batch 500), BERs 1e-3 and 1e-2, ``--repeats`` patterns each. Runs:

* sequential, 1 torch thread (one core: the baseline of "2 workers on 2 cores");
* sequential, ``--threads`` torch threads (the default of a plain ``qmargin evaluate`` on this box);
* ``workers=2``, cold: qmargin starts a local Ray, runs, shuts it down (what ``--workers 2`` costs);
* ``workers=2``, warm: Ray already running (the cells alone, plus sending model and data).

Every run's result must equal the sequential one value for value (checked). Then Ray's overhead on a
tiny campaign (digits MLP, 3 BERs x 4 patterns, well under a second sequentially), reported as it is.
Wall times are whole campaigns (freeze, fingerprint, clean pass and JSON writes included).

    python benchmarks/bench_ray.py                 # the table in BENCHMARKS.md (about 4 minutes)
    python benchmarks/bench_ray.py --quick         # a smaller campaign, to try it
    python benchmarks/bench_ray.py --write-md      # also replace the "## Ray workers" section
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import qmargin
from qmargin.models import build_model
from qmargin.quant import QuantSpec, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine_description, write_section  # noqa: E402

SECTION = "## Ray workers"


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, dict]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "timing"}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uptime unavailable"


def _tiny() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    quantize_model(m, QuantSpec(4))
    return m, (torch.tensor(x[1400:] / 16.0, dtype=torch.float32), torch.tensor(y[1400:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="test samples (default 2000; --quick 500)")
    ap.add_argument("--repeats", type=int, default=None, help="patterns per BER (default 10; --quick 4)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write-md", action="store_true")
    args = ap.parse_args()
    n = args.n or (500 if args.quick else 2000)
    repeats = args.repeats or (4 if args.quick else 10)
    bers = [1e-3, 1e-2]
    load_before = _uptime()

    torch.manual_seed(0)
    model = build_model("vgg3", input_shape=(1, 28, 28), num_classes=10, spec=QuantSpec(4))
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    camp = {"bers": bers, "repeats": repeats, "base_seed": 100, "batch_size": 500}
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        t_seq1, ref = _timed(qmargin.stress, model, data, out=Path(tmp) / "s1.json", **camp)
        rows.append(("sequential, 1 thread", t_seq1, "baseline"))
        torch.set_num_threads(args.threads)
        t_seqn, res = _timed(qmargin.stress, model, data, out=Path(tmp) / "sn.json", **camp)
        rows.append((f"sequential, {args.threads} threads", t_seqn, str(_strip(res) == _strip(ref))))
        torch.set_num_threads(1)
        t_cold, res = _timed(qmargin.stress, model, data, out=Path(tmp) / "rc.json", workers=2, **camp)
        rows.append(("2 Ray workers, cold (starts and stops Ray)", t_cold, str(_strip(res) == _strip(ref))))
        import ray

        t_init, _ = _timed(
            ray.init,
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        t_warm, res = _timed(qmargin.stress, model, data, out=Path(tmp) / "rw.json", workers=2, **camp)
        rows.append(("2 Ray workers, warm (Ray running)", t_warm, str(_strip(res) == _strip(ref))))

        tiny_model, tiny_data = _tiny()
        tiny = {"bers": [0.0, 0.01, 0.05], "repeats": 4, "base_seed": 0}
        t_tiny_seq, tiny_ref = _timed(qmargin.stress, tiny_model, tiny_data, **tiny)
        t_tiny_warm, res = _timed(qmargin.stress, tiny_model, tiny_data, workers=2, **tiny)
        tiny_ok = _strip(res) == _strip(tiny_ref)
        ray.shutdown()
        t_tiny_cold, res = _timed(qmargin.stress, tiny_model, tiny_data, workers=2, **tiny)
        tiny_ok = tiny_ok and _strip(res) == _strip(tiny_ref)
    load_after = _uptime()

    cells = len(bers) * repeats
    lines = [
        SECTION,
        "",
        f"`qmargin.stress(..., workers=2)` against the same campaign run sequentially: VGG3, 4-bit weights "
        f"(random init), synthetic 28x28 inputs, N = {n}, batch 500, BERs {bers}, {repeats} patterns each "
        f"({cells} cells, each a full pass); whole campaigns timed (freeze, fingerprint, clean pass, JSON "
        "after every cell). Workers are one Ray actor per worker, one thread each, each holding the "
        "model and data once.",
        "",
        f"Machine: {machine_description()}; Ray {ray.__version__}. Load: before `{load_before}`; after "
        f"`{load_after}` (the 2 CPUs are shared with other jobs).",
        "",
        "```",
        "python benchmarks/bench_ray.py --write-md",
        "```",
        "",
        "| run | wall s | vs sequential, 1 thread | vs sequential, "
        f"{args.threads} threads | result equals sequential |",
        "|---|---:|---:|---:|---|",
    ]
    for name, t, same in rows:
        lines.append(f"| {name} | {t:.1f} | {t_seq1 / t:.2f}x | {t_seqn / t:.2f}x | {same} |")
    lines += [
        "",
        f"Ray's overhead on a tiny campaign (digits MLP 64-32-10, 4 bit, N = 397, 12 cells): sequential "
        f"{t_tiny_seq:.2f} s; 2 workers with Ray running {t_tiny_warm:.2f} s; 2 workers starting Ray "
        f"{t_tiny_cold:.2f} s (a bare `ray.init` took {t_init:.1f} s here). Results identical: {tiny_ok}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_md:
        write_section(text, Path(__file__).resolve().parents[1] / "BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
