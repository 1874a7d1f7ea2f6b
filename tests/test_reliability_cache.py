"""Issue 14, cache and embedding files: no stale hit, no damaged entry used, no interrupted run blocking."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pairscout.data import load_dataset
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.runner import EncodeSettings, encode, encode_zoo
from pairscout.errors import CacheError, DataError, EmbeddingError
from pairscout.zoo.spec import EncoderSpec

PIXELS = EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8})
SETTINGS = EncodeSettings(device="cpu", batch_size=4, num_workers=0, chunk_batches=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("generated:n=21,seed=3,size=32")


def _emb_spec(path) -> EncoderSpec:
    return EncoderSpec(id=f"emb:{path}", modality="vision")


def test_emb_file_reexported_under_same_name_is_a_miss(tmp_path, data):
    path = tmp_path / "feats.npy"
    cache = EmbeddingCache(tmp_path / "cache")
    old = np.random.default_rng(0).normal(size=(len(data), 6)).astype(np.float32)
    np.save(path, old)
    first = encode(_emb_spec(path), data, cache=cache, settings=SETTINGS)
    assert np.allclose(first.pooled.numpy(), old)
    new = old * -3 + 1
    np.save(path, new)  # same path, same size: only the content (and mtime) changes
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second = encode(_emb_spec(path), data, cache=cache, settings=SETTINGS)
    assert np.allclose(second.pooled.numpy(), new)


def test_emb_file_same_content_elsewhere_hits_by_content(tmp_path, data):
    from pairscout.embeddings.inputs import inputs_digest

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    x = np.arange(len(data) * 3, dtype=np.float32).reshape(len(data), 3)
    np.save(a, x)
    np.save(b, x)
    np.save(tmp_path / "c.npy", x + 1)
    assert inputs_digest(_emb_spec(a)) == inputs_digest(_emb_spec(b))
    assert inputs_digest(_emb_spec(a)) != inputs_digest(_emb_spec(tmp_path / "c.npy"))
    assert inputs_digest(PIXELS) is None  # no local file: key unchanged from earlier versions


def test_local_weights_folder_keys_by_content(tmp_path):
    from pairscout.embeddings.inputs import inputs_digest

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"A" * 100)
    spec = EncoderSpec(id="hf:my-model", modality="text", weights=str(d))
    before = inputs_digest(spec)
    (d / "model.safetensors").write_bytes(b"B" * 100)
    assert inputs_digest(spec) != before


def test_flipped_bytes_in_cache_entry_are_detected_and_reencoded(tmp_path, data, caplog):
    cache = EmbeddingCache(tmp_path)
    ref = encode(PIXELS, data, cache=cache, settings=SETTINGS).pooled.clone()
    path = cache.entry_path(PIXELS, data.fingerprint)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(raw))
    assert cache.load(PIXELS, data.fingerprint) is None
    assert "checksum" in caplog.text
    again = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    assert torch.equal(again.pooled, ref)
    assert cache.load(PIXELS, data.fingerprint) is not None


def test_cache_entry_without_pooled_is_reencoded(tmp_path, data):
    from pairscout.embeddings.cache import atomic_save

    cache = EmbeddingCache(tmp_path)
    ref = encode(PIXELS, data, cache=cache, settings=SETTINGS).pooled.clone()
    path = cache.entry_path(PIXELS, data.fingerprint)
    atomic_save({"row_index": torch.arange(len(data))}, path)
    assert torch.equal(encode(PIXELS, data, cache=cache, settings=SETTINGS).pooled, ref)


def test_truncated_part_of_interrupted_run_is_discarded(tmp_path, data):
    cache = EmbeddingCache(tmp_path)
    ref = encode(PIXELS, data, cache=EmbeddingCache(tmp_path / "ref"), settings=SETTINGS).pooled
    part = cache.parts_dir(PIXELS, data.fingerprint) / f"{0:09d}-{8:09d}.safetensors"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"index\": trunc")  # cut off mid-header
    got = encode(PIXELS, data, cache=cache, settings=SETTINGS)
    assert torch.equal(got.pooled, ref)


def test_cache_dir_that_is_a_file_is_one_line_error(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        EmbeddingCache(f)


def test_cache_entry_path_that_is_a_directory(tmp_path, data):
    cache = EmbeddingCache(tmp_path)
    cache.entry_path(PIXELS, data.fingerprint).mkdir(parents=True)
    with pytest.raises(CacheError, match="not a regular file"):
        encode(PIXELS, data, cache=cache, settings=SETTINGS)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda n: np.ones((n, 4)) + 1j, "complex"),
        (lambda n: np.array([["a"] * 4] * n), "text"),
        (lambda n: np.ones((n, 4), dtype=bool), "bool"),
    ],
)
def test_emb_arrays_that_are_not_real_numbers_are_refused(tmp_path, data, make, match):
    path = tmp_path / "x.npy"
    np.save(path, make(len(data)))
    with pytest.raises(DataError, match=match):
        encode(_emb_spec(path), data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)


def test_emb_big_endian_array_is_read_correctly(tmp_path, data):
    x = np.random.default_rng(1).normal(size=(len(data), 5))
    path = tmp_path / "be.npy"
    np.save(path, x.astype(">f8"))
    got = encode(_emb_spec(path), data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert np.allclose(got.pooled.numpy(), x, atol=1e-6)


@pytest.mark.parametrize("content", [b"garbage" * 10, b""])
def test_emb_garbage_or_truncated_files_are_data_errors(tmp_path, data, content):
    for suffix in (".pt", ".safetensors", ".npy"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(DataError, match="cannot be read"):
            encode(_emb_spec(path), data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)


def test_emb_malicious_pickle_is_blocked_with_one_line(tmp_path, data):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refuses to unpickle"):
        encode(_emb_spec(path), data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)


def test_emb_device_file_is_refused_without_reading(tmp_path, data):
    spec = _emb_spec("/dev/zero.npy") if os.path.exists("/dev/zero.npy") else EncoderSpec(id="emb:/dev/zero", modality="vision")
    with pytest.raises(DataError, match="not a regular file"):
        encode(spec, data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)


@pytest.mark.parametrize(
    ("make", "what"),
    [(lambda n: np.zeros((n, 8)), "all-zero"), (lambda n: np.ones((n, 8)) * 3, "constant"), (lambda n: np.zeros((n, 0)), "shape")],
)
def test_constant_zero_or_empty_embeddings_fail_that_model_only(tmp_path, data, make, what):
    bad = tmp_path / "bad.npy"
    np.save(bad, make(len(data)).astype(np.float32))
    spec = _emb_spec(bad)
    res = encode_zoo([spec, PIXELS], data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert set(res.embeddings) == {"pixels"}
    assert what in res.failures[spec.name] and spec.id in res.failures[spec.name]
    with pytest.raises(EmbeddingError):
        encode(spec, data, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
