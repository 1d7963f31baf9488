"""The built wheel carries aiocrypt and integrations/ as aiocrypt.integrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_imports_every_integration(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("aiocrypt-*.whl")
    # the version is written once, in aiocrypt/__init__.py; the wheel takes it from there
    import aiocrypt

    assert wheel.name.startswith(f"aiocrypt-{aiocrypt.__version__}-"), wheel.name
    assert f"## {aiocrypt.__version__.removesuffix('.dev0')} " in (ROOT / "CHANGELOG.md").read_text(
        encoding="utf-8"
    )
    names = zipfile.ZipFile(wheel).namelist()
    assert "aiocrypt/integrations/__init__.py" in names
    assert not any(name.startswith(("integrations/", "tests/")) for name in names)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    integrations = sorted(
        [p.stem for p in (ROOT / "integrations").glob("*.py") if p.stem != "__init__"]
        + [p.parent.name for p in (ROOT / "integrations").glob("*/__init__.py")]
    )
    code = (
        "import importlib, sys, aiocrypt, aiocrypt.integrations as pkg\n"
        f"assert pkg.__file__.startswith({str(target)!r}), pkg.__file__\n"
        f"assert aiocrypt.__file__.startswith({str(target)!r}), aiocrypt.__file__\n"
        f"for name in {integrations!r}:\n"
        "    mod = importlib.import_module('aiocrypt.integrations.' + name)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), mod.__file__\n"
        "print('ok')\n"
    )
    # The target dir comes first on the path; dependencies come from this venv.
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_editable_install_maps_integrations() -> None:
    import aiocrypt.integrations

    assert Path(aiocrypt.integrations.__file__).resolve().parent == ROOT / "integrations"
