"""Issue 23, nothing silently wrong in what is computed and printed: every measure refuses a constant input,
every measure is scale-invariant over the whole float64 range, and `--json` prints valid JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pairscout.cli import app
from pairscout.errors import MetricError
from pairscout.metrics import MEASURES, all_pairs_cka
from pairscout.metrics.registry import measure, pair_metric


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = x @ rng.normal(size=(8, 6)) + 0.5 * rng.normal(size=(60, 6))
    return x, y


@pytest.mark.parametrize("name", list(MEASURES))
def test_every_measure_refuses_a_constant_input(xy, name):
    x, y = xy
    for a, b in ((np.ones_like(x), y), (x, np.full_like(y, 3.0))):
        with pytest.raises(MetricError, match="constant"):
            measure(name, a, b)


@pytest.mark.parametrize("name", list(MEASURES))
@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-30, 1e30, 1e200, 1e300])
def test_every_measure_is_scale_invariant_over_float64(xy, name, scale):
    x, y = xy
    want = measure(name, x, y)
    got = measure(name, x * scale, y)
    assert math.isfinite(got) and got == pytest.approx(want, abs=1e-9), (name, scale, got, want)


def test_all_pairs_entry_points_are_scale_invariant_too(xy):
    x, y = xy
    ref = all_pairs_cka([x], [y])[0, 0]
    got = all_pairs_cka([x * 1e-200, x * 1e200], [y * 1e-250])
    assert np.allclose(got.numpy(), float(ref), atol=1e-12)
    assert np.allclose(pair_metric("cka_rbf", [x * 1e-200], [y], scale_free=True).numpy(),
                       pair_metric("cka_rbf", [x], [y], scale_free=True).numpy(), atol=1e-12)


def test_rank_json_is_valid_json(runner, tmp_path):
    """A NaN (a p-value without permutations, an interval without groups) is null, never a bare NaN."""
    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo", "baseline:tfidf",
                            "--data", "generated:size=32", "--n", "24", "--ci-groups", "0", "--permutations", "0", "--no-plots",
                            "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    text = r.stdout
    payload = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    assert payload


def test_finite_json_replaces_every_non_finite_number():
    from pairscout.cli._ui import finite_json

    got = finite_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": np.float64("nan"), "e": np.int64(3)})
    assert got == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": 3}
    json.dumps(got, allow_nan=False)
