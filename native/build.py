"""cffi build script for ``native._native`` (out-of-line API mode).

``pip install`` runs it through setuptools' ``cffi_modules = ["native/build.py:ffibuilder"]``
(see setup.py); ``python native/build.py`` builds the extension in place for
development.  The declarations handed to ``cdef`` are the marked section of
``balloon.h``, so the header is the one place the C interface is written down.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_BEGIN = "/* ---- cdef begin ---- */"
_END = "/* ---- cdef end ---- */"


def _cdef_text() -> str:
    with open(os.path.join(_HERE, "balloon.h"), encoding="utf-8") as f:
        header = f.read()
    return header[header.index(_BEGIN) + len(_BEGIN) : header.index(_END)]


def _source_path(name: str) -> str:
    # setuptools wants sources relative to the project root (its working
    # directory during a build); fall back to an absolute path elsewhere.
    path = os.path.join(_HERE, name)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "native._native",
    '#include "balloon.h"',
    sources=[_source_path("balloon.c")],
    include_dirs=[_HERE],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(_HERE), verbose=True)
