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
    assert "align takes this pair" not in v.reason.replace("`", "")


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


def test_an_aligned_layer_keeps_its_layer_in_every_name():
    from pairscout.zoo.spec import EncoderSpec, shown_name

    spec = EncoderSpec(id="pack:efficientnet-lite0", modality="vision", name="efficientnet-lite0", layers=[-1, -4, 12])
    assert spec.narrowed("12").shown == "efficientnet-lite0 @12"
    assert spec.narrowed("final").shown == "efficientnet-lite0"
    assert shown_name(spec.narrowed("12").to_dict()) == "efficientnet-lite0 @12"  # what the report reads from config.json


@pytest.mark.parametrize(("arg", "modality", "want"), [("all-MiniLM-L6-v2", "text", "pack:all-MiniLM-L6-v2"),
                                                      ("EfficientNet-Lite0", "vision", "pack:efficientnet-lite0"),
                                                      ("efficientnet-lite2,tfidf-missing", "vision", None)])
def test_printed_names_work_as_ids(arg, modality, want):
    from pairscout.errors import ZooError
    from pairscout.zoo.registry import resolve_zoo

    if want:
        assert [s.id for s in resolve_zoo(arg, modality).encoders] == [want]
    else:
        with pytest.raises(ZooError, match="tfidf-missing"):
            resolve_zoo(arg, modality)


def test_an_unknown_bare_name_suggests_the_id():
    from pairscout.errors import ZooError
    from pairscout.zoo.registry import resolve_zoo

    with pytest.raises(ZooError, match="pack:all-MiniLM-L6-v2") as e:
        resolve_zoo("all-MiniLM-L6", "text")
    assert "\n" not in str(e.value)


def test_a_zoo_file_with_a_byte_order_mark(tmp_path):
    from pairscout.zoo.registry import resolve_zoo

    p = tmp_path / "z.toml"
    p.write_bytes(b"\xef\xbb\xbf" + b'name = "z"\n[[encoder]]\nid = "baseline:pixels"\nmodality = "vision"\n')
    assert [s.id for s in resolve_zoo(str(p), "vision").encoders] == ["baseline:pixels"]


# --- make demo -------------------------------------------------------------------------------------------------------
def test_make_demo_writes_no_tracked_file_and_pins_threads():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-n", "demo", "PY=true"], cwd=root, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stdout.splitlines() if "pairscout " in ln]
    assert lines and all("OMP_NUM_THREADS=" in ln for ln in lines)
    report = next(ln for ln in lines if "pairscout report" in ln)
    out = report.split(" -o ")[1].split()[0]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", out], cwd=root, capture_output=True, timeout=60)
    assert tracked.returncode != 0, f"make demo rewrites the tracked {out}"


def test_the_same_runs_give_the_same_page(probed_run, tmp_path, monkeypatch):
    from pairscout.report import build_report

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = build_report([probed_run], tmp_path / "a.html").read_bytes()
    b = build_report([probed_run], tmp_path / "b.html").read_bytes()
    assert a == b and b"2023-11-14" in a


@pytest.fixture(scope="module")
def probed_run(tiny_run):
    from typer.testing import CliRunner

    run, cache = tiny_run
    r = CliRunner().invoke(app, ["probe", str(run), "--steps", "4", "--top-k", "2", "--bottom-k", "1", "--middle-k", "0",
                                 "--cache-dir", str(cache), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run


def test_rank_settings_metrics_as_one_string():
    from pairscout.ranking import RankSettings

    assert list(RankSettings(metrics="cka_linear").metrics) == ["cka_linear"]
    assert list(RankSettings(metrics="cka_linear, mutual_knn").metrics) == ["cka_linear", "mutual_knn"]


def test_tf32_on_cpu_is_recorded_as_what_ran():
    import torch

    from pairscout.runtime import resolve_precision

    assert resolve_precision("tf32", torch.device("cpu")) == "float32"
    assert resolve_precision("tf32", torch.device("cuda")) == "tf32"
    assert resolve_precision("auto", torch.device("cpu")) == "float64"


def test_no_zero_width_interval_from_a_perfect_order_of_five():
    import math

    from scipy.stats import spearmanr

    from pairscout.statistics import fisher_interval

    rho = float(spearmanr([0.1, 0.2, 0.3, 0.4, 0.5], [0.11, 0.5, 0.52, 0.7, 0.71]).statistic)
    for r in (rho, 0.9999999999999999, -0.9999999999999999, 1.0):
        lo, hi = fisher_interval(r, 5)
        assert math.isnan(lo) and math.isnan(hi), r  # undefined, never "+1.00 [+1.00, +1.00]"
    lo, hi = fisher_interval(0.9, 5)
    assert hi - lo > 0.5


def test_one_label_per_row_is_not_a_clustering_problem():
    import torch

    from pairscout.errors import MetricError
    from pairscout.metrics import clustering_quality
    from pairscout.ranking.compute import unimodal
    from pairscout.ranking.settings import RankSettings
    from pairscout.zoo.spec import EncoderSpec

    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    row = unimodal(EncoderSpec(id="baseline:pixels", modality="vision"), x, np.arange(30), RankSettings())
    assert "nmi" not in row and "knn_acc" not in row  # the rank goes on without label measures
    with pytest.raises(MetricError) as e:
        clustering_quality(x, np.arange(30))
    assert "fewer clusters" not in str(e.value) and "each row its own class" in str(e.value)


def test_float64_beyond_float32_is_not_called_nan(tmp_path):
    import torch

    from pairscout.encoders.emb_source import _check_float32_range
    from pairscout.errors import DataError

    with pytest.raises(DataError, match="beyond float32's range") as e:
        _check_float32_range(torch.full((4, 3), 1e200, dtype=torch.float64), tmp_path / "e.npy")
    assert "NaN" not in str(e.value)
    _check_float32_range(torch.ones(4, 3, dtype=torch.float64), tmp_path / "e.npy")  # in range: nothing to say
