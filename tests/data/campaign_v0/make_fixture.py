"""How the schema-less (pre-engine) campaign fixtures in this folder were made.

Run once on main at commit f4ed90d (before ``qmargin.engine`` existed), from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/data/campaign_v0/make_fixture.py

It writes ``mlp.safetensors`` (the float state dict of a 4-bit MLP trained briefly on sklearn digits),
``plain.json`` (3 BERs x 4 patterns, base seed 11), ``plain_partial.json`` (the same campaign stopped
after 6 patterns) and ``flagged.json`` (the same model wrapped so that
it reports ``converged`` flags: failures counted, 2 BERs x 3 patterns, batch size 50).
``tests/test_engine_compat.py`` loads them with the new engine, reproduces their accuracies and
resumes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qmargin.experiments import run_ber_campaign
from qmargin.quant import QuantSpec, quantize_model

HERE = Path(__file__).parent
THRESHOLD = 6.0


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    return xt[:1400], yt[:1400], xt[1400:], yt[1400:]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantize_model(model, QuantSpec(4))
    return model


class Flagged(nn.Module):
    """Reports ``converged``: False where the logit range is at most ``threshold``."""

    def __init__(self, inner: nn.Module, threshold: float) -> None:
        super().__init__()
        self.inner = inner
        self.threshold = threshold
        self.converged: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        self.converged = (z.max(1).values - z.min(1).values) > self.threshold
        return z


def main() -> None:
    xtr, ytr, xte, yte = digits()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / "mlp.safetensors"))
    run_ber_campaign(
        model,
        xte,
        yte,
        bers=[0.0, 0.02, 0.1],
        repeats=4,
        base_seed=11,
        batch_size=128,
        out_path=HERE / "plain.json",
        config={"fixture": "plain"},
    )

    class Stop(Exception):  # noqa: N818
        pass

    def stop_after_6(progress: object) -> None:
        if getattr(progress, "done", 0) == 6:
            raise Stop

    try:  # noqa: SIM105  (the same campaign stopped after 6 of its 12 patterns: status "partial")
        run_ber_campaign(
            model,
            xte,
            yte,
            bers=[0.0, 0.02, 0.1],
            repeats=4,
            base_seed=11,
            batch_size=128,
            out_path=HERE / "plain_partial.json",
            config={"fixture": "plain"},
            progress=stop_after_6,
        )
    except Stop:
        pass
    run_ber_campaign(
        Flagged(model, THRESHOLD),
        xte,
        yte,
        bers=[0.0, 0.05],
        repeats=3,
        base_seed=3,
        batch_size=50,
        out_path=HERE / "flagged.json",
        config={"fixture": "flagged"},
    )


if __name__ == "__main__":
    main()
