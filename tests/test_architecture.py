"""The layering of docs/architecture.md, checked on the source: who imports whom, where I/O may live.

The allowed imports are read from the table in docs/architecture.md (its last column), so the doc and
this test cannot drift apart; the rules the doc states in words are checked on top of the table.
Every ``import`` statement counts, also those inside functions.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qmargin"
DOC = ROOT / "docs" / "architecture.md"

# Imported by every package (they import nothing of qmargin): the doc says so under the table.
# "" is the top-level package `qmargin` itself (its __version__).
BASE = {"errors", "files", "stats", ""}

# The one importer of `cli` the doc names: `python -m qmargin`.
ENTRY_POINT = "__main__"


def _doc_table() -> dict[str, set[str]]:
    """package -> packages it may import, from the doc's table."""
    table: dict[str, set[str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `qmargin\.(\w+)` \|.*\| ([^|]*) \|$", line)
        if m:
            table[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return table


ALLOWED = _doc_table()


# -- the module graph -----------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imported(path: Path) -> Iterator[tuple[str, int]]:
    """Every qmargin module ``path`` imports (``from pkg import submodule`` names the submodule), with
    the line; module-level and function-level imports alike."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "qmargin" and not mod.startswith("qmargin."):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub if sub in MODULES else mod), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "qmargin" or alias.name.startswith("qmargin."):
                    yield alias.name, node.lineno


GRAPH = {m: {t for t, _ in _imported(p)} - {m} for m, p in MODULES.items()}


def _package(module: str) -> str:
    """``qmargin.deq.solvers`` -> ``deq``; ``qmargin.files`` -> ``files``; ``qmargin`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_imports(pkg: str) -> dict[str, list[str]]:
    """Other packages imported by the modules of ``pkg``: package -> ``["module:line", ...]``."""
    out: dict[str, list[str]] = {}
    for m, p in MODULES.items():
        if _package(m) != pkg:
            continue
        for target, line in _imported(p):
            q = _package(target)
            if q != pkg:
                out.setdefault(q, []).append(f"{m}:{line}")
    return out


# -- the table ------------------------------------------------------------------------------------


def test_doc_table_lists_every_package():
    packages = {_package(m) for m in MODULES} - BASE - {ENTRY_POINT}
    assert set(ALLOWED) - {"errors", "files", "stats"} == packages
    assert ALLOWED["errors"] == set() and ALLOWED["files"] == set() and ALLOWED["stats"] == set()
    for pkg, allowed in ALLOWED.items():
        assert allowed <= set(ALLOWED), f"{pkg}: the doc allows unknown packages {allowed - set(ALLOWED)}"


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_layering(pkg):
    """Each package imports only what its row of the table allows (plus errors, files, qmargin)."""
    if pkg in ("errors", "files"):
        bad = _package_imports(pkg)  # the base modules import nothing of qmargin
    else:
        bad = {q: w for q, w in _package_imports(pkg).items() if q not in ALLOWED[pkg] | BASE}
    assert not bad, f"qmargin.{pkg} imports {bad}, which docs/architecture.md does not allow"


def test_the_rules_the_doc_states_in_words():
    """The table itself keeps the intended shape (a loosened table fails here)."""
    assert ALLOWED["cli"] == {"experiments", "report"}
    assert "cli" not in set().union(*ALLOWED.values())
    assert "experiments" not in ALLOWED["report"] and ALLOWED["report"] == set()
    for low in ("faults", "deq"):
        assert not ALLOWED[low] & {"training", "experiments", "cli", "report", "data", "models"}, low
    assert ALLOWED["quant"] == set() and ALLOWED["losses"] == set() and ALLOWED["data"] == set()
    # the package graph of the table has no cycle: a strict order of layers exists
    order: list[str] = []
    pending = dict(ALLOWED)
    while pending:
        ready = [p for p, deps in pending.items() if deps <= set(order)]
        assert ready, f"cycle among packages in the doc's table: {sorted(pending)}"
        order += ready
        for p in ready:
            del pending[p]


def test_entry_point_is_the_only_importer_of_cli():
    for m, p in MODULES.items():
        if _package(m) in ("cli", ENTRY_POINT):
            continue
        assert not any(_package(t) == "cli" for t, _ in _imported(p)), m
    assert {_package(t) for t in GRAPH[f"qmargin.{ENTRY_POINT}"]} == {"cli"}


def test_report_never_imports_experiments_and_cli_never_training_or_data():
    for pkg, banned in (
        ("report", {"experiments", "training", "cli"}),
        ("cli", {"training", "data", "models", "deq", "faults", "quant", "losses"}),
        ("faults", {"training", "experiments", "cli"}),
        ("deq", {"training", "experiments", "cli"}),
        ("data", {"training", "experiments", "cli", "models", "losses", "faults", "quant", "deq", "report"}),
        ("experiments", {"cli"}),
    ):
        bad = {q: w for q, w in _package_imports(pkg).items() if q in banned}
        assert not bad, f"qmargin.{pkg} imports {bad}"


# -- cycles ---------------------------------------------------------------------------------------


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_detection_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_cycles_between_packages():
    packages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        packages.setdefault(_package(m), set()).update(_package(t) for t in targets)
    for p, deps in packages.items():
        deps.discard(p)
    assert _cycles(packages) == []


# -- where I/O and unsafe loading may live --------------------------------------------------------


def test_nothing_imports_cli_and_torch_load_only_in_weights():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        text = path.read_text()
        if rel.parts[0] != "cli" and rel.name != "__main__.py":  # `python -m qmargin` is the entry point
            assert not any(_package(t) == "cli" for t, _ in _imported(path)), rel
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = f"{getattr(node.func.value, 'id', '?')}.{node.func.attr}"
                assert name not in ("pickle.load", "pickle.loads"), rel
                if name == "torch.load":
                    assert str(rel) == "weights.py", rel
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


def test_atomic_writes_only_through_qmargin_files():
    """One atomic-write helper: ``os.replace`` / ``Path.replace`` of files appear in qmargin/files.py only."""
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if str(rel) == "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", None)
                if node.func.attr in ("replace", "rename") and owner == "os":
                    raise AssertionError(f"os.{node.func.attr} in {rel}: use qmargin.files")
                if node.func.attr in ("mkstemp", "NamedTemporaryFile") and owner == "tempfile":
                    raise AssertionError(f"tempfile.{node.func.attr} in {rel}: use qmargin.files")
