"""Layering checks anyone can run (`pytest tests/test_layering.py`; `lint-imports` checks the contract itself):

- the import-linter contract in pyproject.toml names every package and module of `tilemem`;
- no module-level import cycles (imports inside functions and under `TYPE_CHECKING` aside);
- `python -c "import tilemem"` loads no engine, speculative or runtime module from the planning layers
  (`placement`, `tmap`, `artifacts`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PLANNING = ("tilemem.placement", "tilemem.tmap", "tilemem.artifacts")
ABOVE_PLANNING = ("tilemem.engine", "tilemem.speculative", "tilemem.runtime")


def module_name(path: Path, src: Path) -> str:
    """Dotted module name of a file under `src`."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(source: str, module: str, is_package: bool, known: set[str], root: str) -> set[str]:
    """Modules of `root` that `module` imports when it is loaded: statements at module level, including
    those under `if`/`try` there, but not inside functions or classes, nor under `if TYPE_CHECKING`."""
    out: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, ast.If):
                if not _is_type_checking(st.test):
                    visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body + st.orelse + st.finalbody + [s for h in st.handlers for s in h.body])
            elif isinstance(st, ast.Import):
                out.update(a.name for a in st.names if a.name.split(".")[0] == root)
            elif isinstance(st, ast.ImportFrom):
                if st.level:
                    base = module.split(".")[: len(module.split(".")) - st.level + is_package]
                    name = ".".join(base + ([st.module] if st.module else []))
                else:
                    name = st.module or ""
                if name.split(".")[0] == root:
                    out.update(f"{name}.{a.name}" if f"{name}.{a.name}" in known else name for a in st.names)

    visit(ast.parse(source).body)
    return {m for m in out if m in known and m != module}


def import_graph(src: Path, root: str) -> dict[str, set[str]]:
    """module -> the modules it imports at module level, for every module of package `root` under `src`."""
    files = sorted((src / root).rglob("*.py"))
    known = {module_name(f, src) for f in files}
    return {
        module_name(f, src): module_level_imports(
            f.read_text(), module_name(f, src), f.name == "__init__.py", known, root
        )
        for f in files
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_module_level_cycle_and_ignores_function_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("from pkg.a import x\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("def f():\n    from pkg import d\n\nfrom . import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_module_level_import_cycles():
    assert cycles(import_graph(SRC, "tilemem")) == []


def test_contract_names_every_package_of_tilemem():
    """A new package or top-level module must get a place in the layer order."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    named = {m.strip() for layer in layers["layers"] for m in re.split(r"[|:]", layer)}
    present = {p.stem if p.suffix == ".py" else p.name for p in (SRC / "tilemem").iterdir()}
    present = {p for p in present if not p.startswith(("_", ".")) and p not in ("static", "data")}
    present = {p for p in present if (SRC / "tilemem" / p).is_dir() or (SRC / "tilemem" / f"{p}.py").is_file()}
    assert present - named == set(), "add these to [tool.importlinter] layers in pyproject.toml"
    assert named - present == set(), "the contract names packages that do not exist"


def loaded_by(importtime_log: str) -> dict[str, list[str]]:
    """module -> the chain of modules that were loading when it was first imported (outermost first),
    from the `python -X importtime` log (children are printed before their parent, indented deeper)."""
    rows = []
    for line in importtime_log.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$", line)
        if m:
            rows.append((len(m.group(1)), m.group(2)))
    chains: dict[str, list[str]] = {}
    for i, (depth, name) in enumerate(rows):
        chain, d = [], depth
        for deeper, parent in rows[i + 1 :]:
            if deeper < d:
                chain.append(parent)
                d = deeper
        chains[name] = chain[::-1]
    return chains


def test_import_tilemem_loads_no_engine_module_from_the_planning_layers():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tilemem"], capture_output=True, text=True, check=True
    )
    chains = loaded_by(out.stderr)
    assert any(m.startswith(PLANNING) for m in chains) and any(m.startswith(ABOVE_PLANNING) for m in chains)
    offenders = {
        m: chain
        for m, chain in chains.items()
        if m.startswith(ABOVE_PLANNING) and any(c.startswith(PLANNING) for c in chain)
    }
    assert offenders == {}


def test_importtime_chains_name_the_importer():
    log = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:        1 |          1 |     tilemem.engine.llm",
            "import time:        1 |          2 |   tilemem.placement.plan",
            "import time:        1 |          3 | tilemem",
        ]
    )
    assert loaded_by(log)["tilemem.engine.llm"] == ["tilemem", "tilemem.placement.plan"]
