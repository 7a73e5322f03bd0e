"""The architecture holds: one-way layers, no import cycles, small modules, no copies.

The layers are import-linter contracts in ``pyproject.toml`` (see ``docs/architecture.rst``);
this module runs them, and checks what a contract cannot say.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

import zproc

PACKAGE = Path(zproc.__file__).parent
ROOT = PACKAGE.parent
MAX_LINES = 800
RUN = 6  # lines: a run this long may not stand twice


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_the_layer_contracts_hold() -> None:
    # in a process of its own: import-linter reconfigures logging (it disables the
    # loggers that exist, zproc's among them)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, "
         "no_cache=True))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def _layers() -> list[grimp.Layer]:
    """The layers contract of pyproject.toml, top first."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["id"] == "layers")
    return [
        grimp.Layer(*(name.strip() for name in layer.split(":")), independent=False)
        for layer in contract["layers"]
    ]


def test_an_import_that_goes_up_breaks_the_layers() -> None:
    """The contract is not vacuous: one upward arrow (a core importing the API) is found."""
    graph = grimp.build_graph("zproc")
    assert not graph.find_illegal_dependencies_for_layers(layers=_layers(), containers={"zproc"})
    graph.add_import(importer="zproc._store", imported="zproc.state")
    illegal = graph.find_illegal_dependencies_for_layers(layers=_layers(), containers={"zproc"})
    assert {(d.importer, d.imported) for d in illegal} == {("zproc._store", "zproc.state")}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """Every import in zproc, those inside functions included (grimp reads them all)."""
    return grimp.build_graph("zproc", exclude_type_checking_imports=False)


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith("zproc") and graph.chain_exists(imported, importer):
                back = graph.find_shortest_chain(imported, importer)
                cycles.append(f"{importer} -> {' -> '.join(back or ())}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_zproc_import_inside_a_function() -> None:
    """A function-local import must not stand in for a module-level one (optional
    third-party dependencies are imported lazily, each with a comment saying so)."""
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for stmt in tree.body:  # module-level "if TYPE_CHECKING:" blocks count as top
            if isinstance(stmt, ast.If):
                top.update(map(id, stmt.body))
        for node in ast.walk(tree):
            if id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom) and (node.level or 0) > 0:
                found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zproc"):
                found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(
                alias.name.startswith("zproc") for alias in node.names
            ):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"zproc imports inside functions or classes: {found}"


def test_no_module_is_over_800_lines() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in _modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code or prose: blank lines,
    lone brackets and import statements (declarations, not code) left out."""
    text = path.read_text()
    imports = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if len(stripped) > 3 and number not in imports:
            lines.append((number, stripped))
    return lines


def test_no_run_of_six_lines_stands_twice() -> None:
    seen: dict[bytes, tuple[str, int, int]] = {}
    repeats = []
    for path in _modules():
        lines = _code_lines(path)
        for i in range(len(lines) - RUN + 1):
            window = lines[i : i + RUN]
            key = hashlib.sha1("\n".join(text for _, text in window).encode()).digest()
            here = (path.name, window[0][0], window[-1][0])
            first = seen.setdefault(key, here)
            if first[0] != here[0] or first[2] < here[1]:
                where = f"{path.name}:{here[1]}-{here[2]}"
                repeats.append(f"{first[0]}:{first[1]}-{first[2]} ~ {where}")
    assert not repeats, "repeated runs of 6 lines:\n" + "\n".join(repeats)
