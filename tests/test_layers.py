"""The import layers of src/fastfeed: no cycle, and no module imports one above it.

Data flows one way: sources -> sink (the table, or the bus) -> table -> hub
-> sockets, with the sessions beside it as the control plane. In imports that
is the order below, bottom first (docs/layout.md says it in words). A module
may import its own layer and the ones below; every import counts, at the top
of a module, inside a function or under `if TYPE_CHECKING:`, and so does the
package `__init__` that importing a submodule runs. Compiled modules count
too (`import` and `cimport` lines of .pyx and .pxd files).
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib
import re

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "fastfeed"

# Bottom first. A pattern names modules by fnmatch; the first layer with a
# matching pattern is a module's layer, so specific names go before the
# wildcards of a later layer only if they sit lower.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("protocol: the wire contract's names and numbers, importing nothing",
     ("fastfeed.protocol",)),
    ("settings and plumbing every part may use",
     ("fastfeed", "fastfeed.config", "fastfeed.logs", "fastfeed.auth", "fastfeed.metrics",
      "fastfeed.backoff",
      # package inits that import nothing, so a part of them can be taken alone
      "fastfeed.feed", "fastfeed.gateway")),
    ("the compiled core (table, hub, wire codec) and its pure-Python model",
     ("fastfeed._[!_]*", "fastfeed.reference")),
    ("the bus: Redis as the sink, and as a source for the table",
     ("fastfeed.bus", "fastfeed.bus.*")),
    ("what users import: the client and the publisher",
     ("fastfeed.orderbook", "fastfeed.tape", "fastfeed.compact", "fastfeed.client",
      "fastfeed.publisher")),
    ("framing: RFC 6455 and the HTTP front door, for every endpoint",
     ("fastfeed.gateway.framing", "fastfeed.gateway.httpfront")),
    ("sources and sinks: the Sink and Source interfaces, simulator, /ingest, publishers, "
     "recordings",
     ("fastfeed.feed.*",)),
    ("the gateway's state: session registry and limits, frame clock",
     ("fastfeed.gateway.registry", "fastfeed.gateway.clock")),
    ("one client connection",
     ("fastfeed.gateway.session",)),
    ("the HTTP routes and the upgrades",
     ("fastfeed.gateway.routes",)),
    ("app: the wiring and lifecycle, the only part that knows every other",
     ("fastfeed.gateway.app", "fastfeed.gateway.*", "fastfeed.server")),
    ("processes: workers and the command line",
     ("fastfeed.workers", "fastfeed.cli", "fastfeed.__main__")),
]

# Cycles that exist and are being taken apart; each names why. An entry
# whose cycle is gone fails too, so the list only shrinks.
KNOWN_CYCLES: dict[frozenset[str], str] = {}

_PYX_IMPORT = re.compile(
    r"^\s*(?:from\s+(?P<from>\.*[\w.]*)\s+c?import\s+(?P<names>[^#\n]+)|c?import\s+(?P<mods>[^#\n]+))",
    re.M)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, list[pathlib.Path]]:
    mods: dict[str, list[pathlib.Path]] = {}
    for path in sorted(PKG.rglob("*")):
        if path.suffix in (".py", ".pyx", ".pxd") and "__pycache__" not in path.parts:
            mods.setdefault(_module_name(path), []).append(path)
    return mods


MODULES = _sources()


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _targets(name: str, names: list[str]) -> list[str]:
    """`from name import a, b`: the submodules among a, b, or else the module itself."""
    subs = [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]
    return subs if len(subs) == len(names) else [*subs, name]


def _imports_of(mod: str, path: pathlib.Path) -> set[str]:
    is_package = path.stem == "__init__"
    out: set[str] = set()
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                out.update(_targets(base, [a.name for a in node.names]))
    else:
        for m in _PYX_IMPORT.finditer(path.read_text()):
            if m["from"] is not None:
                dots = len(m["from"]) - len(m["from"].lstrip("."))
                base = _resolve(mod, is_package, dots, m["from"].lstrip(".") or None)
                names = [n.strip().split()[0] for n in m["names"].strip("() \n").split(",")
                         if n.strip()]
                out.update(_targets(base, names))
            else:
                out.update(n.strip().split()[0] for n in m["mods"].split(",") if n.strip())
    found = set()
    for target in out:
        if target != "fastfeed" and not target.startswith("fastfeed."):
            continue
        # importing a.b.c runs a.b's __init__ too, unless the importer lives in
        # a.b: then that __init__ is its own package's, already running
        parts = target.split(".")
        found.update(".".join(parts[:k]) for k in range(2, len(parts) + 1)
                     if not mod.startswith(".".join(parts[:k]) + ".")
                     or k == len(parts))
    found.discard(mod)
    return {t for t in found if t in MODULES}


GRAPH = {mod: set().union(*(_imports_of(mod, p) for p in paths))
         for mod, paths in MODULES.items()}


def layer_of(mod: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(mod, p) for p in patterns):
            return rank
    raise LookupError(mod)


def test_the_import_reader_sees_what_the_modules_import():
    # guards the test itself: relative, lazy, TYPE_CHECKING-free and cimported edges
    assert "fastfeed.gateway.framing" in GRAPH["fastfeed.feed.ingest"]
    assert "fastfeed.gateway" in GRAPH["fastfeed.feed.ingest"]  # the package init runs
    assert "fastfeed.protocol" in GRAPH["fastfeed.gateway.session"]  # `from .. import protocol`
    assert "fastfeed.bus" in GRAPH["fastfeed.workers"]  # inside a function
    assert "fastfeed._table" in GRAPH["fastfeed._tickjson"]  # a cimport
    assert GRAPH["fastfeed.protocol"] == set()


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not _has_layer(m)]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def _has_layer(mod: str) -> bool:
    try:
        layer_of(mod)
    except LookupError:
        return False
    return True


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_imports_one_above_it(mod):
    rank = layer_of(mod)
    above = sorted(t for t in GRAPH[mod] if layer_of(t) > rank)
    assert not above, (
        f"{mod} (layer {rank}: {LAYERS[rank][0]}) imports a higher layer: "
        + ", ".join(f"{t} (layer {layer_of(t)}: {LAYERS[layer_of(t)][0]})" for t in above)
        + ". Pass what it needs in instead (a context, a callback), or move the code down.")


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = {frozenset(c) for c in _cycles()}
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"
