"""`torchrun ... rank` with the rows sharded over 2 CPU processes (gloo) gives the single-process ranking; a world
larger than the data is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_torchrun import ROOT, readme_line

NEIGHBOUR = ("mutual_knn", "cknna")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PAIRSCOUT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun() -> str:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert exe, "torchrun is installed with torch"
    return exe


@pytest.mark.slow
def test_readme_torchrun_rank_equals_one_process(tmp_path):
    argv = readme_line("torchrun --nproc_per_node 2", " rank ")
    args = argv[argv.index("pairscout") + 1:]
    out = args[args.index("--out") + 1]
    two = subprocess.run([_torchrun(), *argv[1:], "--no-plots"], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one_args = [*args[: args.index("--out")], "--out", "one", *args[args.index("--out") + 2:], "--no-plots"]
    one = subprocess.run([sys.executable, "-m", "pairscout", *one_args], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    a = pd.read_csv(tmp_path / "one" / "pairs.csv").sort_values(["vision", "text"]).reset_index(drop=True)
    b = pd.read_csv(tmp_path / out / "pairs.csv").sort_values(["vision", "text"]).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == 4
    checked = 0
    for c in a.columns:
        if a[c].dtype.kind != "f":
            assert a[c].tolist() == b[c].tolist(), c
            continue
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if c.startswith(NEIGHBOUR) and not c.endswith(("_z", "_p", "_p_holm", "_null", "_null_sd")):
            assert np.array_equal(x, y, equal_nan=True), (c, x, y)  # neighbour metrics and their intervals: exactly
        else:
            assert np.allclose(x, y, rtol=0, atol=1e-8, equal_nan=True), (c, x, y)
        checked += 1
    assert checked >= 30
    m1 = json.loads((tmp_path / "one" / "rank.json").read_text())
    m2 = json.loads((tmp_path / out / "rank.json").read_text())
    assert m2["distributed"]["world_size"] == 2 and m2["distributed"]["rows_per_rank"] == [32, 32]
    assert m1["distributed"]["world_size"] == 1
    assert m1["verdict"]["pair"] == m2["verdict"]["pair"] and m1["verdict"]["tied"] == m2["verdict"]["tied"]


@pytest.mark.slow
def test_torchrun_layer_sweep_equals_one_process(tmp_path):
    """rank --layers under torchrun: the selection rows are gathered, every process runs the same sweep, the metrics
    are sharded over the estimation rows; the table equals one process's."""
    args = ["rank", "--vision-zoo", "baseline:random-net,baseline:pixels", "--text-zoo", "pack:all-MiniLM-L6-v2,baseline:tfidf",
            "--data", "generated:size=32", "--rows", "64", "--layers", "-1,-2", "--permutations", "19", "--ci-groups", "4",
            "--no-plots", "--workers", "0", "--device", "cpu"]  # fmt: skip
    two = subprocess.run([_torchrun(), "--nproc_per_node", "2", "-m", "pairscout", *args, "--out", "two"], cwd=tmp_path,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "pairscout", *args, "--out", "one"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    kw = {"dtype": {"vision_layer": str, "text_layer": str}}
    a = pd.read_csv(tmp_path / "one" / "pairs.csv", **kw).sort_values(["vision", "text"]).reset_index(drop=True)
    b = pd.read_csv(tmp_path / "two" / "pairs.csv", **kw).sort_values(["vision", "text"]).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == 4 and "layer_cka_selection" in a
    for c in a.columns:
        if a[c].dtype.kind != "f":
            assert a[c].tolist() == b[c].tolist(), c  # the same layers chosen
        else:
            assert np.allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=0, atol=1e-8, equal_nan=True), (c, a[c], b[c])
    m1, m2 = (json.loads((tmp_path / d / "rank.json").read_text()) for d in ("one", "two"))
    assert m1["layers"]["estimation_rows"] == m2["layers"]["estimation_rows"] == 32
    assert m2["distributed"]["world_size"] == 2 and m1["verdict"]["pair"] == m2["verdict"]["pair"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROWS_1 = ["rank", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:tfidf", "--rows", "1", "--workers", "0", "--no-plots"]


def test_world_larger_than_the_rows_is_one_line_exit_2(tmp_path):
    """Two processes joined as torchrun joins them (env://): each exits 2 with one line, no traceback."""
    port = str(_free_port())
    procs = []
    for r in (0, 1):
        env = {**_env(tmp_path), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "pairscout", *ROWS_1, "--out", f"o{r}"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    err0 = outs[0][1].strip().splitlines()
    assert len(err0) == 1 and "2 processes" in err0[0] and "1 rows" in err0[0] and "--nproc_per_node" in err0[0], err0
    assert outs[1][1].strip() == ""  # only rank 0 talks
    assert not any("Traceback" in e for _, e in outs)


@pytest.mark.slow
def test_world_larger_than_the_rows_under_torchrun(tmp_path):
    """Under torchrun the same line; the workers exit 2. torchrun itself then prints its ChildFailedError summary
    and exits 1 (its own behaviour for any failed worker, outside pairscout's control)."""
    r = subprocess.run([_torchrun(), "--nproc_per_node", "2", "-m", "pairscout", *ROWS_1, "--out", "o"], cwd=tmp_path,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "1 rows" in lines[0], r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr
    import pairscout

    pkg = str(Path(pairscout.__file__).resolve().parent) + "/"  # the package, not a clone or venv that shares its name
    assert pkg not in "".join(ln for ln in r.stderr.splitlines() if ln.strip().startswith("File "))
