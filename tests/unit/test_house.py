"""The house's rules (docs/contributing/house.md), checked on the source: every module imports, imports run one
way along the flow, none hides inside a function, and product code never imports the lab."""

from __future__ import annotations

import ast
import re
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "r1fleet"

# The flow, first to last: a room may import its own modules and the rooms before it.
FLOW = [
    {"errors", "records", "net", "progress", "tensor_split", "__init__"},
    {"probe"},
    {"hardware"},
    {"plan"},
    {"fleet"},
    {"artifacts", "render"},
    {"lock"},
    {"cache"},
    {"operations"},
    {"roles"},
    {"deploy"},
    {"verify"},
    {"status"},
    {"cli", "__main__"},
    {"lab"},
]
RANK = {room: rank for rank, rooms in enumerate(FLOW) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def imports(path: Path):
    """(line, imported r1fleet module, inside a function?) for each import of r1fleet in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    typing_only = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("r1fleet"):
            targets = [node.module if node.module != "r1fleet" else f"r1fleet.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("r1fleet")]
        else:
            continue
        for target in targets:
            yield node.lineno, target, id(node) not in top and id(node) not in typing_only


def test_every_room_is_placed_on_the_flow():
    rooms = {room(module_name(path)) for path in SOURCES}
    assert rooms <= set(RANK), f"place these rooms on FLOW: {sorted(rooms - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_and_never_hide_in_a_function(path):
    source = module_name(path)
    wrong = []
    for line, target, inside in imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if room(source) != "lab" and room(target) == "lab":
            wrong.append(f"{where}: product code never imports the lab (it plugs in: r1fleet/fleet/plugins.py)")
        elif RANK[room(target)] > RANK[room(source)]:
            wrong.append(f"{where}: up the flow")
        elif inside and room(source) != "lab":
            wrong.append(f"{where}: inside a function")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", [p for p in SOURCES if "verify/suite" not in str(p) and p.name != "__main__.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_imports(path):
    importlib.import_module(module_name(path))


def test_every_role_is_a_folder_with_its_decisions_and_its_operations():
    roles = [d for d in (PACKAGE / "roles").iterdir() if d.is_dir() and d.name != "__pycache__"]
    assert roles and all((d / "decide.py").is_file() and (d / "role.py").is_file() for d in roles), roles
    assert sorted(p.name for p in (PACKAGE / "roles").glob("*.py")) == ["__init__.py"]  # roles/ holds only roles


def test_role_decisions_import_no_pyinfra():
    """A role's face (its decide.py, and the endpoint the exposure role's decisions give) reads alone: importing it
    loads no pyinfra."""
    import subprocess
    import sys

    for decide in [*sorted(PACKAGE.glob("roles/*/decide.py")), PACKAGE / "roles" / "exposure" / "endpoint.py"]:
        module = module_name(decide)
        probe = f"import sys, {module}; print(any(m == 'pyinfra' or m.startswith('pyinfra.') for m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False", f"{module} loads pyinfra"


def test_every_note_the_code_cites_is_in_the_repository():
    """Comments cite research as docs/research/<note>.md; each note is there (and mkdocs --strict checks its links)."""
    root = PACKAGE.parent
    cited = set()
    for folder in ("r1fleet", "tests", "bench", "scripts"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml", ".yml", ".j2"):
                cited.update(re.findall(r"docs/research/[\w.-]+\.md", path.read_text(errors="replace")))
    assert cited, "no citation found: the pattern is wrong"
    missing = sorted(c for c in cited if not (root / c).is_file())
    assert not missing, missing


def test_every_test_module_has_a_name_of_its_own():
    """The test folders are not packages: pytest imports each module by its file name, so two `test_status.py`
    in two folders make the whole run stop at collection (only a full run shows it)."""
    names = [path.name for path in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
