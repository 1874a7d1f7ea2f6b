"""rank keeps every metric on the device the user asked for, with the precision the runtime policy picks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import pairscout.metrics as M
import pairscout.ranking.verdict as verdict
from pairscout import runtime
from pairscout.errors import PairscoutError
from pairscout.ranking import RankSettings, rank

ZOOS = ("baseline:pixels,baseline:random-net", "baseline:tfidf,baseline:random")


def _tensors(args, kw):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, list | tuple):
            out += [t for t in a if isinstance(t, torch.Tensor)]
        elif isinstance(a, dict):
            out += [t for t in a.values() if isinstance(t, torch.Tensor)]
    return out


@pytest.fixture
def spies(monkeypatch):
    """Every entry point of the metrics phase: the estimation pass (its engine's precision), its linear sums, Gram
    tiles and neighbour search (the dtype their products run in), the verdict's duplicate check, the unimodal scores."""
    import pairscout.estimation.gram as gram
    import pairscout.estimation.linear as linear
    import pairscout.estimation.neighbours as neighbours
    import pairscout.ranking.core as core

    calls: list = []

    def precision_of(name, args, kw):
        if name == "estimate":
            return kw["engine"].precision
        if name in ("model_sums", "gram_sums"):
            z = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
            return {torch.float32: "float32 products", torch.float64: "float64 products"}[z.dtype]
        return kw.get("precision", "<not passed>")

    for owner, name in [(core, "estimate"), (linear, "model_sums"), (gram, "gram_sums"), (neighbours, "search"),
                        (verdict, "near_duplicates"), (M, "knn_accuracy")]:
        real = getattr(owner, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append((_name, [t.device for t in _tensors(args, kw)], precision_of(_name, args, kw)))
            return _real(*args, **kw)

        monkeypatch.setattr(owner, name, spy)
    asked: list = []
    real_pick = runtime.pick_device

    def pick(requested=None):
        asked.append(requested)
        return real_pick(requested)

    monkeypatch.setattr(runtime, "pick_device", pick)
    return calls, asked, real_pick


@pytest.mark.parametrize("policy", ["float32", "tf32"])
def test_metrics_run_on_the_requested_device_with_the_policys_precision(cpu, tmp_path, monkeypatch, spies, policy):
    calls, asked, real_pick = spies
    monkeypatch.setattr(runtime, "metric_precision", lambda device: policy)  # the policy rank must follow
    res = rank(*ZOOS, "generated", n=40, settings=RankSettings(permutations=9), cache_dir=tmp_path / "c",
               encode_settings=cpu, out=tmp_path / "run", plots=False)
    assert asked and asked[0] == "cpu"  # resolved once from the user's --device
    want = real_pick("cpu")
    names = {c[0] for c in calls}
    assert {"estimate", "model_sums", "gram_sums", "search", "near_duplicates", "knn_accuracy"} <= names, names
    assert sum(c[0] == "estimate" for c in calls) == 1  # one pass: values, intervals, nulls and the verdict's replicates
    for name, devices, precision in calls:
        assert devices and all(d == want for d in devices), (name, devices)
        if name in ("estimate", "near_duplicates"):
            assert precision == policy, (name, precision)  # every CKA product: the policy's precision
        if name in ("model_sums", "gram_sums"):
            assert precision == "float32 products", (name, precision)
    meta = json.loads((tmp_path / "run" / "rank.json").read_text())
    assert meta["settings"]["precision"] == "auto" and meta["metric_precision"] == policy
    assert meta["device"] == str(want)
    assert res.pairs["cka_linear"].between(0, 1).all()


def test_an_explicit_precision_overrides_the_policy(cpu, tmp_path, monkeypatch, spies):
    calls, _, _ = spies
    monkeypatch.setattr(runtime, "metric_precision", lambda device: "float32")
    rank(*ZOOS, "generated", n=40, settings=RankSettings(permutations=0, ci_groups=0, precision="float64"),
         cache_dir=tmp_path / "c", encode_settings=cpu, plots=False)
    assert {p for name, _, p in calls if name == "estimate"} == {"float64"}
    assert {p for name, _, p in calls if name in ("model_sums", "gram_sums")} == {"float64 products"}


def test_float32_products_stay_close_to_float64(cpu, tmp_path):
    kw = dict(cache_dir=tmp_path / "c", encode_settings=cpu, plots=False)
    a = rank(*ZOOS, "generated", n=60, settings=RankSettings(permutations=0, precision="float64"), **kw).pairs
    b = rank(*ZOOS, "generated", n=60, settings=RankSettings(permutations=0, precision="float32"), **kw).pairs
    a, b = a.sort_values(["vision", "text"]), b.sort_values(["vision", "text"])
    for m in ("cka_linear", "cka_linear_debiased", "cka_rbf"):
        assert float((a[m].to_numpy() - b[m].to_numpy()).__abs__().max()) < 1e-5, m
        assert not (a[m].to_numpy() == b[m].to_numpy()).all() or m == "cka_rbf"  # float32 products really ran


def test_bad_precision_is_a_one_line_error():
    with pytest.raises(PairscoutError) as e:
        RankSettings(precision="half")
    assert "\n" not in str(e.value) and "auto, float64, float32, tf32" in str(e.value)


def test_cli_bad_precision_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pairscout", "rank", "--precision", "fp8", "--rows", "12",
                        "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "fp8" in r.stderr


def test_missing_embeddings_of_probe_and_align_are_encoded_on_the_users_device(tmp_path, monkeypatch):
    import pairscout.embeddings.runner as runner
    from pairscout.align.pairdata import load_embeddings, source_from_zoos

    seen = []
    real = runner.encode
    monkeypatch.setattr(runner, "encode", lambda *a, **kw: seen.append(kw["settings"].device) or real(*a, **kw))
    src = source_from_zoos("baseline:pixels", "baseline:tfidf", "generated", n=16, cache_dir=tmp_path, device="cpu")
    load_embeddings(src, src.spec("pixels", "vision"))
    assert seen == ["cpu"]
