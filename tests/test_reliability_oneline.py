"""Issue 23, "one line, never a traceback": output folders the system refuses, a full disk after the work, hand-edited
result files, bad templates, names matplotlib would read as TeX, tensors that require grad, unknown metrics, and a
generated dataset too large to ever finish."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from pairscout.cli import app
from pairscout.errors import PairscoutError
from tests.conftest import TINY_DATA, TINY_TEXT, TINY_VISION

RANK = ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "40", "--ci-groups", "3",
        "--permutations", "3", "--no-plots", "--workers", "0", "--device", "cpu"]  # fmt: skip


def _one_line(r, *needles: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, exactly one ``error:`` line, naming every needle."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def probed(tiny_run, tmp_path_factory):
    """The tiny rank run with a probe (short), copied so that tests may damage it."""
    run, cache = tiny_run
    r = CliRunner().invoke(app, ["probe", str(run), "--steps", "4", "--top-k", "2", "--bottom-k", "1", "--middle-k", "0",
                                 "--cache-dir", str(cache), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, cache


def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_out_under_a_file_is_refused_before_the_work(runner, tiny_cache, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, [*RANK, "--cache-dir", str(tiny_cache), "--out", str(tmp_path / "afile" / "run")])
    _one_line(r, "afile", "not a folder")
    assert "CKNNA" not in r.output and "mutual k-NN" not in r.output  # refused before ranking, not after


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_refused_write_at_the_end_of_each_command_is_one_line(probed, tmp_path, monkeypatch, err):
    """rank, probe, align and report all write their results last: a full disk or a read-only folder there ends in
    one line naming the file and what to do (simulated: every os.replace into place fails)."""
    run, cache = probed
    work = _copy(run, tmp_path / "run")
    real = os.replace

    def refuse(src, dst, *a, **k):
        if "cache" in str(dst):  # the embedding cache stays writable: the failure is the command's own result
            return real(src, dst, *a, **k)
        raise OSError(err, os.strerror(err), str(src))

    monkeypatch.setattr(os, "replace", refuse)
    runner = CliRunner()
    cmds = {"rank": [*RANK, "--cache-dir", str(cache), "--out", str(tmp_path / "fresh")],
            "probe": ["probe", str(work), "--steps", "2", "--top-k", "2", "--bottom-k", "1", "--middle-k", "0", "--cache-dir", str(cache),
                      "--device", "cpu"],
            "align": ["align", str(work), "--head", "linear", "--steps", "2", "--batch-size", "8", "--out-dim", "8", "--cache-dir", str(cache),
                      "--device", "cpu", "--out", str(tmp_path / "model"), "--no-zero-shot"],
            "report": ["report", str(work), "-o", str(tmp_path / "r.html")]}  # fmt: skip
    for name, args in cmds.items():
        r = runner.invoke(app, args)
        _one_line(r, os.strerror(err), "Fix:")
        line = next(ln for ln in r.output.splitlines() if ln.startswith("error:"))
        assert ".tmp" not in line, (name, line)  # names the user's file, not our temporary one


@pytest.mark.parametrize(("file", "key", "value", "needle"), [
    ("rank.json", "settings", "oops", "settings"),
    ("rank.json", "verdict", 5, "verdict"),
    ("rank.json", "vision_order", {"a": 1}, "vision_order"),
    ("probe.json", "chance", "high", "chance"),
    ("probe.json", "verdict", ["x"], "verdict"),
    ("probe.json", "settings", {"steps": "many"}, "settings.steps"),
])  # fmt: skip
def test_hand_edited_result_files_are_refused_in_one_line(probed, tmp_path, file, key, value, needle):
    run, cache = probed
    work = _copy(run, tmp_path / "run")
    meta = json.loads((work / file).read_text())
    if "." in needle:
        meta[key] = {**meta[key], **value}
    else:
        meta[key] = value
    (work / file).write_text(json.dumps(meta))
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(work), "-o", str(tmp_path / "r.html")])
    _one_line(r, file, needle)
    if file == "rank.json":
        r = runner.invoke(app, ["align", str(work), "--steps", "1", "--cache-dir", str(cache), "--device", "cpu"])
        _one_line(r, file, needle)


def test_whole_json_of_another_shape_is_refused(probed, tmp_path):
    work = _copy(probed[0], tmp_path / "run")
    (work / "rank.json").write_text("[1, 2, 3]")
    r = CliRunner().invoke(app, ["report", str(work)])
    _one_line(r, "rank.json")


@pytest.mark.parametrize("tpl", ["{c} {x}", "{c} {0}", "a {c} {", "{c} }"])
def test_templates_with_other_fields_are_one_line(tpl):
    from pairscout.align.model import _check_templates

    with pytest.raises(PairscoutError, match="template") as e:
        _check_templates([tpl])
    assert "\n" not in str(e.value)
    assert _check_templates(["a {{literal}} {c}"]) == ["a {{literal}} {c}"]


def test_names_that_look_like_tex_are_printed_not_parsed(tmp_path):
    import pandas as pd

    from pairscout import plots

    names = ["model$^$", "a$b", "x^2_$\\frac$"]
    m = pd.DataFrame([[0.1, 0.2, 0.3]] * 3, index=names, columns=names)
    p = plots.render(plots.heatmap(m, "heat $^$"), tmp_path, "h")
    assert "model$^$" in p.svg and (tmp_path / "h.png").is_file()
    df = pd.DataFrame({"vision": names, "text": names, "a": [0.1, 0.5, 0.9], "b": [0.2, 0.4, 0.8], "rank": [1, 2, 3]})
    p = plots.render(plots.metric_scatter(df, "a", "b", xlabel="$x^", ylabel="y$"), None, "s")
    assert "x^2_$" in p.svg


def test_measure_on_a_tensor_that_requires_grad():
    import warnings

    from pairscout.metrics import MEASURES, measure

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randn(50, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even torch's "requires_grad=True to a scalar" warning
        for name in MEASURES:  # matching went through numpy and raised
            assert measure(name, x, y) == pytest.approx(measure(name, x.detach(), y), abs=1e-12), name


def test_matrix_of_an_unknown_metric(tiny_run):
    from pairscout.errors import MetricError
    from pairscout.ranking import RankResult

    res = RankResult.load(tiny_run[0])
    with pytest.raises(MetricError, match="no metric 'nope'.*cka_linear"):
        res.matrix("nope")
    assert res.matrix("cka_linear").shape == (2, 2)


def test_a_generated_set_too_large_to_finish_is_refused_at_once(runner):
    r = runner.invoke(app, ["rank", "--n", "1000000000", "--no-plots"])
    _one_line(r, "n=1,000,000,000", "--data")
