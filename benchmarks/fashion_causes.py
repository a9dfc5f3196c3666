"""Why is CE at 4 bits more robust here than in the MCEL paper? Two candidate causes on the fashion
preset's setting (VGG3, 4-bit weights, Fashion-MNIST, seed 0, pattern seeds 100.., 20 patterns):

* BatchNorm: VGG3 without BatchNorm (``model_kwargs={"batchnorm": False}``);
* training budget: 20 epochs instead of the preset's 5.

Each variant is trained like the preset's CE / MCEL rows otherwise (Adam 1e-3, batch 128, per-tensor
symmetric codes) and meets the same error patterns. Resumable. Prints one markdown row per variant.

    python benchmarks/fashion_causes.py --out runs/fashion-causes --data-dir DIR
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

BERS = (0.0, 1e-2, 2e-2)
VARIANTS = {  # name: (loss, epochs, batchnorm)
    "ce-nobn": ("ce", 5, False),
    "mcel-nobn": ("mcel", 5, False),
    "ce-20ep": ("ce", 20, True),
    "mcel-20ep": ("mcel", 20, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--patterns", type=int, default=20)
    args = ap.parse_args()
    preset = PRESETS["fashion"]
    data = load_dataset(preset.dataset, data_dir=args.data_dir)
    device = str(resolve_device("auto"))
    rows = []
    print(f"| variant | clean | {' | '.join(f'{b:g}' for b in BERS[1:])} | device |")
    print("|---|---|" + "---|" * (len(BERS) - 1) + "---|")
    for name in args.variants.split(","):
        loss, epochs, bn = VARIANTS[name]
        cfg = TrainConfig(
            dataset=preset.dataset, model=preset.model, bits=4, epochs=epochs, batch_size=preset.batch_size,
            lr=preset.lr, seed=0, device="auto", data_dir=args.data_dir, loss=loss,
            model_kwargs={} if bn else {"batchnorm": False},
        )  # fmt: skip
        s = train_and_stress(
            cfg, data, args.out / name, bers=BERS, repeats=args.patterns, error_model=error_model_for(),
            base_seed=PATTERN_BASE_SEED, device=device,
        )  # fmt: skip
        res = s.campaign["results"]
        cells = [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in res if r["ber"] > 0]
        clean = 100 * s.campaign["clean_accuracy"]
        print(f"| {name} | {clean:.2f} | {' | '.join(cells)} | {device} |", flush=True)
        rows.append({"variant": name, "clean": clean / 100, "results": res, "device": device})
    (args.out / "causes.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
