"""protocol/ is sans-IO: none of its own modules imports an I/O module."""

import ast
from pathlib import Path

FORBIDDEN = {
    "trio", "socket", "asyncio", "native", "selectors", "subprocess", "threading",
    "ssl", "http", "urllib", "guest_agent", "host_backend", "multiprocessing", "signal",
}
PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_protocol_modules_import_no_io():
    files = sorted(PROTOCOL.glob("*.py"))
    assert len(files) >= 8
    offenders = {
        f"{path.name} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name in FORBIDDEN
    }
    assert not offenders


def test_construct_is_declared_in_one_module():
    users = [
        path.name
        for path in sorted(PROTOCOL.glob("*.py"))
        if any(name == "construct" for name in imported_modules(path))
    ]
    # codec.py only catches construct's error type; every layout is in wire.py.
    assert users == ["codec.py", "wire.py"]
    codec_src = (PROTOCOL / "codec.py").read_text()
    assert "from construct import ConstructError" in codec_src
    assert "Struct(" not in codec_src
