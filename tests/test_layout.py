"""The package's layout contract (docs/architecture.md): no import cycles, the GPU route without the playground,
no function over about 100 lines, docstrings that cite what a reader can open."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moalign"
REPO = SRC.parents[1]
MAX_FUNCTION_LINES = 100


def _module(path: Path) -> str:
    return "moalign." + str(path.relative_to(SRC).with_suffix("")).replace("/", ".").removesuffix(".__init__")


def _module_level_imports(path: Path) -> set[str]:
    """moalign modules imported when `path` is imported (module-level statements, TYPE_CHECKING blocks aside)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moalign"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moalign")}
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first walk meets (empty: the graph is acyclic)."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    graph = {_module(p): _module_level_imports(p) for p in SRC.rglob("*.py")}
    assert len(graph) > 40 and "moalign.stage2" in graph
    assert find_cycles(graph) == []
    # the check can fail: the cycle this layout removed (base model -> checkpoint -> config -> base model)
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# what `moalign stage2`, `latents`, `targets`, `precompute` and `generate` import on a GPU machine
GPU_ROUTE = ("moalign.stage2", "moalign.teacher", "moalign.latents", "moalign.precompute", "moalign.generate")


def _loaded_modules(modules: tuple[str, ...]) -> list[str]:
    code = (
        f"import json, sys\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_gpu_route_does_not_import_the_playground():
    loaded = _loaded_modules(GPU_ROUTE)
    assert "moalign.stage2" in loaded and "moalign.run.training" in loaded
    assert [m for m in loaded if m.startswith("moalign.playground")] == []
    assert "moalign.presets" not in loaded  # presets are for the entry points (the CLI, the demo)
    # the check can fail: the demo does import the playground
    assert "moalign.playground.basemodel" in _loaded_modules(("moalign.playground.demo",))


def _long_functions(path: Path, limit: int) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_over_100_lines():
    long = [f for p in sorted(SRC.rglob("*.py")) for f in _long_functions(p, MAX_FUNCTION_LINES)]
    assert long == []
    assert _long_functions(SRC / "stage2.py", 20)  # the scan sees functions (it can fail)


@pytest.mark.parametrize("pattern", [r"\bSPEC\b", r"\.\./shared"])
def test_docstrings_cite_what_a_reader_can_open(pattern):
    hits = [
        f"{p.relative_to(SRC)}:{i}"
        for p in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert hits == []


def test_docs_named_in_the_code_exist():
    """Every `docs/NAME.md` the package or pyproject names is in the repository."""
    texts = [p.read_text() for p in SRC.rglob("*.py")] + [(REPO / "pyproject.toml").read_text()]
    named = sorted({m for t in texts for m in re.findall(r"docs/[\w-]+\.md", t)})
    assert named, "the code names no docs at all: the scan is broken"
    assert [n for n in named if not (REPO / n).is_file()] == []
