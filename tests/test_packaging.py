"""Packaging: every folder with an __init__.py is a listed sub-package of ``beamloop``, and the wheel's
metadata agrees with what the code needs."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PILLARS = ("edge", "streams", "quantize", "fpga", "bench")


def test_every_package_folder_is_listed_in_pyproject():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = {"beamloop"}
    for pillar in PILLARS:
        for init in (REPO / pillar).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            found.add(".".join(("beamloop", *rel.parts)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_metadata_bounds_match_the_code():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    assert "numpy>=2.0" in deps  # np.trapezoid and numpy 2 dtype rules
    assert not any(d.startswith("onnxruntime-gpu") for e in meta["project"]["optional-dependencies"].values()
                   for d in e), "onnxruntime-gpu must replace onnxruntime, not be installed beside it"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])  # SPDX licence string
    assert (REPO / "LICENSE").is_file()
    assert meta["project"]["scripts"]["beamloop"] == "beamloop.edge.cli:main"
