"""A non-editable install carries what `echoink demo` needs (its config ships inside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_ships_in_the_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("echoink-*.whl")
    assert "echoink/demo/demo_cpu.yaml" in zipfile.ZipFile(wheel).namelist()
    assert "echoink/analysis/templates/report.html.j2" in zipfile.ZipFile(wheel).namelist()  # the report page

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    # run from outside the repository, with only the installed copy of echoink importable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = ("import echoink, echoink.demo as d; from echoink.config import load_config; "
            "c = load_config(d.DEMO_CONFIG); print(echoink.__file__); print(c.max_steps, c.num_generations)")
    run = subprocess.run([sys.executable, "-S", "-c", f"import site; site.main(); import sys; "
                          f"sys.path.insert(0, {str(site)!r}); {code}"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    installed_file, numbers = run.stdout.splitlines()[:2]
    assert installed_file.startswith(str(site))
    assert [int(n) for n in numbers.split()] == [200, 8]
