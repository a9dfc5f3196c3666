"""examples/own_model runs as the README shows it, and prints the README's numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(after: str) -> list[str]:
    """The console lines the README shows after the line ``after`` (up to the closing fence)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after) + len(after)
    return text[start : text.index("```", start)].strip().splitlines()


def test_python_api_example_prints_the_readme_output(tmp_path):
    folder = tmp_path / "own_model"
    shutil.copytree(ROOT / "examples" / "own_model", folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prep = subprocess.run(
        [sys.executable, "prepare.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert prep.returncode == 0, prep.stderr
    assert re.fullmatch(r"float test accuracy 0\.\d{4}", prep.stdout.strip())
    run = subprocess.run(
        [sys.executable, "stress.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    got = run.stdout.strip().splitlines()
    shown = _readme_block("$ cd examples/own_model && python stress.py\n")
    number = re.compile(r"\d+\.\d+")
    assert [number.sub("#", line) for line in got] == [number.sub("#", line) for line in shown]
    for a, b in zip(got, shown, strict=True):  # the same numbers, up to float noise of another CPU
        for x, y in zip(number.findall(a), number.findall(b), strict=True):
            assert abs(float(x) - float(y)) <= 0.005, (a, b)
