"""The README's torchrun line, run as a user types it (2 CPU processes, gloo), and `python -m` entry points."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_line(prefix: str, contains: str) -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(prefix) and contains in line:
            return shlex.split(line.split("  #")[0])
    raise AssertionError(f"no README line starts with {prefix!r} and contains {contains!r}")


@pytest.mark.slow
def test_readme_torchrun_line_runs_on_two_cpu_processes(tmp_path):
    argv = readme_line("torchrun --nproc_per_node 2", "baseline:pixels")
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert exe, "torchrun is installed with torch"
    env = {**os.environ, "PAIRSCOUT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([exe, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) >= 2, entries  # one merged entry per model, written by rank 0
    assert "64 images" in proc.stderr or "64 images" in proc.stdout


@pytest.mark.parametrize("module", ["pairscout", "pairscout.cli"])
def test_python_m_entry_points(module):
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "pairscout" in proc.stdout
