"""Packaging: the repo root installs as the single import package `blocklm`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("formats", "pipeline", "model", "tools")


def _declared() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_declared():
    found = {"blocklm"}
    for top in SUBPACKAGES:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("blocklm", *rel)))
    assert sorted(found) == sorted(_declared())


@pytest.mark.slow
def test_wheel_holds_only_blocklm(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("blocklm-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert "blocklm" in tops
    assert all(t.endswith(".dist-info") for t in tops - {"blocklm"}), tops
    names = zipfile.ZipFile(wheel).namelist()
    for sub in SUBPACKAGES:
        assert f"blocklm/{sub}/__init__.py" in names
    assert "blocklm/formats/SPEC.md" in names
    assert not any(n.startswith("tests/") or n.startswith("blocklm/tests/") for n in names)


def test_blocktool_version():
    out = subprocess.run([sys.executable, "-m", "blocklm.tools.cli", "--version"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "blocktool, version 0.1.0"
