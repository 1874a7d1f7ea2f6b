"""The command line through typer's CliRunner: output, exit codes, one-line errors."""

from __future__ import annotations

import json

from pairscout.cli import app

SMALL = ["--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:random,baseline:tfidf", "--data", "generated:n=12,seed=0,size=32", "--device", "cpu", "--workers", "0"]


def test_zoo_list_and_show(runner):
    r = runner.invoke(app, ["zoo", "list"])
    assert r.exit_code == 0, r.output
    assert "offline" in r.output and "standard" in r.output
    r = runner.invoke(app, ["zoo", "show", "standard"])
    assert r.exit_code == 0, r.output
    assert "dinov2" in r.output.lower()


def test_encode_json_then_cache_hit(runner, tmp_path):
    args = ["encode", *SMALL, "--cache-dir", str(tmp_path), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["failures"] == {}
    assert summary["embeddings"]["pixels"]["n"] == 12
    assert summary["dataset"]["n"] == 12
    entries = list(tmp_path.glob("*/*.safetensors"))
    assert len(entries) == 3
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    r = runner.invoke(app, args)
    assert r.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps  # served from the cache, nothing rewritten
    r = runner.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0 and "baseline:tfidf" in r.output


def test_failing_model_exits_nonzero_but_keeps_the_others(runner, tmp_path):
    args = ["encode", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:random,hf:pairscout-tests/nope",
            "--data", "generated:n=8,seed=0,size=32", "--device", "cpu", "--workers", "0", "--cache-dir", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert "1 model(s) failed" in r.output
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2


def test_bad_inputs_are_one_line_errors(runner, tmp_path):
    cases = [
        (["encode", "--data", str(tmp_path / "nope.csv")], "nope.csv"),
        (["encode", "--vision-zoo", "zz:model"], "unknown source prefix"),
        (["zoo", "show", "nosuch"], "no zoo named"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output
        assert "Traceback" not in r.output
        assert sum(1 for line in r.output.splitlines() if line.startswith("error:")) == 1


def test_skip_bad_reports_and_continues(runner, tmp_path):
    from PIL import Image

    for name, colour in (("a", "red"), ("b", "blue")):  # two different images: constant pixels are a failed model
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.png")
    (tmp_path / "c.png").write_bytes(b"broken")
    (tmp_path / "m.csv").write_text("image,caption\na.png,one\nb.png,two\nc.png,three\n")
    base = ["encode", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:random", "--data", str(tmp_path / "m.csv"),
            "--device", "cpu", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "c.png" in r.output and "--skip-bad" in r.output
    r = runner.invoke(app, [*base, "--skip-bad", "--json"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 bad image" in r.output
    assert json.loads(r.stdout)["dataset"]["n"] == 2
