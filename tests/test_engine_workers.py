"""Campaigns on Ray workers (issue 8, part 1): the same result as a sequential run, value for value;
model and data reach each worker once; a worker killed with SIGKILL is restarted and its cells are
retried; a driver killed mid-run is resumed from the store; a sequential campaign never imports Ray;
data that cannot travel is refused in one line.

Ray starts once for the module with 2 CPUs (``ray_local``); the campaigns run on it (qmargin uses an
initialized Ray and leaves it running). The driver-kill test runs ``qmargin evaluate --workers 2`` as
a real process, which starts and owns its own local Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qmargin
from qmargin.cli import main
from qmargin.engine import Evaluation, run_campaign
from qmargin.engine.executors import RayExecutor, chunk_cells
from qmargin.engine.grid import Grid
from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec, quantize_model

BERS = [0.0, 0.02, 0.1]
REPEATS = 6  # 18 cells
SRC = Path(qmargin.__file__).resolve().parents[1]


def _no_timing(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "timing"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_and_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantize_model(m, QuantSpec(4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[:1400]), y[:1400]).backward()
        opt.step()
    return m, (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def sequential(model_and_data) -> dict:
    m, data = model_and_data
    return qmargin.stress(m, data, bers=BERS, repeats=REPEATS, base_seed=7)


def test_chunks_are_the_passes_of_a_sequential_run():
    grid = Grid.make(BERS, 5, 0)
    cells = [grid.cell(k, r) for k in range(3) for r in range(5) if (k, r) != (1, 1)]
    chunks = chunk_cells(cells, 2)
    assert [[(c.k, c.pattern) for c in ch] for ch in chunks] == [
        [(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4)],
        [(1, 0), (1, 2)], [(1, 3), (1, 4)],
        [(2, 0), (2, 1)], [(2, 2), (2, 3)], [(2, 4)],
    ]  # fmt: skip
    assert [len(ch) for ch in chunk_cells(cells, 1)] == [1] * len(cells)


def test_workers_give_the_sequential_result(ray_local, model_and_data, tmp_path):
    """Stacked passes (4 patterns per pass) on tensors, through an explicit executor whose workers
    report how often they fetched the model and data."""
    m, data = model_and_data
    camp = {"bers": BERS, "repeats": REPEATS, "base_seed": 7, "patterns_per_pass": 4}
    seq = run_campaign(m, Evaluation(data), out_path=tmp_path / "seq.json", **camp)
    executor = RayExecutor(workers=2)
    stats: list[dict] = []
    seen: list[int] = []

    def progress(p) -> None:
        seen.append(p.done)
        if p.done == p.total:
            stats.extend(executor.stats())

    par = run_campaign(
        m, Evaluation(data), out_path=tmp_path / "par.json", executor=executor, progress=progress, **camp
    )
    assert _no_timing(par) == _no_timing(seq)
    assert (tmp_path / "par.csv").read_text() == (tmp_path / "seq.csv").read_text()
    assert seen == list(range(1, 19))  # progress from the driver, once per cell
    assert [s["loads"] for s in stats] == [1, 1]  # model and data fetched once per worker
    # BER 0 cannot change a bit: its cells take the clean outcome on the driver; the other 2 BERs x
    # ceil(6 / 4) passes go to the workers, none twice
    assert sum(s["chunks"] for s in stats) == 2 * 2
    assert all(s["chunks"] >= 1 for s in stats)  # both workers evaluated cells


def test_stress_with_workers_on_a_dataloader(ray_local, model_and_data, sequential):
    """``qmargin.stress(..., workers=2)`` on streamed data (a DataLoader travels to the workers)."""
    m, (x, y) = model_and_data
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    kw = {"bers": BERS, "repeats": REPEATS, "base_seed": 7, "identity": "digits test"}
    par = qmargin.stress(m, loader, workers=2, **kw)
    assert _no_timing(par) == _no_timing(qmargin.stress(m, loader, **kw))
    assert par["results"] == sequential["results"]  # the same values as on (x, y) tensors
    assert ray_local.is_initialized()  # Ray was already running: qmargin left it running


def test_a_worker_killed_with_sigkill_is_restarted_and_its_cells_retried(
    ray_local, model_and_data, sequential, tmp_path
):
    m, data = model_and_data
    executor = RayExecutor(workers=2)
    killed: list[int] = []
    after: list[list[int]] = []

    def progress(p) -> None:
        if p.done == 1:
            pid = executor.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if p.done == p.total:
            after.append(executor.pids())

    res = run_campaign(
        m, Evaluation(data), bers=BERS, repeats=REPEATS, base_seed=7, out_path=tmp_path / "r.json",
        executor=executor, progress=progress,
    )  # fmt: skip
    assert killed and after
    assert killed[0] not in after[0]  # the actor was restarted in a new process
    assert res["status"] == "complete"
    assert _no_timing(res) == _no_timing(sequential)


SLOW_PY = '''
import time
from torch import nn


class Slow(nn.Module):
    """Paces a campaign (one pass takes a while) so that the test can kill it mid-run."""

    def forward(self, x):
        time.sleep(0.1)
        return x


def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Slow())
'''


def test_a_killed_driver_resumes_from_the_store(ray_local, model_and_data, tmp_path):
    """``qmargin evaluate --workers 2`` (its own local Ray) is killed with SIGKILL once three cells
    are saved; the rerun computes only the missing cells and gives the sequential result."""
    from safetensors.torch import save_file

    from qmargin.experiments.external import QuantOptions, evaluate_external

    _, (x, y) = model_and_data
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_PY))
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    torch.manual_seed(3)
    lin = nn.Linear(64, 10)
    save_file({"1.weight": lin.weight.detach().contiguous(), "1.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "w.safetensors"))  # fmt: skip
    spec, data = f"{tmp_path / 'slow.py'}:make", f"npz:{tmp_path / 'd.npz'}"
    common = ["evaluate", "--model", spec, "--weights", str(tmp_path / "w.safetensors"), "--data", data,
              "--ber", "0,0.05", "--repeats", "8", "--bits", "4", "--no-plot", "--quiet"]  # fmt: skip
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmargin", *common, "--workers", "2", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        saved = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                saved = len(json.loads(out.read_text())["results"][0]["accuracies"])
                saved += len(json.loads(out.read_text())["results"][1]["accuracies"])
            if saved >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
        _, err = proc.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the killed driver had started (its session)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert err.decode().strip() == ""  # Ray started quietly
    partial = json.loads(out.read_text())
    assert partial["status"] == "partial"
    stored = partial["timing"]["patterns_done"]
    assert 3 <= stored < 16

    calls: list = []
    resumed = evaluate_external(
        spec, data, bers=[0.0, 0.05], repeats=8, base_seed=100, out_path=out,
        weights=tmp_path / "w.safetensors", quant=QuantOptions(bits=4), batch_size=1024, device="cpu",
        progress=calls.append, workers=2,
    )  # fmt: skip
    assert len(calls) == 16 - stored  # only the missing cells were computed
    assert main([*common, "--out", str(tmp_path / "seq.json")]) == 0  # sequential, in this process
    assert _no_timing(resumed) == _no_timing(json.loads((tmp_path / "seq.json").read_text()))
    assert out.with_suffix(".csv").read_text() == (tmp_path / "seq.csv").read_text()


def test_ray_address_runs_on_an_existing_cluster(ray_local, model_and_data, tmp_path):
    """``qmargin evaluate --ray-address ADDR`` (a second driver on this module's Ray instance): the
    cells run there (one actor per CPU of the cluster), the result equals a sequential run's, and the
    cluster is left running."""
    _, (x, y) = model_and_data
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    (tmp_path / "m.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(64, 10))\n"
    )
    from safetensors.torch import save_file

    lin = nn.Linear(64, 10)
    save_file({"0.weight": lin.weight.detach().contiguous(), "0.bias": lin.bias.detach().contiguous()},
              str(tmp_path / "w.safetensors"))  # fmt: skip
    common = ["evaluate", "--model", f"{tmp_path / 'm.py'}:make", "--data", f"npz:{tmp_path / 'd.npz'}",
              "--weights", str(tmp_path / "w.safetensors"),
              "--ber", "0,0.05", "--repeats", "3", "--bits", "4", "--no-plot", "--quiet"]  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = ["--ray-address", address, "--out", str(tmp_path / "r.json")]
    run = subprocess.run(
        [sys.executable, "-m", "qmargin", *common, *out],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert main([*common, "--out", str(tmp_path / "seq.json")]) == 0
    got, seq = (json.loads((tmp_path / n).read_text()) for n in ("r.json", "seq.json"))
    assert _no_timing(got) == _no_timing(seq)
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2


def test_a_sequential_campaign_never_imports_ray(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        import qmargin
        from qmargin.quant import QuantSpec, quantize_model
        import qmargin.engine.executors
        m = nn.Sequential(nn.Linear(8, 4))
        quantize_model(m, QuantSpec(4))
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        qmargin.stress(m, (x, y), bers=[0.0, 0.1], repeats=2, shard=(1, 2))
        print("ray" in sys.modules, any(k.startswith("ray.") for k in sys.modules))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


class _Locked:
    """Batches behind a lock: an iterable that cannot be pickled."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.lock = threading.Lock()

    def __iter__(self):
        return iter(self.batches)


def test_data_that_cannot_travel_is_one_line(ray_local, model_and_data):
    m, (x, y) = model_and_data
    data = _Locked([(x[:200], y[:200]), (x[200:], y[200:])])
    with pytest.raises(ConfigError, match="cannot travel to the workers") as err:
        run_campaign(m, Evaluation(data), bers=[0.1], repeats=2, base_seed=0, workers=2)
    assert "\n" not in str(err.value) and "(x, y) tensors" in str(err.value)


def test_more_workers_than_cpus_and_a_gpu_device_are_refused(ray_local, model_and_data):
    m, data = model_and_data
    with pytest.raises(ConfigError, match="3 workers need 3 CPUs; the Ray cluster has 2"):
        run_campaign(m, Evaluation(data), bers=[0.1], repeats=2, base_seed=0, workers=3)
    ev = Evaluation(data)
    ev.device = torch.device("meta")  # any device but the CPU, without needing a GPU
    with pytest.raises(ConfigError, match="workers evaluate on CPU"):
        RayExecutor(workers=2).start(_job(m, ev))


def _job(model, evaluation):
    from qmargin.engine.executors import CellJob
    from qmargin.faults import BitErrorModel

    return CellJob(model, evaluation, BitErrorModel(ber=0.0), False)


@pytest.mark.parametrize(
    "flag, value", [("--workers", "0"), ("--workers", "-1"), ("--workers", "abc"), ("--workers", "1.5"),
                    ("--ray-address", ""), ("--ray-address", " ")]
)  # fmt: skip
def test_worker_flags_refuse_bad_values(flag, value, tmp_path, capsys):
    try:
        code = main(["evaluate", str(tmp_path), flag, value])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and flag in lines[0], err
