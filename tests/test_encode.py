"""The encoding runner and the embedding cache: hit, miss, resume after a crash, atomic writes."""

from __future__ import annotations

import pytest
import torch

from pairscout.data import load_dataset
from pairscout.embeddings import cache as cache_mod
from pairscout.embeddings.cache import EmbeddingCache, Embeddings, atomic_save
from pairscout.embeddings.runner import EncodeSettings, encode, encode_zoo
from pairscout.encoders import build_encoder
from pairscout.errors import CacheError, DataError
from pairscout.zoo.spec import EncoderSpec

PIXELS = EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8})
RANDOM_TEXT = EncoderSpec(id="baseline:random", modality="text", options={"dim": 16})
SETTINGS = EncodeSettings(device="cpu", batch_size=4, num_workers=0, chunk_batches=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("generated:n=21,seed=3,size=32")


def test_miss_then_hit_does_not_rebuild(tmp_path, data, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    first = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    assert first.pooled.shape == (len(data), 8 * 8 * 3)
    assert cache.entry_path(PIXELS, data.fingerprint).is_file()
    assert not cache.parts_dir(PIXELS, data.fingerprint).exists()

    def boom(spec):  # a hit must not build the encoder at all
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr("pairscout.encoders.build_encoder", boom)
    second = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    assert torch.equal(first.pooled, second.pooled)
    assert second.meta["dataset_fingerprint"] == data.fingerprint
    assert second.meta["model_id"] == "baseline:pixels"


def test_other_data_or_settings_miss(tmp_path, data):
    cache = EmbeddingCache(tmp_path)
    encode(PIXELS, data, cache=cache, settings=SETTINGS)
    sub = data.subset(10, seed=0)
    assert cache.load(PIXELS, sub.fingerprint) is None
    other = EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 4})
    assert cache.load(other, data.fingerprint) is None
    assert cache.load(PIXELS, data.fingerprint, precision="bf16") is None


def test_resume_after_crash_encodes_only_the_rest(tmp_path, data):
    cache = EmbeddingCache(tmp_path)
    reference = encode(PIXELS, data, cache=EmbeddingCache(tmp_path / "ref"), settings=SETTINGS).pooled

    enc = build_encoder(PIXELS)
    seen: list[int] = []
    original = enc.encode_images

    def counting(pixels, tokens=False):
        seen.append(len(pixels))
        if len(seen) == 5:  # crash inside the third chunk (chunks are 2 batches of 4)
            raise KeyboardInterrupt
        return original(pixels, tokens=tokens)

    enc.encode_images = counting
    with pytest.raises(KeyboardInterrupt):
        encode(enc, data, cache=cache, settings=SETTINGS)
    parts = cache.finished_parts(PIXELS, data.fingerprint)
    assert sorted(parts) == [(0, 8), (8, 16)]
    assert cache.load(PIXELS, data.fingerprint) is None
    assert not list(cache.parts_dir(PIXELS, data.fingerprint).glob("*.tmp"))

    seen.clear()
    resumed = encode(enc, data, cache=cache, settings=SETTINGS)
    assert sum(seen) == len(data) - 16  # only the unfinished rows were encoded again
    assert torch.equal(resumed.pooled, reference)
    assert not cache.parts_dir(PIXELS, data.fingerprint).exists()


def test_text_rows_and_per_row(tmp_path, data):
    emb = encode(RANDOM_TEXT, data, cache=EmbeddingCache(tmp_path), settings=SETTINGS)
    texts, rows = data.flat_captions()
    assert emb.pooled.shape == (len(texts), 16)
    assert emb.row_index.tolist() == list(rows)
    first = emb.per_row(len(data), "first")
    mean = emb.per_row(len(data), "mean")
    assert first.shape == mean.shape == (len(data), 16)
    for r in (0, len(data) - 1):
        members = [i for i, x in enumerate(rows) if x == r]
        assert torch.equal(first[r], emb.pooled[members[0]])
        assert torch.allclose(mean[r], emb.pooled[members].mean(0), atol=1e-6)
    # the same caption text gets the same vector wherever it appears (content-keyed baseline)
    again = encode(RANDOM_TEXT, data, cache=EmbeddingCache(tmp_path / "b"), settings=SETTINGS)
    assert torch.equal(again.pooled, emb.pooled)


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x" / "e.safetensors"

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", half_write)
    with pytest.raises(CacheError, match="disk full"):  # one line naming the file and the fix
        atomic_save({"a": torch.zeros(2)}, path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path, data):
    cache = EmbeddingCache(tmp_path)
    good = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    path = cache.entry_path(PIXELS, data.fingerprint)
    path.write_bytes(path.read_bytes()[:100])
    assert cache.load(PIXELS, data.fingerprint) is None
    again = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    assert torch.equal(again.pooled, good.pooled)
    assert cache.load(PIXELS, data.fingerprint) is not None


def test_tokens_request_re_encodes_an_entry_without_tokens(tmp_path):
    ds = load_dataset("generated:n=6,seed=1,size=32")
    cache = EmbeddingCache(tmp_path)
    spec = EncoderSpec(id="baseline:random-net", modality="vision", image_size=32)
    plain = encode(spec, ds, cache=cache, settings=SETTINGS)
    assert plain.tokens is None
    tok_settings = EncodeSettings(device="cpu", batch_size=4, num_workers=0, tokens=True)
    with_tokens = encode(spec, ds, cache=cache, settings=tok_settings)
    assert with_tokens.tokens is not None and with_tokens.tokens.shape[0] == len(ds)
    assert torch.allclose(with_tokens.pooled, plain.pooled, atol=1e-5)
    assert cache.load(spec, ds.fingerprint, tokens=True) is not None


def test_bad_image_stops_with_its_name(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text("image,caption\na.png,a red square\nb.png,a broken file\n")
    ds = load_dataset(tmp_path / "m.csv")
    with pytest.raises(DataError, match="b.png"):
        encode(PIXELS, ds, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    with pytest.raises(DataError, match="b.png"):  # also through worker processes
        encode(PIXELS, ds, cache=EmbeddingCache(tmp_path / "c"), settings=EncodeSettings(device="cpu", num_workers=1))


def test_encode_zoo_reports_a_failing_model_and_keeps_the_rest(tmp_path, data):
    broken = EncoderSpec(id="hf:pairscout-tests/does-not-exist", modality="text")
    res = encode_zoo([RANDOM_TEXT, broken], data, cache=EmbeddingCache(tmp_path), settings=SETTINGS)
    assert set(res.embeddings) == {RANDOM_TEXT.name}
    assert set(res.failures) == {broken.name}
    assert "pairscout-tests/does-not-exist" in res.failures[broken.name]


def test_embeddings_per_row_identity_for_vision():
    e = Embeddings(pooled=torch.randn(5, 3), row_index=torch.arange(5))
    assert e.per_row(5) is e.pooled


def test_written_files_get_ordinary_permissions(tmp_path, data):
    import os

    from pairscout.files import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    cache = EmbeddingCache(tmp_path)
    encode(PIXELS, data, cache=cache, settings=SETTINGS)
    atomic_write_text(tmp_path / "r.json", "{}")
    for p in (cache.entry_path(PIXELS, data.fingerprint), tmp_path / "r.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
