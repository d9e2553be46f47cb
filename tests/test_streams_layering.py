"""``beamloop.streams`` never imports ``beamloop.edge``: ``import beamloop.streams`` and every streams module,
each first in a fresh interpreter, import without ``beamloop.edge`` appearing in ``sys.modules``; and no
streams source has an import statement naming it (function-local imports included)."""

import ast
import subprocess
import sys
from pathlib import Path

import beamloop.streams

STREAMS = Path(beamloop.streams.__file__).parent

CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
edge = sorted(m for m in sys.modules if m == "beamloop.edge" or m.startswith("beamloop.edge."))
sys.exit(f"importing {sys.argv[1]} imported {edge}" if edge else 0)
"""


def streams_modules() -> list[str]:
    """Every module and package of beamloop.streams, by its source files."""
    names = []
    for path in sorted(STREAMS.rglob("*.py")):
        parts = path.relative_to(STREAMS).with_suffix("").parts
        names.append(".".join(("beamloop.streams", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


def test_every_streams_module_imports_without_edge():
    names = streams_modules()
    assert "beamloop.streams" in names and "beamloop.streams.cli" in names and len(names) > 15
    procs = {n: subprocess.Popen([sys.executable, "-c", CHECK, n], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for n in names}  # a fresh interpreter each: import order is theirs
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = (err or out)[-1500:]
    assert not failed, failed


def test_no_streams_source_names_edge_in_an_import():
    found = []
    for path in sorted(STREAMS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(STREAMS)}:{node.lineno} {n}" for n in names
                      if n.startswith(("beamloop.edge", "edge"))]
    assert not found
