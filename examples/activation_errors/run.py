"""Weight errors only, activation errors only, both: a trained run on its test set.

    python examples/activation_errors/run.py RUN_DIR [--act-bits 8] [--bers 1e-3,1e-2] [--patterns 5]

Activation quantizers on the outputs of every quantized layer, calibrated (min/max) on 1,000
training images; batch size 250 (activation errors are seeded per batch: results depend on it).
Pattern r uses seed r for both kinds of errors (their streams differ). Prints mean accuracy and the
95% CI over patterns (qmargin.stats.mean_confidence_interval).

The same as a resumable, paired campaign (JSON + CSV, workers, shards):
``qmargin evaluate RUN_DIR --act-bits 8 [--act-ber P | --act-ber-follows | --act-only]`` (README).
"""

from __future__ import annotations

import argparse

import torch

from qmargin.data import load_dataset
from qmargin.faults import BitErrorModel, inject
from qmargin.faults.activations import inject_activations
from qmargin.quant import QuantSpec
from qmargin.quant.activations import ActivationQuantizers
from qmargin.stats import mean_confidence_interval
from qmargin.training.checkpoint import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--bers", default="1e-3,1e-2")
    ap.add_argument("--patterns", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=250)
    a = ap.parse_args()
    model, config, _ = load_run(a.run)
    model.eval()
    data = load_dataset(config.dataset)
    x_cal = data.x_train[:1000]
    x, y = data.x_test, data.y_test
    q = ActivationQuantizers(model, QuantSpec(a.act_bits))
    q.calibrate(x_cal.split(a.batch_size))

    def accuracy() -> float:
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in x.split(a.batch_size)])
        return float((pred == y).float().mean())

    print(f"clean, {a.act_bits}-bit activations: {accuracy():.4f}")
    for ber in (float(b) for b in a.bers.split(",")):
        em = BitErrorModel(ber=ber)
        for label in ("weights", "activations", "both"):
            accs = []
            for r in range(a.patterns):
                w_em = em if label != "activations" else BitErrorModel(ber=0.0)
                a_em = em if label != "weights" else BitErrorModel(ber=0.0)
                with inject(model, w_em, seed=r), inject_activations(q, a_em, r):
                    accs.append(accuracy())
            mean = sum(accs) / len(accs)
            std = (sum((v - mean) ** 2 for v in accs) / len(accs)) ** 0.5
            ci = mean_confidence_interval(mean, std, len(accs))
            assert ci is not None
            print(f"BER {ber:g}  {label:11s} mean {mean:.4f}  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]")


if __name__ == "__main__":
    main()
