"""One device policy (pairscout.runtime) behind every stage's --device."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pairscout.errors import PairscoutError
from pairscout.runtime import default_workers, metric_precision, pick_device


def test_names_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device(None).type in ("cpu", "cuda", "mps")
    assert pick_device("auto") == pick_device(None)
    assert default_workers() >= 1
    assert metric_precision(torch.device("cpu")) == "float64"
    assert metric_precision(torch.device("cuda")) == "float32"


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", ""])
def test_bad_names_are_one_line_errors(bad):
    if bad == "":
        assert pick_device(bad) == pick_device(None)  # empty means the default, as None
        return
    with pytest.raises(PairscoutError) as e:
        pick_device(bad)
    assert "\n" not in str(e.value) and "auto, cpu, cuda, cuda:N or mps" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda():
    with pytest.raises(PairscoutError, match="CUDA is not available"):
        pick_device("cuda:0")


@pytest.mark.parametrize("command", ["encode", "rank"])
def test_cli_bad_device_exits_2_without_traceback(command, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pairscout", command, "--device", "gpu", "--vision-zoo", "baseline:pixels",
                        "--text-zoo", "baseline:tfidf", "--rows", "12", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "gpu" in r.stderr
