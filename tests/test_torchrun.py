"""The README's torchrun line, run as a user types it (2 CPU processes, gloo), and `python -m` entry points."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_readme_torchrun_align_equals_one_process(runner, tmp_path, monkeypatch):
    """The README's two lines (a small baseline rank run, then `torchrun ... align` on 2 gloo processes) run as
    typed; the heads they save equal `pairscout align` in one process on the same global batch."""
    from safetensors.torch import load_file

    from pairscout.cli import app

    rank_line = readme_line("pairscout rank --vision-zoo baseline:pixels", "runs/ddp")
    align_line = readme_line("torchrun --nproc_per_node 2 -m pairscout align", "runs/ddp")
    env = {**os.environ, "PAIRSCOUT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pairscout", *rank_line[1:], "--permutations", "0", "--ci-groups", "0", "--no-plots"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    proc = subprocess.run([exe, *align_line[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = tmp_path / "runs" / "ddp" / "align" / "pixels__tfidf"
    bad = subprocess.run([exe, *align_line[1:], "--batch-size", "31", "--out", "odd"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    lines = [ln for ln in (bad.stdout + bad.stderr).splitlines() if ln.startswith("error:")]
    assert bad.returncode != 0 and len(lines) == 1, lines  # one line, from rank 0 only (the others are quiet)
    assert "batch of 31 images does not split over the 2 processes" in lines[0] and "multiple of 2" in lines[0]
    log = json.loads((two / "train" / "train_log.json").read_text())
    assert log["status"] == "finished" and log["step"] == 20

    monkeypatch.setenv("PAIRSCOUT_CACHE", env["PAIRSCOUT_CACHE"])
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, [*align_line[5:], "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    w1, w2 = load_file(tmp_path / "one" / "heads.safetensors"), load_file(two / "heads.safetensors")
    assert w1.keys() == w2.keys() and len(w1) >= 4
    # 20 AdamW steps on 17 M GLU weights: the two runs sum the loss in another order (float32 rounding, 1e-7
    # relative), and Adam's g / sqrt(v) enlarges that in the few weights whose gradient is mostly cancellation;
    # measured: largest difference 4.8e-6 (weights ~0.05), 1e-6 exceeded by 82 of 17 M weights
    diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    assert float(diff.max()) < 2e-5 and float((diff > 1e-6).float().mean()) < 1e-4, (float(diff.max()), int((diff > 1e-6).sum()))
    one_log = json.loads((tmp_path / "one" / "train" / "train_log.json").read_text())
    l1 = [h["loss"] for h in one_log["history"] if "loss" in h]
    l2 = [h["loss"] for h in log["history"] if "loss" in h]
    assert l2 == pytest.approx(l1, rel=1e-6) and l1[-1] != l1[0]
    assert log["metrics"] == pytest.approx(one_log["metrics"], abs=1e-6)  # rank 0 evaluated the same heads
