"""Fixtures shared by the test modules: the CLI runner, CPU encode settings, tiny zoos and data."""

from __future__ import annotations

import os
import tempfile

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network
os.environ.setdefault("PAIRSCOUT_RUNS", tempfile.mkdtemp(prefix="pairscout-runs-"))  # a rank without --out saves here, not in the repo

#: Weight-free encoders and a small generated dataset: a rank run takes seconds on a CPU.
TINY_VISION = "baseline:pixels,baseline:random-vision"
TINY_TEXT = "baseline:random-text,baseline:tfidf"
TINY_DATA = "generated:size=32"


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def cpu():
    """Encode on the CPU in the main process (no DataLoader workers)."""
    from pairscout.embeddings.runner import EncodeSettings

    return EncodeSettings(device="cpu", num_workers=0)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One embedding cache for the whole session (weight-free encoders only)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cache):
    """A rank run of the tiny zoos on 40 generated rows, written by the CLI: ``(run folder, cache)``."""
    from pairscout.cli import app

    run = tmp_path_factory.mktemp("tiny") / "run"
    r = CliRunner().invoke(app, ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "40",
                                 "--out", str(run), "--cache-dir", str(tiny_cache), "--ci-groups", "3", "--permutations", "3",
                                 "--no-plots", "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, tiny_cache
