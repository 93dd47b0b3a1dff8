"""The source tree keeps its shape: layers import downward only, no cycles, and no
folder of the repository stands in for an installed package of the same name.

The import graph is read from the source with `ast` (function-level imports too),
so a lazy import cannot hide a cycle. Importing a module also runs its parent
packages' __init__; like import-linter, the graph leaves those implicit edges out.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"compiler": "fxopt", "passes": "fxopt.passes", "kernels": "fxopt.kernels", "bench": "fxopt.bench"}

# Each part of fxopt may import only parts of a lower rank (and itself): the public
# surface (the modules at the top of compiler/) sits on the concerns, the concerns on
# core, core on the kernels. Parts of one rank are independent of each other.
RANKS = {
    "fxopt.kernels": 0,
    "fxopt.core": 1,
    "fxopt.quant": 2, "fxopt.pruning": 2,
    "fxopt.runtime": 3,
    "fxopt.report": 4, "fxopt.artifact": 4, "fxopt.passes": 4,
    "fxopt.driver": 5,
    "fxopt.search": 6,
    "fxopt": 7,            # compiler/*.py: __init__, api, cli, demo, examples
    "fxopt.bench": 8,
}
TOP_MODULES_MAX = 12


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement reaches: `import a.b` gives a.b;
    `from a import b, c` gives a.b and a.c where those are modules, else a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> nx.DiGraph:
    """Modules of fxopt and the fxopt modules each imports; node attribute `outside`:
    the top-level names of everything else it imports."""
    sources = _sources()
    graph = nx.DiGraph()
    for module, path in sources.items():
        graph.add_node(module, outside=set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            *names, base = _imports(node, module, path.name == "__init__.py")
            if isinstance(node, ast.Import):
                names.append(base)
            targets = [n for n in names if n in sources] or ([base] if base in sources else [])
            graph.add_edges_from((module, t) for t in targets if t != module)
            if not getattr(node, "level", 0) and not base.startswith("fxopt"):
                graph.nodes[module]["outside"].add(base.split(".")[0])
    return graph


def part_of(module: str) -> str:
    """The part (a key of RANKS) a module belongs to: its longest matching prefix."""
    return max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)


def test_no_import_cycles():
    graph = import_graph()
    tangles = [graph.subgraph(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    cycles = [" -> ".join([a for a, _ in nx.find_cycle(t)] + [nx.find_cycle(t)[0][0]]) for t in tangles]
    assert not cycles, "import cycles (move the shared part down a layer), one per tangle:\n" + "\n".join(cycles)


def test_imports_point_down_the_layers():
    upward = [f"{a} ({part_of(a)}, rank {RANKS[part_of(a)]}) imports {b} ({part_of(b)}, rank {RANKS[part_of(b)]})"
              for a, b in import_graph().edges
              if part_of(a) != part_of(b) and RANKS[part_of(b)] >= RANKS[part_of(a)]]
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


def test_every_module_has_a_part():
    assert all(part_of(m) in RANKS for m in _sources())
    subpackages = {p.parent.name for p in (ROOT / "compiler").glob("*/__init__.py")}
    assert {f"fxopt.{s}" for s in subpackages} <= set(RANKS), "give the new subpackage a rank in RANKS"


def test_kernels_use_no_torch_and_passes_no_pass():
    graph = import_graph()
    for module in graph:
        if part_of(module) == "fxopt.kernels":
            assert "torch" not in graph.nodes[module]["outside"], f"{module} imports torch"
    between_passes = [(a, b) for a, b in graph.edges if a.startswith("fxopt.passes.") and b.startswith("fxopt.passes.")]
    assert not between_passes, f"a pass imports another pass: {between_passes}"


def test_compiler_top_is_small_and_subpackages_say_what_they_own():
    top = sorted(p.name for p in (ROOT / "compiler").glob("*.py"))
    assert len(top) <= TOP_MODULES_MAX, f"{len(top)} modules at the top of compiler/: {top}"
    for init in (ROOT / "compiler").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(ROOT)} needs a docstring saying what it owns"
        assert not [n for n in tree.body if not isinstance(n, ast.Expr)], \
            f"{init.relative_to(ROOT)} should hold only its docstring (import modules by their own name)"


def test_only_compiler_is_a_regular_package():
    # A folder with an __init__.py on sys.path (the repository root is, under `python -m`)
    # outranks installed packages of the same name; a namespace portion never does.
    for folder in ("passes", "kernels", "bench"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow installed `{folder}`"


def test_installed_fxopt_is_this_checkout():
    """Every source file imports as its fxopt module from this checkout. A strict editable
    install links each file once: a module added since needs `pip install -e .` again."""
    stale = []
    for module, path in _sources().items():
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec and spec.origin else None
        if origin is None or Path(origin).resolve() != path.resolve():
            stale.append(f"{module}: {origin}")
    assert not stale, ("fxopt as installed is not this checkout; run `pip install -e .` here again:\n"
                       + "\n".join(stale))


def _run_at_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_repository_root_shadows_no_installed_package():
    pytest.importorskip("transformers")
    code = ("import transformers as T; T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, intermediate_size=64)); import os, kernels; print(os.path.dirname(kernels.__file__))")
    done = _run_at_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() != ROOT / "kernels", "the repository's kernels/ was imported"
    done = _run_at_root("-c", "import compiler; print(compiler.__file__)")
    if done.returncode == 0:     # an installed package named compiler
        assert not Path(done.stdout.strip()).resolve().is_relative_to(ROOT), done.stdout
    else:
        assert "ModuleNotFoundError: No module named 'compiler'" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_pytest_collects_from_the_repository_root():
    done = _run_at_root("-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert " tests collected" in done.stdout or "tests collected" in done.stdout
