"""The house's rules (docs/architecture.md), checked on the source: sizes a reader can hold, and no import circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpmkit"
MODULES = sorted(SRC.rglob("*.py"))
# argument-parser builders are long lists of flags, one per line: the rule leaves them out
PARSER_BUILDERS = ("add_", "build_parser")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_class_or_function_too_long_to_read():
    too_long = []
    for path in MODULES:
        source = path.read_text()
        if len(source.splitlines()) > 450:
            too_long.append(f"{module_name(path)}: {len(source.splitlines())} lines (at most about 450)")
        for node in ast.walk(ast.parse(source)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and length > 250:
                too_long.append(f"{module_name(path)}.{node.name}: class of {length} lines (at most about 250)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > 60 \
                    and not node.name.startswith(PARSER_BUILDERS):
                too_long.append(f"{module_name(path)}.{node.name}: function of {length} lines (at most about 60)")
    assert not too_long, "\n".join(too_long)


def imports(path: Path, src: Path, names: set[str], module_level_only: bool) -> set[str]:
    """The modules of the tree at `src` (`names`) that `path` imports (at module level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    own = module_name(path, src)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ddpmkit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")
                base = ".".join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
            if not base.startswith("ddpmkit"):
                continue
            for alias in node.names:  # `from ddpmkit import runs` imports the module ddpmkit.runs
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in names else base)
    return found


def import_circles(src: Path, module_level_only: bool) -> list[str]:
    """Every import circle among the modules under `src` ("a -> b -> a"); a package's __init__ importing its own
    modules is not one."""
    modules = sorted(src.rglob("*.py"))
    names = {module_name(p, src) for p in modules}
    graph = {}
    for path in modules:
        name = module_name(path, src)
        graph[name] = {m for m in imports(path, src, names, module_level_only)
                       if m in names and m != name and not (path.name == "__init__.py" and m.startswith(name + "."))}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "with-lazy-imports"])
def test_no_import_circle(module_level_only):
    """Module-level imports must form no circle; imports inside functions may go upward, but not in a circle either."""
    cycles = import_circles(SRC, module_level_only)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_circle_finder_finds_a_circle(tmp_path):
    """Two modules that import each other are a circle."""
    src = tmp_path / "ddpmkit"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("from ddpmkit import b\n")
    (src / "b.py").write_text("from ddpmkit.a import thing\n")
    assert import_circles(src, module_level_only=True) == ["ddpmkit.a -> ddpmkit.b -> ddpmkit.a"]


def missing_library_names(scripts: list[Path]) -> list[str]:
    """`from ddpmkit.X import name` in each script whose name X does not have (neither attribute nor submodule)."""
    import importlib

    missing = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ddpmkit":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if hasattr(module, alias.name):
                        continue
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    return missing


def test_benchmark_scripts_import_names_the_library_has(tmp_path):
    """The benchmarks (the GPU session's among them) run outside the test suite: a name moved by a redesign must not
    leave them importing what is gone. The check also finds a planted one."""
    assert missing_library_names(sorted((SRC.parents[1] / "benchmarks").glob("*.py"))) == []
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from ddpmkit.sampling import predicted_x0_gone\n")
    assert missing_library_names([planted]) == ["planted.py:2: ddpmkit.sampling.predicted_x0_gone"]
