"""The shape of the package, measured on its import graph (every import, also those
inside functions): no circles, input code that knows nothing of the engine, a
training loop that names no store, NumPy-only statistics."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "sparkgd")


def modules():
    """module name -> (path, source) for every module of the package."""
    out = {}
    for base, _dirs, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                with open(path) as f:
                    out[mod] = (path, f.read())
    return out


def imports(mod, path, source, known):
    """The package modules ``mod`` imports, anywhere in its body."""
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != mod)
    return found


def graph():
    mods = modules()
    return {m: imports(m, p, s, mods) for m, (p, s) in mods.items()}


def cycles(g):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    g = graph()
    assert "sparkgd.engine.hub" in g and g["sparkgd.engine.files"]   # the graph is real
    assert cycles(g) == []


def test_a_circle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_input_code_knows_nothing_of_the_engine_nor_the_estimators():
    g = graph()
    for mod, deps in g.items():
        if mod.startswith("sparkgd.data"):
            bad = {d for d in deps if d.startswith(("sparkgd.engine", "sparkgd.estimators",
                                                    "sparkgd.modes", "sparkgd.persist"))}
            assert not bad, (mod, bad)
    assert not any(d.startswith("sparkgd.estimators") for d in g["sparkgd.persist"])


def test_the_training_loop_names_no_store_and_stats_is_numpy_only():
    mods = modules()
    sync = mods["sparkgd.modes.sync"][1]
    for word in ("store", "socket", "served", "rdd", "Hub"):
        assert word not in sync, word
    stats = mods["sparkgd.stats"][1]
    assert "pyspark" not in stats and "rdd" not in stats


def test_one_pass_is_followable_file_to_file():
    """The modules a pass goes through: the objective, the engine, the hub (the
    driver's end) and the wire; the task's end, its links to other tasks, and the
    kernel; who sends what to whom lives in one pure module both ends import."""
    g = graph()
    mods = modules()
    assert "engine.evaluate(" in mods["sparkgd.modes.sync"][1]
    assert "sparkgd.engine.served" in g["sparkgd.engine"]
    assert {"sparkgd.engine.hub", "sparkgd.engine.task"} <= g["sparkgd.engine.served"]
    assert {"sparkgd.engine.wire", "sparkgd.engine.collective"} <= g["sparkgd.engine.hub"]
    assert {"sparkgd.engine.wire", "sparkgd.engine.peers", "sparkgd.engine.collective",
            "sparkgd.kernels"} <= g["sparkgd.engine.task"]
    assert not any(d.startswith("sparkgd.engine") for d in g["sparkgd.engine.collective"])
    assert "pyspark" not in mods["sparkgd.engine.collective"][1]


def test_the_engine_imports_nothing_of_the_modes_privacy_or_the_fit():
    """The engine carries passes; what a pass computes (sparkgd.work, the modes,
    privacy) reaches it as a value, never as an import; nothing below the coordinator
    imports it back."""
    g = graph()
    above = ("sparkgd.modes", "sparkgd.privacy", "sparkgd.work", "sparkgd.coordinator",
             "sparkgd.launch", "sparkgd.connect", "sparkgd.estimators", "sparkgd.models")
    engine = [m for m in g if m.startswith("sparkgd.engine")]
    assert len(engine) >= 10
    for mod in engine:
        bad = {d for d in g[mod] if d.startswith(above)}
        assert not bad, (mod, bad)
    for mod in ("sparkgd.coordinator", "sparkgd.modes.sync", "sparkgd.modes.local",
                "sparkgd.modes.ps", "sparkgd.modes.dp"):
        assert not {d for d in g[mod] if d.startswith(("sparkgd.estimators",
                                                          "sparkgd.launch", "sparkgd.connect"))}


def test_the_modes_share_one_signature():
    import inspect

    from sparkgd.coordinator import LOOPS

    assert set(LOOPS) == {"sync", "local", "async", "dp"}
    for fit in LOOPS.values():
        assert list(inspect.signature(fit).parameters) == ["engine", "problem", "plan", "keep"]
