"""The package's import graph: no cycles, and every import points down the layers (imports inside functions
count). The layers, lowest first, are the architecture of docs/architecture.md."""

import ast
from pathlib import Path

import m2r2

ROOT = Path(m2r2.__file__).resolve().parent
PKG = "m2r2"

# lowest first; a module may import its own layer and the ones below it, never one above
LAYERS = [
    ("m2r2.errors", "m2r2.options", "m2r2.prompts", "m2r2.artifacts"),
    ("m2r2.engine",),
    ("m2r2.provenance",),  # the machine and its thread policy (engine.threads), git state, command line
    ("m2r2.stream",),
    ("m2r2.decoding",),
    ("m2r2.baselines",),
    ("m2r2.strategies",),
    ("m2r2.api",),
    ("m2r2.training", "m2r2.moe", "m2r2.family", "m2r2.serving"),
    ("m2r2.bench",),
    ("m2r2.cli",),
]
# within the third-from-top layer, these orders hold too (family trains with training's skeleton)
ALSO_BELOW = {"m2r2.training": ("m2r2.family", "m2r2.moe")}


def modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = (PKG,) + f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    out = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t != PKG:
                    out[m].add(t)
    return out


def layer_of(mod: str) -> int | None:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group):
            return i
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != PKG and layer_of(m) is None] == []


def test_no_import_cycles():
    assert cycles(edges(modules())) == []


def test_imports_point_down_the_layers():
    bad = []
    for m, targets in edges(modules()).items():
        if m == PKG:
            continue
        for t in targets:
            lm, lt = layer_of(m), layer_of(t)
            if lt > lm:
                bad.append(f"{m} -> {t}")
            for low, highs in ALSO_BELOW.items():
                if (m == low or m.startswith(low + ".")) and any(t == h or t.startswith(h + ".") for h in highs):
                    bad.append(f"{m} -> {t}")
    assert bad == []


def test_the_checks_catch_what_they_should():
    """The helpers see a cycle and an upward import when there is one (they cannot pass vacuously)."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("m2r2.engine.model") < layer_of("m2r2.decoding.loop") < layer_of("m2r2.cli")
    graph = edges(modules())
    assert "m2r2.engine.model" in graph["m2r2.decoding.loop"]  # a real downward edge is seen
