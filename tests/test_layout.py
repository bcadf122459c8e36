"""The package's shape: tiers import only downwards, no import cycle, short units, kernels in real source files."""
import ast
import re
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "visionmamba"
CSRC = PACKAGE / "ops" / "scan" / "csrc"
DEPLOY_CSRC = PACKAGE / "deploy" / "csrc"

# Tier of each top-level name of the package; a module may import its own tier and the ones below.
TIERS = {"version": 0, "files": 0, "messages": 0, "ops": 1, "models": 2, "data": 3, "train": 4, "deploy": 5, "tools": 6,
         "cli": 7, "__main__": 8}
MAX_FUNCTION_LINES = 60
MAX_CPP_PARAMETERS = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, top_level_only: bool = False) -> Set[str]:
    """The package modules a file imports (anywhere in it, or at module level only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "visionmamba"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "visionmamba":
            assert node.level == 0, f"{path}: relative import (the package uses absolute imports)"
            found |= {f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module for a in node.names}
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def tier(module: str) -> int:
    parts = module.split(".")
    return TIERS[parts[1]] if len(parts) > 1 else 99  # the package root sits above everything


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "visionmamba"))
def test_imports_go_only_downwards(module):
    """ops < models < data < train < deploy < tools < cli; ops imports nothing else of the package; nobody imports
    the root; deploy imports the ops and the models, never data or training."""
    mine = tier(module)
    for target in imports_of(MODULES[module]):
        assert target != "visionmamba", f"{module} imports the package root"
        assert tier(target) <= mine, f"{module} (tier {mine}) imports {target} (tier {tier(target)})"
        if module.startswith("visionmamba.ops"):
            assert target.startswith("visionmamba.ops"), f"{module} imports {target}: ops imports only ops"
        if module.startswith("visionmamba.deploy"):
            assert not target.startswith(("visionmamba.data", "visionmamba.train")), f"{module} imports {target}"


def test_no_import_cycle():
    graph: Dict[str, Set[str]] = {m: {t for t in imports_of(p, top_level_only=True) if t in MODULES} for m, p in MODULES.items()}
    state: Dict[str, int] = {}

    def visit(node: str, path: list) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 and nxt != node and not node.startswith(nxt + "."):  # a package importing its own module is fine
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_functions_are_short():
    long = []
    for module, path in MODULES.items():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES and not _is_triton_kernel(fn):
                long.append(f"{module}.{fn.name}: {lines} lines")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_no_cpp_in_python_strings():
    for module, path in MODULES.items():
        text = path.read_text()
        assert "#include" not in text and "PYBIND11_MODULE" not in text, f"{module} holds C++ source"


def _cpp_signatures(text: str):
    """(name, parameters) of every function definition (a name, a parameter list without parentheses, a body)."""
    text = re.sub(r"//[^\n]*", "", text)
    for match in re.finditer(r"\b(\w+)\s*\(([^;{}()]*)\)\s*(?:const\s*)?\{", text):
        name, params = match.group(1), match.group(2).strip()
        if name in {"if", "for", "while", "switch", "catch", "return", "sizeof"}:
            continue
        depth, count = 0, 1 if params else 0
        for ch in params:
            depth += ch == "<"
            depth -= ch == ">"
            count += ch == "," and depth == 0
        yield name, count


def test_cpp_kernels_are_source_files_with_short_parameter_lists():
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")) + sorted(DEPLOY_CSRC.glob("*.cpp"))
    assert {p.name for p in sources} >= {"bindings.cpp", "selective_scan.h", "scan_math.h"}
    too_long = [f"{p.name}:{name} ({n})" for p in sources for name, n in _cpp_signatures(p.read_text()) if n > MAX_CPP_PARAMETERS]
    assert not too_long, "C++ functions with more than 8 parameters: " + ", ".join(too_long)
    bindings = (CSRC / "bindings.cpp").read_text()
    assert bindings.count("PYBIND11_MODULE") == 1 and sum(p.read_text().count("PYBIND11_MODULE") for p in sources) == 1


def test_kernel_sources_ship_as_package_data():
    """Every file the CPU builds (PyTorch's and the runtimes') compile, and the vendored header's licence, is
    matched by pyproject.toml's package-data (they are built at first use)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    from visionmamba.deploy import runtime_kernels
    from visionmamba.ops.scan import cpu

    for package, folder, compiled in (
        ("visionmamba.ops.scan", CSRC, {*cpu.SOURCES, *cpu.HEADERS, *runtime_kernels.KERNEL_HEADERS}),
        ("visionmamba.deploy", DEPLOY_CSRC, {name for r in runtime_kernels.RUNTIMES for name in (r.source, *r.headers)}
         | {"third_party/onnxruntime/README.md"}),
    ):
        needed = [f"csrc/{name}" for name in sorted(compiled)]
        assert needed == sorted(f"csrc/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*") if p.is_file())
        assert all(any(fnmatch.fnmatch(name, pattern) for pattern in data[package]) for name in needed)
