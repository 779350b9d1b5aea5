"""pyproject.toml declares what an installed wheel needs: every runtime requirement the tests
run with (requirements.txt, minus cog: predict.py's, not the package's), with bounds that
both tested pin sets (requirements.txt and the image's) satisfy."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def test_declared_dependencies_cover_the_tested_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    local, image = pins("requirements.txt"), pins("requirements-image.txt")
    assert set(declared) == set(local) - {"cog"}
    for pinned in (local, image):
        for name, spec in pinned.items():
            if name == "cog":
                continue
            version = spec.lstrip("=<>~!")
            assert declared[name].specifier.contains(version, prereleases=True), (name, spec)
