"""The package's shape (STYLE.md): trio only in the service, a core without I/O."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "guest_agent"
IO = {"trio", "socket", "select", "selectors", "subprocess", "threading", "signal", "asyncio",
      "native"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_trio_lives_only_in_the_service_module() -> None:
    users = sorted(p.name for p in PACKAGE.glob("*.py") if "trio" in imports(p))
    assert users == ["service.py"]


def test_the_core_the_guard_and_the_statistics_do_no_io_of_their_own() -> None:
    for name in ("agent.py", "guard.py", "stats.py"):
        assert not imports(PACKAGE / name) & IO, name
