"""The package layering (docs/design.md "Packages and who knows whom"): arrows run one way.

`rl.core` imports nothing else of the project; `rollout`, `trainer` and `datastore` import from `rl` only
`rl.core`; `datastore` imports neither `rollout` nor `trainer`. Every import counts, those inside functions
too (a lazy import is still an arrow)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("rl", "rollout", "trainer", "datastore")


def imports(path: Path) -> list[str]:
    """Every project module `path` imports (absolute names; `from rl import x` counts as rl.x)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in out if m.split(".")[0] in PROJECT]


def allowed(package: str, module: str) -> bool:
    if package == "rl/core":
        return module.startswith("rl.core.")
    if package in ("rollout", "trainer"):
        return module.startswith(("rl.core.", "rollout.", "trainer.", "datastore."))
    if package == "datastore":
        return module.startswith(("rl.core.", "datastore."))
    return True


CASES = [(pkg, p) for pkg in ("rl/core", "rollout", "trainer", "datastore") for p in sorted((ROOT / pkg).rglob("*.py"))]


@pytest.mark.parametrize("package,path", CASES, ids=[str(p.relative_to(ROOT)) for _, p in CASES])
def test_imports_run_one_way(package: str, path: Path) -> None:
    wrong = [m for m in imports(path) if not allowed(package, m)]
    assert not wrong, f"{path.relative_to(ROOT)} ({package}) imports {wrong}: move it to rl/core or invert the arrow"


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rl.controller import Controller\n    import rl.core.waits\n")
    assert imports(f) == ["rl.controller.Controller", "rl.core.waits"]
    assert not allowed("trainer", "rl.controller.Controller") and allowed("trainer", "rl.core.waits")
