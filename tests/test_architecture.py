"""The layering of docs/architecture.md, checked on the source: who imports whom, where I/O may live."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qmargin"

# package -> packages of qmargin it may import (docs/architecture.md)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "quant": set(),
    "faults": {"quant", "errors"},
    "deq": {"quant", "faults", "errors"},
    "losses": {"errors"},
    "data": {"errors"},
    "models": {"quant", "deq", "errors"},
    "training": {"losses", "faults", "quant", "models", "data", "errors"},
    "experiments": {"training", "losses", "faults", "quant", "models", "data", "deq", "report", "errors"},
    "report": {"errors"},
    "cli": {
        "experiments",
        "training",
        "losses",
        "faults",
        "quant",
        "models",
        "data",
        "deq",
        "report",
        "errors",
    },
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qmargin."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qmargin."):
                    out.add(a.name.split(".")[1])
    return out


FILES = sorted(p for p in SRC.rglob("*.py") if _package_of(p) in ALLOWED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_layering(path):
    pkg = _package_of(path)
    bad = {m for m in _imports(path) if m != pkg and m not in ALLOWED[pkg]}
    assert not bad, f"{path.relative_to(SRC)} ({pkg}) imports {sorted(bad)}"


def test_nothing_imports_cli_and_torch_load_only_in_importers():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        text = path.read_text()
        if rel.parts[0] != "cli" and rel.name != "__main__.py":  # `python -m qmargin` is the entry point
            assert "cli" not in _imports(path), rel
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = f"{getattr(node.func.value, 'id', '?')}.{node.func.attr}"
                assert name not in ("pickle.load", "pickle.loads"), rel
                if name == "torch.load":
                    assert str(rel) == "deq/importers.py", rel
                    kw = {k.arg: k.value for k in node.keywords}
                    assert (
                        isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    )


def test_no_printing_outside_cli_and_report():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("cli", "report") or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"print() in {rel}"
