"""Dependencies point one way, and a test says so:

    fl_sim (foundation)  <-  attacks, clients  <-  server  <-  fl_sim.cli, fl_sim.api, benchmarks

`attacks` knows nothing of Flower or of the clients (an attack takes a plain case), `clients`
nothing of the server or the attacks, and the foundation nothing above itself. Every import
is read from the source, function-local ones included, so a lazy upward import fails too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_sim", "attacks", "clients", "server", "benchmarks")
WIRING = {"fl_sim.cli", "fl_sim.api"}  # the two modules that wire every layer together

# layer -> the layers it may import
ALLOWED = {
    "foundation": {"foundation"},
    "attacks": {"foundation", "attacks"},
    "clients": {"foundation", "clients"},
    "server": {"foundation", "attacks", "clients", "server"},
    "wiring": {"foundation", "attacks", "clients", "server", "wiring"},
}


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if module in WIRING or top == "benchmarks":
        return "wiring"
    return {"fl_sim": "foundation", "attacks": "attacks", "clients": "clients", "server": "server"}.get(top)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from fl_sim import api` imports the module fl_sim.api
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_every_import_points_down_the_layers():
    mods = modules()
    assert {"fl_sim.config", "attacks.engine", "clients.app", "server.federation"} <= set(mods)
    bad = []
    for name, path in mods.items():
        src = layer(name)
        for line, target in imports(path):
            dst = layer(target)
            if dst is None or (target not in mods and target.rsplit(".", 1)[0] not in mods):
                continue  # a third-party module, or a name imported from a project module
            if name == "fl_sim" and target == "fl_sim.api":
                continue  # fl_sim/__init__ re-exports the API, loaded on first use
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line} {name} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {name: sorted({t for _, t in imports(path, top_level_only=True) if t in mods and t != name})
             for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above must be able to fail: a foundation module importing the server."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from server.federation import Federation\n")
    [(line, target)] = [(ln, t) for ln, t in imports(bad) if t == "server.federation"]
    assert line == 2 and layer(target) not in ALLOWED["foundation"]
