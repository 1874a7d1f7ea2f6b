"""The house: API == CLI, the metric registry, sources, output conventions (help, version, tables, progress, errors)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_DATA, TINY_TEXT, TINY_VISION

import pairscout
from pairscout.cli import app
from pairscout.ranking import RankSettings

COMMANDS = [["encode"], ["rank"], ["probe"], ["align"], ["report"], ["zero-shot"], ["zoo", "list"], ["zoo", "show"], ["cache", "list"], ["cache", "clear"]]


def test_api_and_cli_give_the_same_dataset_cache_and_results(runner, cpu, tmp_path):
    cache = tmp_path / "cache"
    settings = RankSettings(ci_groups=3, permutations=3)
    api = pairscout.rank(TINY_VISION, TINY_TEXT, TINY_DATA, n=30, settings=settings, encode_settings=cpu, cache_dir=cache)
    entries = sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))
    stamps = {p: (cache / p).stat().st_mtime_ns for p in entries}
    r = runner.invoke(app, ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "30",
                            "--ci-groups", "3", "--permutations", "3", "--cache-dir", str(cache), "--device", "cpu", "--workers", "0",
                            "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    assert cli["meta"]["settings"]["dataset_fingerprint"] == api.meta["settings"]["dataset_fingerprint"]
    assert cli["meta"]["dataset"]["n"] == 30 == len(api.pairs) // len(api.pairs) * api.meta["settings"]["n"]
    assert sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors")) == entries  # no new cache entry
    assert {p: (cache / p).stat().st_mtime_ns for p in entries} == stamps  # served from the cache
    primary = api.primary
    assert [(p["vision"], p["text"]) for p in cli["pairs"]] == list(zip(api.pairs["vision"], api.pairs["text"], strict=True))
    assert [p[primary] for p in cli["pairs"]] == pytest.approx(api.pairs[primary].tolist(), rel=1e-12)


def test_generated_n_renders_n_rows_and_a_spec_seed_wins():
    from pairscout.resolve import resolve_data

    a = resolve_data("generated", n=25)
    assert len(a) == 25 and a.describe()["format"] == "generated" and "n=25" in a.source
    assert resolve_data("generated:seed=3", n=5, seed=0).fingerprint == resolve_data("generated:seed=3,n=5").fingerprint
    assert resolve_data("generated", n=5, seed=1).fingerprint != resolve_data("generated", n=5, seed=0).fingerprint


def test_registry_is_the_one_vocabulary():
    from pairscout.metrics import MEASURES, measure, pair_metric
    from pairscout.metrics.registry import DEFAULT_MEASURES, label

    # pinned: a record's default flag changing is a change of what every rank computes (README, demo figures)
    assert DEFAULT_MEASURES == ("cka_linear", "cka_linear_debiased", "cka_rbf", "mutual_knn", "cknna")
    assert tuple(RankSettings().metrics) == DEFAULT_MEASURES
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=g, dtype=torch.float64), torch.randn(60, 5, generator=g, dtype=torch.float64)
    for name, rec in MEASURES.items():
        assert rec.label and rec.reference and rec.direction in ("higher", "lower") and rec.cost in ("cheap", "moderate", "expensive")
        assert label(name) == rec.label
        opts = {"k": 5, "sigma_frac": 1.0}
        single = measure(name, x, y, **opts)
        allp = float(pair_metric(name, [x], [y], **rec.kwargs(opts))[0, 0])
        assert single == pytest.approx(allp, abs=1e-9), name
        lo, hi = rec.range
        assert lo - 1e-9 <= single <= hi + 1e-9
    assert measure("cka_linear", x, 2 * x) == pytest.approx(1.0)
    from pairscout.errors import MetricError

    with pytest.raises(MetricError, match="unknown pair metric"):
        measure("nope", x, y)


def test_every_measure_is_computed_by_the_one_dispatcher(monkeypatch):
    """pair_metric runs the registry record's function (the only name -> function table), with the options the
    record takes; measure is that value for one pair; the estimation pass's per-subset measures come from it too."""
    import dataclasses

    from pairscout.estimation import estimate
    from pairscout.metrics import MEASURES, Preprocess, measure, pair_metric, registry

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, d, generator=g, dtype=torch.float64) for d in (5, 7)]
    ys = [torch.randn(40, 4, generator=g, dtype=torch.float64)]
    opts = {"k": 5, "sigma_frac": 0.8, "preprocess": Preprocess(), "precision": "float64"}
    for name, rec in MEASURES.items():
        if name == "matching":
            continue  # the same path, slower
        got = pair_metric(name, xs, ys, **opts)
        assert torch.equal(got, rec.all_pairs(xs, ys, **rec.kwargs(opts), **({"precision": "float64"} if rec.takes_precision else {}))), name
        assert measure(name, xs[1], ys[0], **opts) == float(pair_metric(name, [xs[1]], ys, **opts)[0, 0]), name
    calls = []

    def spy(a, b, **kw):
        calls.append(kw)
        return torch.full((len(a), len(b)), 0.25, dtype=torch.float64)

    monkeypatch.setitem(MEASURES, "svcca", dataclasses.replace(MEASURES["svcca"], all_pairs=spy))
    assert measure("svcca", xs[0], ys[0], k=3, keep=0.9) == 0.25 and calls == [{"keep": 0.9}]
    est = estimate(xs, ys, ["svcca"], groups=3, permutations=0)
    assert len(calls) == 1 + 1 + 3 and torch.equal(est.values["svcca"], torch.full((2, 1), 0.25, dtype=torch.float64))
    assert registry.get("svcca").all_pairs is spy


def test_a_sharded_engine_runs_the_record_s_sharded_form(monkeypatch):
    """The engine, not the caller, picks the row-sharded form: its precision is injected, a row mask is cut to this
    process's rows, and a measure without a sharded form gathers the rows (one process here: the local rows)."""
    import dataclasses

    from pairscout.estimation import Engine, plain
    from pairscout.metrics import MEASURES, pair_metric

    g = torch.Generator().manual_seed(2)
    xs, ys = [torch.randn(30, 4, generator=g, dtype=torch.float64)], [torch.randn(30, 3, generator=g, dtype=torch.float64)]
    seen = []

    def spy(a, b, **kw):
        seen.append(([z.shape[0] for z in a], kw))
        return torch.zeros(len(a), len(b), dtype=torch.float64)

    monkeypatch.setitem(MEASURES, "cka_linear", dataclasses.replace(MEASURES["cka_linear"], sharded=spy))
    eng = Engine(torch.device("cpu"), "float32", 60, 30, 60, 2)  # this process: global rows 30..59 of 60
    rows = torch.zeros(60, dtype=torch.bool)
    rows[40:] = True
    pair_metric("cka_linear", xs, ys, engine=eng, rows=rows)
    assert seen == [([20], {"precision": "float32"})]
    pair_metric("cka_linear", xs, ys, engine=eng, precision="float64")
    assert seen[-1] == ([30], {"precision": "float64"})
    assert len(seen) == 2 and torch.equal(pair_metric("cka_linear", xs, ys, engine=plain()), MEASURES["cka_linear"].all_pairs(xs, ys, precision="float64"))
    assert len(seen) == 2  # one process: the plain form
    assert torch.equal(pair_metric("svcca", xs, ys, engine=eng), pair_metric("svcca", xs, ys))


def test_register_source_extends_the_one_list():
    from pairscout.encoders import build_encoder, register_source
    from pairscout.errors import ZooError
    from pairscout.zoo.spec import SOURCES, EncoderSpec

    with pytest.raises(ZooError, match="unknown source prefix"):
        EncoderSpec(id="house-test:x", modality="text")
    register_source("house-test", lambda spec: ("built", spec.id))
    assert "house-test" in SOURCES
    assert build_encoder(EncoderSpec(id="house-test:x", modality="text")) == ("built", "house-test:x")


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_short_help(runner, cmd):
    r = runner.invoke(app, [*cmd, "-h"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_version_and_verbose_convention(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"pairscout {pairscout.__version__}"
    r = runner.invoke(app, ["rank", "-h"])
    assert "--verbose" in r.output and "-v" in r.output and "--vision-zoo" in r.output
    r = runner.invoke(app, ["rank", "-v", "baseline:pixels", "--n", "0"])
    assert r.exit_code != 0  # -v is --verbose (a flag): 'baseline:pixels' is then an unexpected argument


def test_error_text_keeps_brackets(runner, tmp_path):
    zoo = tmp_path / "z.toml"
    zoo.write_text('name = "z"\n')
    r = runner.invoke(app, ["zoo", "show", str(zoo)])
    assert r.exit_code == 2
    assert "[[encoder]]" in r.output  # rich markup would have eaten it
    assert sum(line.startswith("error:") for line in r.output.splitlines()) == 1


def test_rank_table_fits_100_columns_with_full_names(tiny_run):
    from rich.console import Console

    from pairscout.cli.rank import rank_table
    from pairscout.ranking import RankResult

    res = RankResult.load(tiny_run[0])
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(rank_table(res, 10))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for name in ("random-vision", "random-text", "tfidf"):
        assert name in text
    assert " p " in text or "│ p" in text or " p\n" in text
    assert "±" in text
    wide = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    wide.print(rank_table(res, 10, wide=True))
    assert "mutual k-NN" in wide.export_text() and "mutual k-NN" not in text


def test_zoo_show_fits_100_columns_with_whole_ids(runner, monkeypatch):
    """At 100 columns every id of the shipped zoos is on one line, and a column no row fills is left out."""
    from rich.console import Console

    from pairscout.cli import _ui as ui
    from pairscout.zoo.registry import get_zoo

    monkeypatch.setenv("COLUMNS", "100")  # an explicit COLUMNS is obeyed, not widened for a pipe
    shown = {}
    for name in ("offline", "standard"):
        console = Console(width=100, highlight=False, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        monkeypatch.setattr(ui, "out", console)
        r = runner.invoke(app, ["zoo", "show", name])
        assert r.exit_code == 0, r.output
        shown[name] = console.export_text()
        lines = shown[name].splitlines()
        assert max(len(line) for line in lines) <= 100
        for e in get_zoo(name).encoders:
            assert any(e.id in line for line in lines), e.id
    assert "revision" not in shown["offline"]  # no offline encoder pins one
    assert "revision 8b3219a92973" in shown["standard"]


def test_align_says_which_pair_in_one_line(runner, tiny_run, tmp_path):
    """align names the pair it trains and why in one line, not the rank run's verdict paragraph again."""
    run, cache = tiny_run
    verdict = json.loads((run / "rank.json").read_text())["verdict"]
    (v, t), n_tied = verdict["pair"], len(verdict["tied"])
    common = ["--steps", "2", "--batch-size", "8", "--out-dim", "8", "--head", "linear", "--cache-dir", str(cache), "--device", "cpu",
              "--no-zero-shot"]  # fmt: skip
    r = runner.invoke(app, ["align", str(run), *common, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if line.startswith("aligning")]
    assert len(said) == 1 and said[0].startswith(f"aligning the verdict's pair {v} x {t} of {run}: ranked first"), r.output
    assert ("no better than shuffled pairings" in said[0]) == (verdict["above_chance"] is False)
    assert (f"tied with {n_tied} other pair" in said[0] and f"`pairscout probe {run}`" in said[0]) if n_tied else "tied" not in said[0]
    assert verdict["reason"].split(". ")[0] not in r.output  # the paragraph is rank's to print
    table = r.output[r.output.index("Recall@1"):]
    assert "final loss" in table and "scale t" in table and "Recall@10" in table  # the loss below, not under "text -> image"
    assert "final loss / scale t" not in r.output
    other = ("pixels", "tfidf") if (v, t) != ("pixels", "tfidf") else ("random-vision", "tfidf")
    r = runner.invoke(app, ["align", str(run), "--pair", ",".join(other), *common, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if line.startswith("aligning")]
    assert said == [f"aligning {other[0]} x {other[1]} (--pair); the verdict of {run} is {v} x {t}"]
    r = runner.invoke(app, ["align", str(run), "--pair", "nosuch,tfidf", *common, "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "nosuch" in r.output and "aligning" not in r.output  # no claim before the error


def test_progress_lines_when_not_a_terminal(runner, tiny_run):
    run, cache = tiny_run
    r = runner.invoke(app, ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "40",
                            "--cache-dir", str(cache), "--ci-groups", "3", "--permutations", "3", "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    import re

    stamped = [line for line in lines if re.match(r"^\d\d:\d\d:\d\d ", line)]
    assert any("linear CKA: per-group products" in line and line.endswith("done") for line in stamped)  # the estimation pass's phases
    assert any(": null" in line for line in stamped)
    assert not any("\r" in line for line in lines)  # no progress bars redrawn in a log


def test_run_folder_argument_and_old_run_option(runner, tiny_run, tmp_path):
    run, cache = tiny_run
    common = ["--cache-dir", str(cache), "--top-k", "1", "--bottom-k", "1", "--middle-k", "0", "--steps", "5", "--out-dim", "8",
              "--batch-size", "8", "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, ["probe", str(run), *common, "--out", str(tmp_path / "p1")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", "--run", str(run), *common, "--out", str(tmp_path / "p2")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "p1" / "probe.json").read_text())["pairs"]
    b = json.loads((tmp_path / "p2" / "probe.json").read_text())["pairs"]
    assert [(x["vision"], x["text"], x["mean_r1"]) for x in a] == [(x["vision"], x["text"], x["mean_r1"]) for x in b]
    r = runner.invoke(app, ["probe", str(run), "--run", str(tmp_path)])
    assert r.exit_code == 2 and "two run folders" in r.output
    r = runner.invoke(app, ["align", str(run), "--pair", "pixels,tfidf", "--steps", "3", "--batch-size", "8", "--out-dim", "8", "--head", "linear",
                            "--cache-dir", str(cache), "--device", "cpu", "--no-zero-shot", "-o", str(tmp_path / "m")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "config.json").is_file() and not (tmp_path / "m" / "train" / "checkpoints").exists()


def test_report_out_and_old_output_spelling(runner, tiny_run, tmp_path):
    run, _ = tiny_run
    for flag, name in (("-o", "a.html"), ("--out", "b.html"), ("--output", "c.html")):
        r = runner.invoke(app, ["report", str(run), flag, str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / name).read_text().startswith("<!")


def test_cache_clear(runner, tmp_path, cpu):
    cache = tmp_path / "cache"
    pairscout.rank("baseline:pixels", "baseline:random-text,baseline:tfidf", TINY_DATA, n=20, settings=RankSettings(ci_groups=0, permutations=0),
                   encode_settings=cpu, cache_dir=cache)  # fmt: skip
    assert len(list(cache.glob("*/*.safetensors"))) == 3
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--model", "baseline:tfidf"])
    assert r.exit_code == 0, r.output
    assert "removed 1 entry" in r.output and len(list(cache.glob("*/*.safetensors"))) == 2
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "--yes" in r.output and len(list(cache.glob("*/*.safetensors"))) == 2  # a log cannot confirm
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--dry-run"])
    assert r.exit_code == 0 and "would remove 2 entries" in r.output and len(list(cache.glob("*/*.safetensors"))) == 2
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--yes"])
    assert r.exit_code == 0 and not list(cache.glob("*/*.safetensors"))


def test_training_defaults_are_one_set():
    from pairscout.align.train_config import DEFAULT_STEPS, TrainConfig
    from pairscout.cli.align import TRAIN

    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.total_steps(10_000), DEFAULT_STEPS) == (256, 200, 200)
    assert TRAIN == cfg
    import inspect

    from pairscout.align.model import align

    assert inspect.signature(align).parameters["keep_checkpoint"].default is False


def test_readme_measures_table_matches_the_registry():
    from pathlib import Path

    from pairscout.metrics import MEASURES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, rec in MEASURES.items():
        assert f"| `{name}` | {rec.label} |" in readme, name
    assert "-v standard" not in readme and "--run runs/demo" not in readme


def test_prose_wraps_at_a_terminal_and_stays_one_line_in_a_file(monkeypatch):
    """The verdict and other prose: word-wrapped at a terminal's width (no word cut by the terminal), one literal,
    greppable line when stderr is a file or pipe."""
    import io

    from rich.console import Console

    from pairscout.cli import _ui as ui

    text = "verdict: " + " ".join(f"word{i}" for i in range(40))
    tty = io.StringIO()
    monkeypatch.setattr(ui, "err", Console(file=tty, width=60, force_terminal=True, highlight=False, color_system=None))
    ui.say(text)
    lines = tty.getvalue().splitlines()
    assert len(lines) > 1 and max(map(len, lines)) <= 60 and " ".join(lines).split() == text.split()
    pipe = io.StringIO()
    monkeypatch.setattr(ui, "err", Console(file=pipe, width=60, highlight=False))
    ui.say(text)
    assert pipe.getvalue().splitlines() == [text]
