"""The package imports cleanly: no import cycle anywhere, every module importable on its own, the CLI light."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pairscout

ROOT = Path(pairscout.__file__).parent
MODULES = sorted({"pairscout", *(m.name for m in pkgutil.walk_packages([str(ROOT)], "pairscout."))} - {"pairscout.__main__", "pairscout.cli.__main__"})


def _module_imports(name: str) -> set[str]:
    """Modules of pairscout that ``name`` imports anywhere: module level, inside functions and classes, under
    ``TYPE_CHECKING`` (a lazy import hides a cycle from the interpreter, not from the design)."""
    path = ROOT.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    # a lazy package (PEP 562 ``__getattr__`` over an ``_EXPORTS`` table) imports its submodules on demand
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            found.update(f"{name}.{v.value}" for v in ast.walk(node.value) if isinstance(v, ast.Constant) and isinstance(v.value, str)
                         and f"{name}.{v.value}" in MODULES)  # fmt: skip
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {m: _module_imports(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "pairscout.cli" in graph and graph["pairscout.cli"] >= {"pairscout.cli.rank", "pairscout.cli.align", "pairscout.cli.data"}


def test_every_module_imports_on_its_own():
    # one fresh interpreter; before each module every pairscout module is dropped from sys.modules, so each
    # import starts from nothing of ours (third-party packages such as torch stay loaded: they are not ours)
    code = f"""
import importlib, json, sys, traceback
bad = {{}}
for name in {MODULES!r}:
    for k in [k for k in sys.modules if k == "pairscout" or k.startswith("pairscout.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception:
        bad[name] = traceback.format_exc(limit=3)
print(json.dumps(bad))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}


def test_cli_import_does_not_import_torch_and_both_entry_points_run():
    r = subprocess.run([sys.executable, "-c", "import sys, pairscout.cli; print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    for mod in ("pairscout", "pairscout.cli"):
        r = subprocess.run([sys.executable, "-m", mod, "--version"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"pairscout {pairscout.__version__}"


def test_console_script_entry_is_valid():
    import tomllib

    entry = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]["pairscout"]
    module, func = entry.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def _package_of(name: str) -> str:
    path = ROOT.joinpath(*name.split(".")[1:])
    return name if path.is_dir() else name.rsplit(".", 1)[0]


def test_no_private_name_is_imported_across_packages():
    """A name (or module) starting with ``_`` is private to its package: no other package imports it, so it can
    change without a search across the tree (and nothing is re-exported for another package's tests)."""
    bad = []
    for name in MODULES:
        path = ROOT.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        here = _package_of(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pairscout") and not node.level):
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                target = sub if sub in MODULES else node.module
                private = any(p.startswith("_") for p in target.split(".")[1:]) or (a.name.startswith("_") and not a.name.startswith("__"))
                owner = _package_of(target) if target != sub else node.module
                if private and owner != here:
                    bad.append(f"{name}: from {node.module} import {a.name}")
    assert not bad, bad
