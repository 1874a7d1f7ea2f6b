"""Issue 23, nothing lost: `cache clear` touches only what the cache wrote, an empty filter is refused, and
`report -o` never replaces a file that is not a report (a run's rank.json, a plot, a cache entry, a user's page)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pairscout.cli import app
from pairscout.data import load_dataset
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.housekeeping import clear_cache
from pairscout.embeddings.runner import EncodeSettings, encode
from pairscout.errors import CacheError
from pairscout.zoo.spec import EncoderSpec

SETTINGS = EncodeSettings(device="cpu", batch_size=8, num_workers=0)


def _filled_cache(root):
    """A cache with one pairscout entry, plus the user's own files in its folder."""
    data = load_dataset("generated:n=12,seed=1,size=32")
    cache = EmbeddingCache(root)
    encode(EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8}), data, cache=cache, settings=SETTINGS)
    (entry,) = [e["path"] for e in cache.entries()]
    mine = {
        "plain": root / "notes.txt",
        "st_no_meta": root / "my_vectors" / "feats.safetensors",  # a readable safetensors file without pairscout's metadata
        "beside_entry": root / "baseline_pixels" / "mine.safetensors",
        "key_like": root / "baseline_pixels" / ("0" * 24 + ".safetensors"),  # a key-like name, but not written by the cache
        "parts_like": root / "my.parts" / "keep.txt",
        "in_parts": root / "baseline_pixels" / ("a" * 24 + ".parts") / "mine.txt",
    }
    for p in mine.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".safetensors":
            save_file({"x": torch.ones(3, 2)}, str(p))
        else:
            p.write_text("mine")
    (root / "empty_user_folder").mkdir()
    return cache, entry, mine


def test_cache_list_and_clear_leave_the_users_files(tmp_path, runner):
    root = tmp_path / "cache"
    cache, entry, mine = _filled_cache(root)
    assert [e["path"] for e in cache.entries()] == [entry]  # no "None" row for the user's file
    r = runner.invoke(app, ["cache", "list", "--cache-dir", str(root)])
    assert r.exit_code == 0 and "None" not in r.output, r.output
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(root), "--yes"])
    assert r.exit_code == 0, r.output
    assert "removed 1 entry" in r.output
    assert not (root / entry).exists()
    assert all(p.is_file() for p in mine.values()), [k for k, p in mine.items() if not p.exists()]
    assert (root / "empty_user_folder").is_dir()


def test_clear_removes_an_interrupted_runs_chunks_but_not_other_files(tmp_path):
    root = tmp_path / "cache"
    cache = EmbeddingCache(root)
    parts = root / "baseline_pixels" / ("b" * 24 + ".parts")
    parts.mkdir(parents=True)
    save_file({"index": torch.arange(2), "pooled": torch.ones(2, 3)}, str(parts / "000000000-000000002.safetensors"))
    res = clear_cache(cache)
    assert res.paths == [parts] and not parts.exists()
    parts.mkdir(parents=True)
    save_file({"index": torch.arange(2), "pooled": torch.ones(2, 3)}, str(parts / "000000000-000000002.safetensors"))
    (parts / "mine.txt").write_text("mine")
    clear_cache(cache)
    assert (parts / "mine.txt").is_file() and not (parts / "000000000-000000002.safetensors").exists()


@pytest.mark.parametrize("args", [["--dataset", ""], ["--model", ""], ["--dataset", "  "]])
def test_cache_clear_with_an_empty_filter_is_refused(tmp_path, runner, args):
    root = tmp_path / "cache"
    cache, entry, _ = _filled_cache(root)
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(root), *args])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "empty" in r.output
    assert (root / entry).is_file()
    with pytest.raises(CacheError):
        clear_cache(cache, dataset="")


# --- report -o ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rank.json", "pairs.csv", "pairs.parquet", "models.csv"])
def test_report_never_replaces_a_runs_own_file(tiny_run, runner, name):
    run, _ = tiny_run
    before = (run / name).read_bytes()
    r = runner.invoke(app, ["report", str(run), "-o", str(run / name)])
    assert r.exit_code == 2, r.output
    assert "not a pairscout report" in r.output and len(r.output.strip().splitlines()) == 1
    assert (run / name).read_bytes() == before


def test_report_replaces_its_own_page_but_not_a_users(tiny_run, runner, tmp_path):
    run, _ = tiny_run
    page = tmp_path / "r.html"
    for _ in range(2):  # the second call replaces the first report
        r = runner.invoke(app, ["report", str(run), "-o", str(page)])
        assert r.exit_code == 0, r.output
    mine = tmp_path / "index.html"
    mine.write_text("<!DOCTYPE html><p>my page</p>")
    r = runner.invoke(app, ["report", str(run), "-o", str(mine)])
    assert r.exit_code == 2 and mine.read_text() == "<!DOCTYPE html><p>my page</p>"
    entry = tmp_path / "e.safetensors"
    save_file({"x": torch.from_numpy(np.ones(2, dtype=np.float32))}, str(entry))
    r = runner.invoke(app, ["report", str(run), "-o", str(entry)])
    assert r.exit_code == 2


def test_a_report_from_before_the_generator_marker_is_still_replaced(tiny_run, runner, tmp_path):
    run, _ = tiny_run
    old = tmp_path / "old.html"
    old.write_text("<!DOCTYPE html>\n<html><head><title>t</title></head><body><footer>\n"
                   "<p>pairscout 0.3.0 &middot; generated 2026-01-01 &middot; from runs/demo</p></footer></body></html>\n")
    r = runner.invoke(app, ["report", str(run), "-o", str(old)])
    assert r.exit_code == 0, r.output
    assert 'name="generator" content="pairscout"' in old.read_text()
