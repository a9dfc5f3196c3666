"""The command line: one-line errors with exit status 2, and fast end-to-end runs on digits."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from qmargin.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmargin", *args], capture_output=True, text=True, timeout=300
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qmargin: error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_demo_help():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    assert "--ber" in proc.stdout and "--repeats" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "--bogus"], "--bogus"),
        (["demo", "--ber", "0,2"], "[0.0, 1.0]"),
        (["demo", "--ber", "-0.1"], "--ber"),
        (["demo", "--ber", "x"], "not a number"),
        (["evaluate", "runs/does-not-exist", "--ber", "0,0.5"], "does-not-exist"),
        (["evaluate", "runs/x", "--ber", "1.5"], "--ber"),
        (["train", "--out", "x", "--dataset", "imagenet"], "imagenet"),
        (["train", "--out", "x", "--bits", "9"], "bits"),
        (["train", "--out", "x", "--loss", "focal"], "loss"),
        (["certify", "missing.pt"], "missing.pt"),
        (["certify", "missing.pt", "--bits", "3,x"], "--bits"),
        (["certify", "missing.pt", "--bits", "0"], "--bits"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle):
    _one_line_error(run_cli(*args), needle)


def test_in_process_main_returns_2_on_user_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--ber", "0,3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_certify_rejects_pickles_that_are_not_state_dicts(tmp_path):
    class NotAStateDict:
        pass

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": NotAStateDict.__name__, "obj": print}, f)  # arbitrary callable: refused
    _one_line_error(run_cli("certify", str(evil)), "evil.pt")
    plain = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], plain)
    _one_line_error(run_cli("certify", str(plain)), "list.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01garbage")
    _one_line_error(run_cli("certify", str(corrupt)), "corrupt.pt")


def test_train_evaluate_compare_end_to_end_on_digits(tmp_path):
    runs = tmp_path / "runs"
    for loss in ("ce", "mcel"):
        proc = run_cli(
            "train",
            "--dataset",
            "digits",
            "--model",
            "mlp",
            "--bits",
            "4",
            "--loss",
            loss,
            "--epochs",
            "2",
            "--seed",
            "0",
            "--out",
            str(runs / loss),
            "--quiet",
            "--device",
            "cpu",
        )
        assert proc.returncode == 0, proc.stderr
        assert "test accuracy" in proc.stdout
        assert (runs / loss / "model.safetensors").is_file()
        assert (runs / loss / "integer.safetensors").is_file()
        proc = run_cli(
            "evaluate",
            str(runs / loss),
            "--ber",
            "0,0.01,0.05",
            "--repeats",
            "3",
            "--seed",
            "100",
            "--quiet",
            "--device",
            "cpu",
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads((runs / loss / "ber.json").read_text())
        assert [r["ber"] for r in result["results"]] == [0.0, 0.01, 0.05]
        for r in result["results"]:
            assert len(r["accuracies"]) == 3
            assert all(0.0 <= a <= 1.0 for a in r["accuracies"])
            assert r["min"] <= r["mean"] <= r["max"]
        assert result["results"][0]["accuracies"] == [result["clean_accuracy"]] * 3
        assert result["config"]["loss"] == loss
        assert (runs / loss / "ber.csv").is_file() and (runs / loss / "ber.png").is_file()
    proc = run_cli("compare", str(runs / "ce"), str(runs / "mcel"), "--out", str(tmp_path / "cmp.png"))
    assert proc.returncode == 0, proc.stderr
    assert "ce" in proc.stdout and "mcel" in proc.stdout
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run is not retrained
    proc = run_cli(
        "train",
        "--dataset",
        "digits",
        "--bits",
        "4",
        "--loss",
        "ce",
        "--epochs",
        "2",
        "--out",
        str(runs / "ce"),
        "--quiet",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0 and "already trained" in proc.stdout


def test_mondeq_train_certify_evaluate_through_cli(tmp_path):
    run = tmp_path / "mon"
    proc = run_cli(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mondeq",
        "--bits",
        "32",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--out",
        str(run),
        "--quiet",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "certify",
        str(run),
        "--bits",
        "3,4,8",
        "--per-channel",
        "--out",
        str(tmp_path / "c.json"),
        "--ber",
        "0.001",
        "--patterns",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    cert = json.loads((tmp_path / "c.json").read_text())
    assert [r["bits"] for r in cert["results"]] == [3, 4, 8]
    for r in cert["results"]:
        for key in (
            "margin",
            "margin_quantized",
            "delta_w_norm",
            "delta_u_norm",
            "delta_b_norm",
            "certified",
            "monotone",
            "kappa",
            "pr_rate",
            "fb_rate",
        ):
            assert key in r
        assert r["certified"] == (r["delta_w_norm"] < r["margin"])
        assert 0.0 <= r["ber_certified_share"] <= r["ber_monotone_share"] <= 1.0
    # a float MonDEQ has no stored codes: it is quantized post-training (8 bits unless --bits) first
    proc = run_cli("evaluate", str(run), "--ber", "0,0.01", "--repeats", "2", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "post-training quantization to 8-bit" in proc.stdout and "did not converge" in proc.stdout
    result = json.loads((run / "ber.json").read_text())
    assert result["config"]["ptq_bits"] == 8 and all("failures" in r for r in result["results"])
    run3 = tmp_path / "mon3"
    proc = run_cli(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mondeq",
        "--bits",
        "3",
        "--per-channel",
        "--certify",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--out",
        str(run3),
        "--quiet",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", str(run3), "--ber", "0,0.01", "--repeats", "2", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    _one_line_error(run_cli("evaluate", str(run3), "--ber", "0.01", "--bits", "4"), "stored codes")
    result = json.loads((run3 / "ber.json").read_text())
    assert all("failures" in r for r in result["results"])


@pytest.mark.parametrize("fmt", ["reference2020", "companion2026"])
def test_certify_imported_state_dicts(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    n, d, r, c = 12, 6, 4, 3
    if fmt == "reference2020":
        p = "mon.linear_module."
        sd = {
            f"{p}U.weight": torch.randn(n, d, generator=g),
            f"{p}U.bias": torch.randn(n, generator=g),
            f"{p}A.weight": 0.1 * torch.randn(r, n, generator=g),
            f"{p}B.weight": 0.1 * torch.randn(n, n, generator=g),
            "Wout.weight": torch.randn(c, n, generator=g),
            "Wout.bias": torch.randn(c, generator=g),
        }
        extra = ["--m", "0.5"]
    else:
        sd = {
            "mon.core.A": 0.1 * torch.randn(r, n, generator=g),
            "mon.core.S": 0.1 * torch.randn(n, n, generator=g),
            "mon.core.m_raw": torch.tensor(0.0),
            "mon.core.U": torch.randn(n, d, generator=g),
            "mon.core.b": torch.randn(n, generator=g),
            "classifier.weight": torch.randn(c, n, generator=g),
            "classifier.bias": torch.randn(c, generator=g),
        }
        extra = []
    path = tmp_path / f"{fmt}.pt"
    torch.save(sd, path)
    out = tmp_path / "cert.json"
    proc = run_cli("certify", str(path), "--bits", "4,8", "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    cert = json.loads(out.read_text())
    assert cert["format"] == "imported state dict" and [r["bits"] for r in cert["results"]] == [4, 8]
    m = 0.5 if fmt == "reference2020" else float(torch.nn.functional.softplus(torch.tensor(0.0))) + 1e-4
    # W = (1-m)I - A^T A + B - B^T has margin mu = m + lambda_min(A^T A) = m here (r < n: A^T A is singular)
    assert cert["results"][0]["margin"] == pytest.approx(m, abs=1e-5)


def test_evaluate_patterns_per_pass_gives_the_loop_numbers(tmp_path):
    run = tmp_path / "ce"
    assert (
        run_cli(
            "train",
            "--dataset",
            "digits",
            "--bits",
            "4",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--quiet",
            "--device",
            "cpu",
        ).returncode
        == 0
    )
    outs = []
    for k in ("1", "4"):
        out = tmp_path / f"k{k}.json"
        proc = run_cli(
            "evaluate",
            str(run),
            "--ber",
            "0.01,0.05",
            "--repeats",
            "4",
            "--patterns-per-pass",
            k,
            "--out",
            str(out),
            "--quiet",
            "--no-plot",
            "--device",
            "cpu",
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(out.read_text())["results"])
    assert [r["accuracies"] for r in outs[0]] == [r["accuracies"] for r in outs[1]]


def test_help_loads_neither_torch_nor_matplotlib():
    """``qmargin --help`` stays fast: the commands import experiments/report (torch, matplotlib) lazily."""
    code = (
        "import sys\n"
        "from qmargin.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules)\n"
        "print('heavy=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "heavy="


def test_evaluate_seed_default_is_the_experiments_pattern_seed():
    import inspect

    from qmargin.cli.app import evaluate
    from qmargin.experiments.runs import PATTERN_BASE_SEED

    assert inspect.signature(evaluate).parameters["seed"].default == PATTERN_BASE_SEED


def test_datasets_lists_the_registry(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "1x8x8" in out and "cifar10" in out and "3x32x32" in out
