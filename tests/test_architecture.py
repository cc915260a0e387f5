"""The package layout's rules (docs/architecture.md), drawn from the imports of the source.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Layer of each sub-package of regrad_cli (docs/architecture.md): a module may import its own layer
# and those below, never one above; packages that share a layer never import each other.
LAYERS = {"lm": 1, "learner": 2, "workspace": 3, "offline": 4, "online": 4, "learning": 5, "cli": 6, "api": 6}
# Top-level modules of regrad_cli that are not the foundation (layer 0) but the entry point.
ENTRY = {"regrad_cli.__main__"}
# The one import allowed against the layers: the package's lazy ``__getattr__`` that makes
# ``from regrad_cli import Regrad`` work (the public Python API, regrad_cli.api), imported only
# when that name is asked for.
FACADE = {("regrad_cli", "regrad_cli.api")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules(root: Path = REPO) -> dict[str, Path]:
    """{dotted name: file} of every module of regrad_cli and bank_format under ``root``."""
    return {module_name(p, root): p for pkg in ("regrad_cli", "bank_format")
            for p in sorted((root / pkg).rglob("*.py"))}


def imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every regrad_cli/bank_format import in ``path``.

    ``from pkg import sub`` where ``sub`` is a module counts as importing ``pkg.sub``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None, node.lineno) if sub in modules else (target, a.name, node.lineno))
    return [f for f in found if f[0].split(".")[0] in ("regrad_cli", "bank_format")]


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to: itself for a package's __init__, else its parent."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def layer_of(module: str) -> tuple[str, int] | None:
    """(sub-package, layer) of a regrad_cli module; None for bank_format (below everything)."""
    parts = module.split(".")
    if parts[0] != "regrad_cli":
        return None
    if module in ENTRY:
        return "cli", LAYERS["cli"]
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    return "foundation", 0


def owner(target: str, modules: dict[str, Path]) -> str | None:
    """The module an import target names (a module, or the longest module prefix of it)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def violations(root: Path = REPO) -> list[str]:
    """Every import that breaks a rule of docs/architecture.md, as 'file:line: what'."""
    modules = source_modules(root)
    out = []
    for name, path in modules.items():
        where = f"{path.relative_to(root)}"
        mine = layer_of(name)
        for target, imported, line in imports(path, name, modules):
            tmod = owner(target, modules)
            if tmod is None:
                out.append(f"{where}:{line}: imports {target}, which does not exist")
                continue
            if (name, tmod) in FACADE:
                continue
            theirs = layer_of(tmod)
            if name.startswith("bank_format") and tmod.startswith("regrad_cli"):
                out.append(f"{where}:{line}: bank_format imports {tmod}")
            if mine and theirs:
                if theirs[1] > mine[1]:
                    out.append(f"{where}:{line}: {mine[0]} (layer {mine[1]}) imports {tmod} from above ({theirs[0]}, "
                               f"layer {theirs[1]})")
                elif theirs[1] == mine[1] and theirs[0] != mine[0]:
                    out.append(f"{where}:{line}: {mine[0]} imports {tmod} from {theirs[0]} (same layer)")
            private = [p for p in tmod.split(".") if p.startswith("_") and not p.startswith("__")]
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(imported)
            if private and package_of(tmod, modules) != package_of(name, modules):
                out.append(f"{where}:{line}: imports private {'.'.join(private)} of {tmod} from another package")
    return out


def graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = source_modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in imports(path, name, modules):
            tmod = owner(target, modules)
            if tmod and tmod != name and (name, tmod) not in FACADE:
                edges[name].add(tmod)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_module_sits_in_a_known_package():
    top = {p.name for p in (REPO / "regrad_cli").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == set(LAYERS)


def test_imports_follow_the_layers():
    assert violations() == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_benchmarks_use_public_names():
    """Benchmarks import no private name and reach no private attribute (``obj._x``) of regrad's
    objects: what they measure is the public API."""
    modules = source_modules()
    bad = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for target, imported, line in imports(path, "benchmarks." + path.stem, modules):
            tmod = owner(target, modules) or target
            if any(_private(p) for p in tmod.split(".")) or (imported and _private(imported)):
                bad.append(f"{path.name}:{line}: {tmod} {imported or ''}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert bad == []


@pytest.mark.parametrize("bad_import, rule", [
    ("from regrad_cli.online.query import QueryEngine", "from above"),
    ("from regrad_cli.offline.build import build_bank", "from above"),
    ("from regrad_cli.learner.lora import _key", "private"),
])
def test_a_forbidden_import_is_caught(tmp_path, bad_import, rule):
    """The checks fail on a scratch copy with one forbidden import added."""
    import shutil

    for pkg in ("regrad_cli", "bank_format"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("data", "__pycache__"))
    target = tmp_path / "regrad_cli" / "workspace" / "config.py"
    target.write_text(target.read_text(encoding="utf-8") + f"\n{bad_import}\n", encoding="utf-8")
    found = violations(tmp_path)
    assert any("workspace/config.py" in v and rule in v for v in found), found


def test_offline_and_online_never_meet_and_bank_format_stands_alone(tmp_path):
    import shutil

    for pkg in ("regrad_cli", "bank_format"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("data", "__pycache__"))
    (tmp_path / "regrad_cli" / "online" / "extra.py").write_text("from regrad_cli.offline import build\n")
    (tmp_path / "bank_format" / "extra.py").write_text("def f():\n    from regrad_cli.errors import RegradError\n")
    found = violations(tmp_path)
    assert any("online/extra.py" in v and "same layer" in v for v in found), found
    assert any("bank_format/extra.py" in v and "bank_format imports regrad_cli.errors" in v for v in found), found


def test_a_cycle_is_listed():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Functions allowed past MAX_FUNCTION_LINES, each with its reason (docs/architecture.md, "Long
# functions"). An entry that is no longer long is an error too: the list stays true.
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS = {
    "regrad_cli/cli/meta_train.py:meta_train_cmd": "43 lines of option declarations (one Annotated "
                                                   "typer.Option per MetaTrainConfig field); the body is a thin edge",
}


def long_functions(root: Path = REPO) -> dict[str, int]:
    """{'file:function': lines} of every function (or method) of regrad_cli and bank_format longer
    than MAX_FUNCTION_LINES, counted from its ``def`` to its last line."""
    out = {}
    for path in source_modules(root).values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{path.relative_to(root).as_posix()}:{node.name}"] = n
    return out


def test_no_function_is_longer_than_80_lines_except_the_named_ones():
    found = long_functions()
    assert {k: v for k, v in found.items() if k not in LONG_FUNCTIONS} == {}
    assert sorted(set(LONG_FUNCTIONS) - set(found)) == [], "no longer long: take it off LONG_FUNCTIONS"
