"""The run store (:mod:`pairscout.runs`): verdict revisions without one stage rewriting another's file, a run
folder replaced as a whole or not at all, each file read once per process, older run folders still loading."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_DATA, TINY_TEXT, TINY_VISION

from pairscout.cli import app
from pairscout.errors import PairscoutError
from pairscout.ranking.result import RankResult, VerdictRevision, pair_columns
from pairscout.ranking.verdict import Verdict
from pairscout.runs import STORE, RunStore, replace_folder

RANK = ["rank", "--vision-zoo", TINY_VISION, "--text-zoo", TINY_TEXT, "--data", TINY_DATA, "--n", "40", "--ci-groups", "3",
        "--permutations", "3", "--no-plots", "--workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.fixture
def probed(tiny_run, tmp_path, runner):
    """A copy of the session's tiny rank run, probed: ``(run, cache, rank.json bytes before the probe)``."""
    src, cache = tiny_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = (run / "rank.json").read_bytes()
    r = runner.invoke(app, ["probe", str(run), "--cache-dir", str(cache), "--top-k", "2", "--bottom-k", "1", "--middle-k", "0",
                            "--steps", "5", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return run, cache, before


def test_probe_revises_the_verdict_without_touching_rank_json(probed):
    run, _, before = probed
    assert (run / "rank.json").read_bytes() == before  # rank's file is rank's alone
    res = RankResult.load(run)
    assert [r.by for r in res.revisions] == ["rank", "probe"]
    assert isinstance(res.verdict, Verdict) and isinstance(res.rank_verdict, Verdict)
    assert res.rank_verdict.to_dict() == json.loads(before)["verdict"]
    probe = json.loads((run / "probe.json").read_text())
    assert res.verdict.to_dict() == probe["verdict"]  # the current verdict is the probe's revision
    assert probe["rank_run_id"] == res.run_id != ""
    assert res.revisions[-1].rank_run_id == res.run_id
    assert res.recommended()[0] == tuple(res.verdict.pair)


def test_a_new_rank_replaces_the_folder_as_a_whole(probed, runner):
    run, cache, _ = probed
    old_id = RankResult.load(run).run_id
    (run / "align").mkdir()
    (run / "align" / "config.json").write_text("{}")
    r = runner.invoke(app, [*RANK, "--out", str(run), "--cache-dir", str(cache), "--seed", "1", "--force"])
    assert r.exit_code == 0, r.output
    res = RankResult.load(run)
    assert res.run_id != old_id
    assert not (run / "probe.json").exists() and not (run / "verdicts.json").exists() and not (run / "align").exists()
    assert [r.by for r in res.revisions] == ["rank"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".run.")]  # no staging or old folder left behind


def test_a_failed_write_leaves_the_old_run_whole(tiny_run, tmp_path, runner, monkeypatch):
    src, cache = tiny_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    import pairscout.files as io

    real = io.atomic_write_text

    def full_disk(path, text):
        if str(path).endswith("rank.json"):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(io, "atomic_write_text", full_disk)
    r = runner.invoke(app, [*RANK, "--out", str(run), "--cache-dir", str(cache), "--seed", "2", "--force"])
    assert r.exit_code != 0
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing of the new run got in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_a_folder_of_other_files_is_never_replaced(tmp_path, tiny_cache, runner):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    r = runner.invoke(app, [*RANK, "--out", str(mine), "--cache-dir", str(tiny_cache)])
    assert r.exit_code == 2
    assert "holds files but no pairscout run" in r.output and "Traceback" not in r.output
    assert (mine / "thesis.tex").read_text() == "precious"
    with pytest.raises(PairscoutError, match="holds files but no pairscout run"), replace_folder(mine):
        pass


def test_the_store_reads_each_file_once_and_rereads_a_changed_one(probed):
    run, cache, _ = probed
    store = RunStore()
    a, b = store.rank(run), store.rank(run)
    assert a is b and store.reads == 1
    assert store.probe(run) is store.probe(run) and store.reads == 2
    assert store.probe(run.parent) is None
    from pairscout.align.pairdata import source_from_rank

    src = source_from_rank(run, cache_dir=cache)
    spec = next(iter(src.vision.values()))
    e1 = store.embeddings(src.cache, spec, src.dataset.fingerprint)
    e2 = store.embeddings(src.cache, spec, src.dataset.fingerprint)
    assert e1 is e2 and store.reads == 3
    meta = json.loads((run / "rank.json").read_text())
    meta["note"] = "edited"
    (run / "rank.json").write_text(json.dumps(meta))
    assert store.rank(run).meta["note"] == "edited" and store.reads == 4


def test_a_revision_of_another_rank_run_is_ignored(probed):
    run, _, _ = probed
    revs = json.loads((run / "verdicts.json").read_text())
    revs["revisions"][0]["rank_run_id"] = "someone-else"
    (run / "verdicts.json").write_text(json.dumps(revs))
    assert [r.by for r in STORE.rank(run).revisions] == ["rank"]


def test_an_older_run_folder_loads_its_verdict_and_the_probes_revision(tiny_run, tmp_path):
    src, _ = tiny_run
    run = tmp_path / "old"
    shutil.copytree(src, run)
    meta = json.loads((run / "rank.json").read_text())
    meta.pop("run_id")
    rank_v = meta["verdict"]
    moved = {**rank_v, "source": "probe", "reason": "moved by the probe"}
    meta["verdict_rank"], meta["verdict"] = rank_v, moved  # how probe wrote it before revisions existed
    (run / "rank.json").write_text(json.dumps(meta))
    res = RankResult.load(run)
    assert res.run_id == ""
    assert [r.by for r in res.revisions] == ["rank", "probe"]
    assert res.rank_verdict.to_dict() == rank_v and res.verdict.reason == "moved by the probe"


def test_pairs_table_has_the_documented_columns(tiny_run):
    res = RankResult.load(tiny_run[0])
    assert set(pair_columns(res.metrics)) <= set(res.pairs.columns)
    assert list(res.pairs.columns[:1]) == ["rank"]
    rev = VerdictRevision(verdict=res.rank_verdict, by="rank", rank_run_id=res.run_id)
    assert VerdictRevision.from_dict(json.loads(json.dumps(rev.to_dict()))) == rev


def test_a_cache_kept_inside_the_run_folder_survives_a_new_rank(tmp_path, runner):
    run = tmp_path / "run"
    cache = run / "cache"
    args = [*RANK, "--out", str(run), "--cache-dir", str(cache)]
    assert runner.invoke(app, args).exit_code == 0
    entries = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert entries
    r = runner.invoke(app, [*args, "--seed", "3", "--force"])
    assert r.exit_code == 0, r.output
    assert set(entries) <= {p.relative_to(cache) for p in cache.rglob("*") if p.is_file()}  # carried over, not deleted
    assert (run / "rank.json").is_file()
