"""The package layout: bsnas modules import each other without cycles, along one data
flow (config -> space -> supernet -> train/strategy -> export -> pipeline, cli on top),
and `import bsnas` stays light. Imports are read with `ast`, function-level ones
included, so a lazy import that reaches back up counts as much as a top-level one."""
import ast
import json
import os

from fresh_interpreter import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bsnas")

#: The data flow, lowest first: a module may import modules of its own or a lower rank
#: only. The longest matching prefix gives a module's rank.
RANKS = [
    ("bsnas.extension", "bsnas.ops", "bsnas.config", "bsnas.data"),
    ("bsnas.space",),
    ("bsnas.nn", "bsnas.profiler", "bsnas.profiler.cost"),
    ("bsnas.supernet",),
    ("bsnas.evaluator",),
    ("bsnas.train", "bsnas.strategy"),
    ("bsnas.export",),
    ("bsnas.profiler.latency",),
    ("bsnas.pipeline",),
    ("bsnas.cli", "bsnas.__main__"),
]

#: Imports the layout rules out although the ranks would allow them: (importer prefix,
#: imported prefix, why).
FORBIDDEN = [
    ("bsnas.train", "bsnas.strategy", "shrinking plugs into the trainer through Trainer.epoch_hooks"),
    ("bsnas.strategy", "bsnas.train.trainer", "search uses bsnas.train.runtime, not the trainer"),
    ("bsnas.pipeline.retrain", "bsnas.train.trainer", "retraining uses bsnas.train.runtime, not the trainer"),
]


def _modules() -> dict[str, str]:
    """{dotted name: file} of every Python module of the package."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(folder, f)
    return out


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return modules[name].endswith("__init__.py")


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The bsnas modules that `name` imports anywhere in its file. `from P import N`
    imports module P.N when there is one, else P (N is an attribute of P). Importing a
    module also runs its parent packages, except those `name` lies in (already running)."""
    tree = ast.parse(open(path).read(), path)
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    out = set()
    for target in targets:
        parts = target.split(".")
        if parts[0] != "bsnas":
            continue
        for i in range(2, len(parts) + 1):  # parent packages below the root, then the module
            candidate = ".".join(parts[:i])
            if candidate in modules and not (name == candidate or name.startswith(candidate + ".")):
                out.add(candidate)
        if target == "bsnas" and name != "bsnas":
            out.add("bsnas")  # a name taken from the root package: the root imports everything
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _rank(name: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(RANKS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    return None if best is None else best[0]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    colour = {n: 0 for n in graph}  # 0 new, 1 on the current path, 2 done
    path: list[str] = []

    def visit(n):
        colour[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if colour[m] == 1:
                return path[path.index(m):] + [m]
            if colour[m] == 0:
                found = visit(m)
                if found:
                    return found
        path.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour[n] == 0:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_is_acyclic():
    graph = _graph()
    assert "bsnas.train.trainer" in graph and "bsnas.space.enabled" in graph  # the layout is read
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_follow_the_data_flow():
    graph = _graph()
    unranked = sorted(n for n in graph if n != "bsnas" and _rank(n) is None)
    assert not unranked, f"modules outside the layout's ranks: {unranked}"
    upward = [f"{a} -> {b}" for a, targets in graph.items() if a != "bsnas"
              for b in targets if b == "bsnas" or _rank(b) > _rank(a)]
    assert not upward, f"imports against the data flow: {sorted(upward)}"
    forbidden = [f"{a} -> {b} ({why})" for a, targets in graph.items() for b in targets
                 for src, dst, why in FORBIDDEN
                 if (a == src or a.startswith(src + ".")) and (b == dst or b.startswith(dst + "."))]
    assert not forbidden, f"imports the layout rules out: {sorted(forbidden)}"


def test_every_module_says_what_it_holds():
    missing = [name for name, path in _modules().items()
               if not (ast.get_docstring(ast.parse(open(path).read())) or "").strip()]
    assert not missing, f"modules without a docstring: {sorted(missing)}"


def test_import_bsnas_stays_light():
    """`import bsnas` loads the model-level API only: no plotting, YAML parser, pipeline,
    trainer or search strategy (in a fresh interpreter, where nothing was imported before)."""
    script = ("import json, sys\nimport bsnas\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    out = run_python(script, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    # yaml: spaces are parsed only when a space file is loaded
    heavy = sorted(m for m in loaded for p in ("matplotlib", "yaml", "bsnas.pipeline", "bsnas.train.trainer",
                                               "bsnas.strategy")
                   if m == p or m.startswith(p + "."))
    assert not heavy, f"import bsnas loaded {heavy}"
    assert "bsnas.profiler.cost" in loaded and "bsnas._C" in loaded


def test_public_names_and_subpackage_reexports():
    script = """
import json
import bsnas
from bsnas.profiler import cost
from bsnas.space import SearchSpace, load_space
from bsnas.nn import StaticMBConv
from bsnas.train import Trainer
from bsnas.train.trainer import Trainer as T
names = ["cuda_compiled", "masked_dwconv2d", "masked_pwconv2d", "Arch", "EnabledSpace", "LayerChoice",
         "SearchSpace", "Supernet", "cost", "export", "load_space"]
print(json.dumps({"missing": [n for n in names if not hasattr(bsnas, n)],
                  "cost": bsnas.cost is cost, "trainer": Trainer is T,
                  "space": bsnas.SearchSpace is SearchSpace and bsnas.load_space is load_space,
                  "cuda": isinstance(bsnas.cuda_compiled(), bool)}))
"""
    out = run_python(script, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"missing": [], "cost": True, "trainer": True, "space": True, "cuda": True}
