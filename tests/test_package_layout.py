"""The package's shape: stages as folders, imports flowing one way, no import circle.

Read from the source with ast (module-level and function-level imports alike, since a lazy
import inside a function still makes a circle when it runs), so the rules hold whatever imports
happen to be executed by the rest of the suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "midus_surgery"
STAGES = ("recipe", "compiler", "anatomy", "io", "emit", "model", "kernels", "train", "downstream")
# Which stage may import which: the pipeline runs recipe -> compiler (+ anatomy) -> emit -> train,
# everything may use io and errors, model/ and kernels/ are leaves.
ALLOWED = {
    "recipe": {"recipe"},
    "anatomy": {"anatomy", "recipe"},
    "compiler": {"compiler", "recipe", "anatomy", "io", "model"},
    "io": {"io"},
    "emit": {"emit", "compiler", "recipe", "io", "model", "anatomy"},  # replica.py shrinks the base as the anatomy probe does
    "model": {"model", "kernels"},  # the optional compiled kernels, imported guarded
    "kernels": {"kernels"},
    "train": {"train", "io", "model", "recipe", "compiler"},
    "downstream": {"downstream", "train", "io", "model", "compiler"},  # evaluates and explains what train made (reads midus_plan.json)
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every midus_surgery module ``path`` imports, resolved to module names."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("midus_surgery"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("midus_surgery"):
                continue
            for alias in node.names:  # `from pkg import module` names a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if MODULES.get(candidate) else target)
    return {m for m in found if m in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


def test_the_stages_are_folders():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(STAGES)
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "errors.py", "units.py"], top


def test_no_import_circle():
    seen, on_path, circles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            circles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        on_path.pop()

    for m in sorted(GRAPH):
        visit(m)
    # a package's __init__ importing its own submodule is not a circle between stages
    circles = [c for c in circles if not all(x.startswith(c[0]) or c[0].startswith(x) for x in c)]
    assert circles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if stage_of(m)))
def test_imports_flow_one_way(module):
    stage = stage_of(module)
    for target in GRAPH[module]:
        other = stage_of(target)
        assert other is None or other in ALLOWED[stage], f"{module} ({stage}) imports {target} ({other})"
        assert target != "midus_surgery.cli", f"{module} imports the CLI"


def test_the_files_copied_beside_the_weights_import_nothing_else_from_the_package():
    from midus_surgery.model import MODELING_FILES

    model_dir = PACKAGE / "model"
    assert sorted(p.name for p in model_dir.glob("*.py") if p.name != "__init__.py") == sorted(MODELING_FILES)
    for name in MODELING_FILES:
        tree = ast.parse((model_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in MODELING_FILES, f"{name} imports .{node.module}, which does not travel with it"
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("midus_surgery"):
                # only the optional kernels, guarded: the layer runs without them where the package is missing
                assert node.module == "midus_surgery" and [a.name for a in node.names] == ["kernels"], f"{name}: {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("midus_surgery") for a in node.names), name


def test_kernels_take_what_they_need_as_arguments():
    for path in (PACKAGE / "kernels").glob("*.py"):
        assert all(not t.startswith("midus_surgery.model") for t in GRAPH[module_name(path)]), path.name
