"""(T, M) of MCEL on the fashion preset's setting (issue 9): VGG3, 4-bit weights, Fashion-MNIST.

Trains MCEL with each ``(bound T, margin M)`` exactly as ``--preset fashion`` trains its MCEL row
(5 epochs, Adam 1e-3, batch 128, per-tensor symmetric codes, seed 0) and runs the same paired campaign
(pattern seeds 100.., 20 patterns at each BER), so every variant meets the same error patterns as the
preset's models. Resumable (a finished run is reused). Prints one markdown row per variant.

    python benchmarks/fashion_tm.py --out runs/fashion-tm --variants 30:30,100:30,100:60
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qmargin.data import load_dataset
from qmargin.experiments.evaluate import error_model_for
from qmargin.experiments.mcel import PRESETS
from qmargin.experiments.runs import PATTERN_BASE_SEED, train_and_stress
from qmargin.training import TrainConfig
from qmargin.training.factory import resolve_device

BERS = (0.0, 5e-3, 1e-2, 2e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="30:30,100:30,100:60", help="T:M pairs, comma-separated")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--patterns", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=PRESETS["fashion"].epochs)
    args = ap.parse_args()
    preset = PRESETS["fashion"]
    data = load_dataset(preset.dataset, data_dir=args.data_dir)
    device = str(resolve_device("auto"))
    rows = []
    print(f"| T | M | clean | {' | '.join(f'{b:g}' for b in BERS[1:])} | device |")
    print("|---|---|---|" + "---|" * (len(BERS) - 1) + "---|")
    for item in args.variants.split(","):
        t, m = (float(v) for v in item.split(":"))
        cfg = TrainConfig(
            dataset=preset.dataset, model=preset.model, bits=4, epochs=args.epochs,
            batch_size=preset.batch_size, lr=preset.lr, seed=0, device="auto", data_dir=args.data_dir,
            loss="mcel", loss_kwargs={"bound": t, "margin": m},
        )  # fmt: skip
        s = train_and_stress(
            cfg, data, args.out / f"mcel-T{t:g}-M{m:g}", bers=BERS, repeats=args.patterns,
            error_model=error_model_for(), base_seed=PATTERN_BASE_SEED, device=device,
        )  # fmt: skip
        res = s.campaign["results"]
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in res if r["ber"] > 0]
        clean = 100 * s.campaign["clean_accuracy"]
        print(f"| {t:g} | {m:g} | {clean:.2f} | {' | '.join(cells)} | {device} |", flush=True)
        rows.append({"T": t, "M": m, "clean": s.campaign["clean_accuracy"], "results": res, "device": device})
    (args.out / "tm.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
