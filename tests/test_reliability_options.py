"""Issue 23, nothing silently wrong: every numeric option has a declared valid range (pairscout.bounds.RANGES),
checked in one place for the CLI and the API; a value outside it is one line naming the option (exit 2)."""

from __future__ import annotations

import math

import pytest
import typer

from pairscout.bounds import RANGES, Range, check
from pairscout.cli import app
from pairscout.errors import PairscoutError


def _numeric_options():
    cmd = typer.main.get_command(app)
    out = []

    def walk(c, path):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                walk(sub, [*path, name])
            return
        for p in c.params:
            ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            if ann in (int, float) and getattr(p, "opts", None):
                out.append((tuple(path), tuple(p.opts), ann))

    walk(cmd, [])
    return out


NUMERIC = _numeric_options()


def _bad(r: Range):
    """A value just outside the range."""
    if r.low is not None:
        v = r.low if r.low_open else r.low - 1
        if v in r.also:
            v = r.low - 1
        return int(v) if r.kind is int else float(v)
    if r.high is not None:
        return int(r.high + 1) if r.kind is int else float(r.high) + 1
    return "nan"


def test_every_numeric_cli_option_has_a_declared_range():
    assert len(NUMERIC) > 30
    missing = [(c, o) for c, o, _ in NUMERIC if not any(x in RANGES for x in o)]
    assert not missing, missing


def _option(opts):
    return next(x for x in opts if x in RANGES)


CASES = [(c, _option(o)) for c, o, _ in NUMERIC if any(x in RANGES for x in o)]


@pytest.mark.parametrize(("command", "option"), CASES, ids=[f"{' '.join(c)} {o}" for c, o in CASES])
def test_every_numeric_cli_option_out_of_range_is_one_line(runner, tmp_path, command, option):
    bad = _bad(RANGES[option])
    rest = ["x.png", "--model", str(tmp_path), "--classes", "a,b"] if command == ("zero-shot",) else ["--cache-dir", str(tmp_path)]
    r = runner.invoke(app, [*command, option, str(bad), *rest])
    assert r.exit_code == 2, (command, option, bad, r.output)
    assert option in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize(("option", "value"), [("--grad-clip", -1.0), ("--ci-groups", 1), ("--seed", -1), ("--lr", float("nan")),
                                               ("--test-fraction", 1.0), ("--warmup", 1.0), ("--epochs", 0.0), ("--knn-k", 0),
                                               ("--batch-size", True), ("--steps", 2.5), ("--seed", 2**40)])  # fmt: skip
def test_the_named_cases_are_refused(option, value):
    with pytest.raises(PairscoutError, match=option):
        check(option, value)


def test_api_settings_use_the_same_table():
    from pairscout.align.train_config import TrainConfig
    from pairscout.embeddings.runner import EncodeSettings
    from pairscout.errors import TrainError
    from pairscout.evaluation.result import ProbeSettings
    from pairscout.ranking import RankSettings

    with pytest.raises(TrainError, match="--grad-clip"):
        TrainConfig(grad_clip=-1)
    assert TrainConfig(grad_clip=None).grad_clip is None and TrainConfig(grad_clip=0).grad_clip == 0
    with pytest.raises(PairscoutError, match="--ci-groups"):
        RankSettings(ci_groups=1)
    assert RankSettings(ci_groups=0).ci_groups == 0
    with pytest.raises(PairscoutError, match="--seed"):
        RankSettings(seed=-1)
    with pytest.raises(PairscoutError, match="--test-fraction"):
        ProbeSettings(test_fraction=0)
    with pytest.raises(PairscoutError, match="--steps"):
        ProbeSettings(steps=None)  # ProbeSettings.steps is an int: None is not "the default" there
    with pytest.raises(PairscoutError, match="--workers"):
        EncodeSettings(num_workers=-1)
    with pytest.raises(TrainError, match="--min-lr"):
        TrainConfig(min_lr=2.0)


def test_api_arguments_use_the_same_table():
    from pairscout.data import load_dataset
    from pairscout.resolve import resolve_data

    with pytest.raises(PairscoutError, match="--seed"):
        resolve_data("generated:size=32", n=10, seed=-1)
    with pytest.raises(PairscoutError, match="--n"):
        resolve_data("generated:size=32", n=0)
    ds = load_dataset("generated:n=10,size=32")
    with pytest.raises(PairscoutError, match="--test-fraction"):
        ds.split(1.5)


def test_ranges_describe_themselves():
    assert RANGES["--warmup"].describe() == "a finite number in [0, 1)"
    assert RANGES["--ci-groups"].describe().startswith("an integer >= 2 (or 0)")
    assert not RANGES["--lr"].holds(math.inf) and RANGES["--lr"].holds(None)


def test_a_seed_inside_a_generated_spec_has_the_same_range():
    from pairscout.data import load_dataset

    with pytest.raises(PairscoutError, match="seed=-1"):
        load_dataset("generated:n=5,seed=-1,size=32")
