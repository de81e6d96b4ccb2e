"""The project's imports read from the source (AST), function-level imports included: what importing
a module at run time would miss. Used by test_architecture.py for the layer contracts and cycles."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of engine/ and app/ by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file, relative ones resolved;
    `from X import a` yields X and X.a (a may be a submodule). TYPE_CHECKING-only imports are skipped:
    they never run."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    top = {id(n) for n in tree.body} | {id(n) for n in tree.body for n in ast.walk(n)
                                         if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        at_top = id(node) in top and id(node) not in functions
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, at_top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, is_package)
            found.append((base, node.lineno, at_top))
            found += [(f"{base}.{a.name}", node.lineno, at_top) for a in node.names if a.name != "*"]
    return found


def violations(source_prefixes: tuple[str, ...], forbidden: tuple[str, ...],
               exempt: tuple[str, ...] = ()) -> list[str]:
    """"file:line imports X" for every module under `source_prefixes` importing a module under
    `forbidden` (anywhere in the file, inside functions too)."""
    def under(mod: str, prefixes) -> bool:
        return any(mod == p or mod.startswith(p + ".") for p in prefixes)

    out = []
    for name, path in project_modules().items():
        if not under(name, source_prefixes) or under(name, exempt):
            continue
        for imported, line, _ in imports_of(name, path):
            if under(imported, forbidden):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return sorted(set(out))


def cycles(prefix: str, module_level_only: bool = False) -> list[list[str]]:
    """Import cycles among the modules under `prefix` (strongly connected components of size > 1)."""
    modules = {n: p for n, p in project_modules().items() if n == prefix or n.startswith(prefix + ".")}
    graph: dict[str, set[str]] = {n: set() for n in modules}
    for name, path in modules.items():
        for imported, _, at_top in imports_of(name, path):
            if module_level_only and not at_top:
                continue
            # importing a.b.c runs the __init__ of a.b first: an edge to every enclosing package too
            parts = imported.split(".")
            for target in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):
                # a module reaching its own enclosing package is Python's normal package import
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return _strongly_connected(graph)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
