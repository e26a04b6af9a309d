"""The layers of rdpt point one way (README "Architecture"):

    basics <- data, tracking <- model <- training <- evaluation, launch <- CLI

Every `import` of every module, also those inside functions (not those under
`if TYPE_CHECKING:`, which never run), is read from the source with `ast`. Each must go to the
module's own layer or a lower one; layers of the same rank (data / tracking, evaluation /
launch) do not import each other. The model imports no DeepSpeed; nothing below training
imports it. No two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "launch", "data_prep")

# (layer, rank, module prefixes); the longest matching prefix decides a module's layer
LAYERS = [
    ("basics", 0, ["pipeline.common", "pipeline"]),
    ("data", 1, ["data_prep", "pipeline.data"]),
    ("tracking", 1, ["pipeline.tracking"]),
    ("model", 2, ["pipeline.model"]),
    ("training", 3, ["pipeline.training", "pipeline.train"]),
    ("evaluation", 4, ["pipeline.eval"]),
    ("launch", 4, ["launch"]),
    ("cli", 5, ["pipeline.cli", "pipeline.__main__"]),
]


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def layer_of(module: str) -> tuple[str, int]:
    best = None
    for name, rank, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), name, rank)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[1], best[2]


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """rdpt modules (and 'deepspeed') imported anywhere in `path`."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"

    def add(target: str) -> None:
        if target.split(".")[0] == "deepspeed":
            found.add("deepspeed")
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != module:
            found.add(target)

    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{src}.{alias.name}"
                add(sub if sub in mods else src)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def test_every_import_points_down_the_layers():
    bad = []
    for module, targets in sorted(import_graph().items()):
        name, rank = layer_of(module)
        for target in sorted(targets - {"deepspeed"}):
            tname, trank = layer_of(target)
            if trank > rank or (trank == rank and tname != name):
                bad.append(f"{module} ({name}) imports {target} ({tname})")
    assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)


def test_deepspeed_only_from_training_up():
    bad = [
        m
        for m, targets in import_graph().items()
        if "deepspeed" in targets and layer_of(m)[1] < layer_of("pipeline.training")[1]
    ]
    assert not bad, f"modules below training that import deepspeed: {sorted(bad)}"


def test_no_import_cycles():
    graph = {m: t - {"deepspeed"} for m, t in import_graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_a_violation_and_a_cycle(tmp_path):
    """The walk finds imports inside functions and a cycle (so the tests above can fail)."""
    mods = {"pipeline.model.x": tmp_path / "x.py", "pipeline.training.y": tmp_path / "y.py"}
    mods["pipeline.model.x"].write_text("def f():\n    from pipeline.training.y import g\n")
    mods["pipeline.training.y"].write_text("import deepspeed\nfrom pipeline.model import x\n")
    fx = imports_of("pipeline.model.x", mods["pipeline.model.x"], mods)
    fy = imports_of("pipeline.training.y", mods["pipeline.training.y"], mods)
    assert fx == {"pipeline.training.y"} and fy == {"deepspeed", "pipeline.model.x"}
    assert layer_of("pipeline.training.y")[1] > layer_of("pipeline.model.x")[1]


def test_the_repository_cites_no_file_outside_it():
    """Docs, code, configs and tests name no path outside the repository (design notes, a
    machine's directories): what a reader needs is in the repository itself."""
    import re
    import subprocess

    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = re.compile(r"\.\./shared|shared/design|/work/(?:main|shared)")
    hits = []
    for name in files:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".yaml", ".sbatch", ".toml", ".sh", ".txt", ""}:
            continue
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line) and path != Path(__file__).resolve():
                hits.append(f"{name}:{n}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n  " + "\n  ".join(hits)


def test_tests_the_readme_names_exist():
    """Every `test_file.py::test_name` (and `test_file.py`) the README cites exists."""
    import re

    text = (REPO / "README.md").read_text()
    missing = []
    for file, name in re.findall(r"`?(test_\w+\.py)(?:::(test_\w+))?", text):
        path = REPO / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif name and f"def {name}(" not in path.read_text():
            missing.append(f"{file}::{name}")
    assert not missing, f"the README cites tests that do not exist: {sorted(set(missing))}"
