"""Issue 23, "the new user's run": what a first run through the README showed, each a case of a class.

A rank without --out saves and says where; plot labels name the markers their lines reach; the verdict after a probe
does not contradict itself, names each number's pair and reads in words; table footnotes read left to right."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pairscout.cli import app
from tests.conftest import TINY_DATA, TINY_TEXT, TINY_VISION


# --- a rank without --out --------------------------------------------------------------------------------------------
def test_rank_without_out_saves_to_a_new_folder_and_says_so(runner, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRSCOUT_RUNS", str(tmp_path / "runs"))
    args = ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "40", "--ci-groups", "0",
            "--permutations", "0", "--no-plots", "--workers", "0", "--device", "cpu", "--cache-dir", str(tiny_cache)]  # fmt: skip
    r1 = runner.invoke(app, args)
    r2 = runner.invoke(app, args)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((d / "rank.json").is_file() for d in runs)  # a new folder each time, never refused
    assert str(runs[0]) in r1.output and "no --out given" in r1.output
    assert f"next: pairscout probe {runs[0]}" in r1.output


# --- plot labels -----------------------------------------------------------------------------------------------------
def _axes_frac(ax, x, y):
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)


def test_every_label_line_ends_on_the_markers_it_names():
    """The demo's case: five top pairs close together; #1 and #2 were put on #4 / #5 and #3's line went elsewhere."""
    from pairscout import plots

    df = pd.DataFrame({"rank": [1, 2, 3, 4, 5, 7, 9, 11, 15, 16], "vision": [f"v{i}" for i in range(10)],
                       "text": [f"t{i}" for i in range(10)], "group": ["top"] * 5 + ["middle"] * 3 + ["bottom"] * 2,
                       "m": [0.144, 0.142, 0.140, 0.139, 0.137, 0.10, 0.08, 0.07, 0.01, 0.0],
                       "zs": [0.703, 0.707, 0.655, 0.68, 0.66, 0.70, 0.5, 0.4, 0.12, 0.09]})  # fmt: skip
    fig = plots.metric_scatter(df, "m", "zs", highlight=[0, 1, 2, 3, 4], notes={0: "verdict", 1: "tied", 2: "tied"})
    ax = fig.axes[0]
    anns = [a for a in ax.texts if a.get_gid() == "point-label"]
    named = {}
    for a in anns:
        for key in a.get_text().split(", "):
            named[key] = a
    assert sorted(named) == ["#1", "#2", "#3", "#4", "#5"]
    for key, a in named.items():
        row = df[df["rank"] == int(key[1:])].iloc[0]
        px, py = _axes_frac(ax, row["m"], row["zs"])
        assert math.hypot(a.xy[0] - px, a.xy[1] - py) < 0.025, (key, a.xy, (px, py))  # the line ends on this marker
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(a) for a in anns]  # the text, not its leader line
    assert not any(b.overlaps(c) for i, b in enumerate(boxes) for c in boxes[i + 1:])


# --- the verdict after a probe ---------------------------------------------------------------------------------------
def _tied_verdict(above: bool = True):
    from pairscout.ranking.verdict import decide

    est = np.array([[0.150, 0.149], [0.02, 0.01]])
    rng = np.random.default_rng(0)
    reps = est[None] + rng.normal(0, 0.01, (6, 2, 2))
    pairs = pd.DataFrame({"vision": ["A", "A", "B", "B"], "text": ["x", "y", "x", "y"], "m": [0.150, 0.149, 0.02, 0.01],
                          "m_p_holm": [0.001 if above else 0.4] * 4, "m_z": [8.0, 7.9, 1.0, 0.5]})  # fmt: skip
    return decide(pairs, "m", est, reps, ["A", "B"], ["x", "y"], label="metric m")


def test_verdict_at_chance_does_not_also_say_align_takes_it():
    v = _tied_verdict(above=False)
    assert "do not align on this evidence" in v.reason
    assert "align takes this pair" not in v.reason


def test_verdict_after_a_probe_drops_the_advice_to_probe_and_names_each_number():
    from pairscout.ranking.verdict import update_from_probe

    v = _tied_verdict()
    assert ("A", "y") in v.tied and "run pairscout probe on them" in v.reason
    probed = pd.DataFrame({"vision": ["A", "A", "B"], "text": ["x", "y", "y"], "zs_top1": [0.703, 0.707, 0.10]})
    new = update_from_probe(v, probed, "zs_top1", 1000)
    assert "probe on them" not in new.reason and "`" not in new.reason
    assert "zs_top1" not in new.reason and "zero-shot top-1" in new.reason
    assert "0.703 against 0.707 for A x y" in new.reason
    # moved verdict: the probe separates clearly
    probed2 = pd.DataFrame({"vision": ["A", "A"], "text": ["x", "y"], "zs_top1": [0.50, 0.80]})
    moved = update_from_probe(v, probed2, "zs_top1", 1000)
    assert moved.pair == ("A", "y") and "probe on them" not in moved.reason


def test_report_sets_commands_as_code_not_backticks():
    from pairscout.report.build import prose

    html = str(prose("run `pairscout probe runs/<x>` & see"))
    assert "`" not in html and "<code>pairscout probe runs/&lt;x&gt;</code>" in html and "&amp;" in html


# --- terminal tables -------------------------------------------------------------------------------------------------
def test_table_footnotes_read_left_to_right(tiny_run):
    from rich.console import Console

    from pairscout.cli.rank import rank_table
    from pairscout.ranking import RankResult

    con = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    con.print(rank_table(RankResult.load(tiny_run[0]), 5))
    text = con.export_text()
    cap = [ln for ln in text.splitlines() if "value ±" in ln]
    assert cap and cap[0].startswith("value ±"), cap  # not centred into a block
    assert re.search(r"^\S", text.splitlines()[-1])


# --- help, cache list, warnings, messages ----------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["rank", "probe", "align", "encode", "report", "zero-shot"])
def test_help_cuts_no_default_at_80_columns(cmd):
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "pairscout", cmd, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "…" not in r.stdout, r.stdout
    if cmd == "rank":
        assert "mutual_knn, cknna)" in " ".join(r.stdout.split()).replace("│", "").replace("  ", " ") or "cknna)" in r.stdout


def test_cache_list_prints_ids_whole(runner, tmp_path, monkeypatch):
    from pairscout.cli import _ui as ui
    from pairscout.embeddings.cache import EmbeddingCache

    rows = [{"model_id": f"pack:efficientnet-lite{k}", "dataset": "generated", "dataset_fingerprint": "f" * 32, "n": 1000,
             "dim": 1280, "precision": "float16", "tokens": False, "size_mb": 2.4} for k in range(3)]  # fmt: skip
    monkeypatch.setattr(EmbeddingCache, "entries", lambda self: rows)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(ui.out, "width", 80)
    r = runner.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    flat = r.output.replace("│", " ")
    for k in range(3):
        assert f"pack:efficientnet-lite{k}" in flat, r.output


def test_layers_left_out_is_said_once(caplog):
    from pairscout.encoders._common import sweep_blocks
    from pairscout.zoo.spec import EncoderSpec

    spec = EncoderSpec(id="pack:test-once", modality="vision", layers=[-1, -4, -8])
    with caplog.at_level("WARNING"):
        for _ in range(3):  # each encoding pass asks again
            assert sweep_blocks(spec, 6) == [2, 5]
    assert sum("left out" in r.getMessage() for r in caplog.records) == 1


def test_missing_image_named_by_its_line_in_the_file(tmp_path):
    from PIL import Image

    from pairscout.data import load_dataset
    from pairscout.errors import DataError

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("image,caption\n0.png,a\n\n1.png,b\nmissing.png,c\n2.png,d\n")
    ds = load_dataset(str(tmp_path / "m.csv"))
    row = [ds.image_id(i) for i in range(len(ds))].index(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match=r"line 5 of .*m\.csv"):
        ds.load_image(row)
    sub = ds.subset(3, seed=1)  # a view keeps the file's lines
    rows = [i for i in range(len(sub)) if sub.image_id(i).endswith("missing.png")]
    for i in rows:
        assert sub.locate(i).startswith("line 5 of")


def test_wrong_column_fix_is_for_the_command_line(tmp_path):
    from pairscout.data import load_dataset
    from pairscout.errors import DataError

    (tmp_path / "m.csv").write_text("picture,words\na.png,x\n")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "m.csv"))
    assert "image_column=" not in str(e.value) and "rename the columns" in str(e.value)


def test_p_values_are_not_read_beyond_the_fitted_tail():
    import torch

    from pairscout.metrics import calibration as C

    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 4, generator=g)
    xs, ys = [s @ torch.randn(4, 16, generator=g)], [s @ torch.randn(4, 12, generator=g)]
    for metric in ("cka_linear", "cka_linear_debiased", "mutual_knn"):
        c = C.calibrate(xs, ys, metric, n_perm=19, **({"k": 5} if metric == "mutual_knn" else {}))
        assert float(c.p_value.min()) >= C.P_FLOOR, metric
        if metric.startswith("cka"):
            assert float(c.p_value.min()) == C.P_FLOOR, metric  # a perfect pair: at the floor, not 1e-301
        assert float(c.z.min()) > 5


def test_interrupt_says_what_was_kept_and_that_a_rerun_resumes(runner, monkeypatch, tmp_path):
    import pairscout.ranking.core as core

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "rank", stop)
    r = runner.invoke(app, ["rank", "--out", str(tmp_path / "run")])
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "cache" in r.output and "rerun" in r.output and "resume" in r.output


def test_api_rank_progress_true_prints_phases(tiny_cache, cpu, capsys):
    import pairscout
    from pairscout.ranking import RankSettings

    pairscout.rank(TINY_VISION, TINY_TEXT, TINY_DATA, n=24, settings=RankSettings(ci_groups=0, permutations=0), encode_settings=cpu,
                   cache_dir=tiny_cache, plots=False, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d .+ done$", err, re.M), err
