"""Issue 23, nothing silently wrong in what is read: emb: files (row counts, several tensors), zoo settings a
source cannot honour, repeated caption columns, "nan" labels, non-UTF-8 captions in tars, EXIF orientation,
symlink loops in image folders."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from pairscout.cli import app
from pairscout.data import load_dataset
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.runner import EncodeSettings, encode
from pairscout.errors import DataError, ZooError
from pairscout.zoo.spec import EncoderSpec

SETTINGS = EncodeSettings(device="cpu", batch_size=8, num_workers=0)


# --- emb: files ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whole():
    return load_dataset("generated:n=30,seed=2,size=32")


def _emb(path, modality="vision", **kw):
    return EncoderSpec(id=f"emb:{path}", modality=modality, **kw)


def test_emb_file_on_a_subset_reads_the_subsets_rows(tmp_path, whole):
    """A file exported for the whole dataset, ranked on a --n subset: each kept row gets its own vector."""
    feats = np.arange(len(whole) * 4, dtype=np.float32).reshape(len(whole), 4)
    np.save(tmp_path / "v.npy", feats)
    sub = whole.subset(10, seed=5)
    rows, total = sub.file_rows("vision")
    assert total == len(whole) and len(rows) == 10 and (np.diff(rows) > 0).all()
    emb = encode(_emb(tmp_path / "v.npy"), sub, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert np.array_equal(emb.pooled.numpy(), feats[rows])
    texts, _ = whole.flat_captions()
    tfeats = np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3)
    np.save(tmp_path / "t.npy", tfeats)
    temb = encode(_emb(tmp_path / "t.npy", "text"), sub, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    sub_texts, _ = sub.flat_captions()
    want = [texts.index(t) for t in sub_texts]  # captions of generated rows are distinct enough to find
    trows, ttotal = sub.file_rows("text")
    assert ttotal == len(texts) and list(trows) == want
    assert np.array_equal(temb.pooled.numpy(), tfeats[trows])


def test_emb_file_with_as_many_rows_as_the_subset_is_refused(tmp_path, whole):
    """The old fix ("pass --n to match") paired the file with a random subset: CKA 0.567 for a perfect match."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))
    sub = whole.subset(10, seed=5)
    with pytest.raises(DataError, match="random draw") as e:
        encode(_emb(tmp_path / "v.npy"), sub, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert "--n to match" not in str(e.value) and "without --n" in str(e.value)
    with pytest.raises(DataError, match="has 10 rows but the dataset has 30 images"):
        encode(_emb(tmp_path / "v.npy"), whole, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)


def test_emb_cli_with_fewer_rows_is_one_line(tmp_path, runner):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    r = runner.invoke(app, ["encode", "--vision-zoo", f"emb:{tmp_path / 'v.npy'}", "--text-zoo", "baseline:tfidf", "--data",
                            "generated:size=32", "--n", "30", "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert r.exit_code != 0
    assert "--n to match" not in r.output and "20 rows" in r.output


def test_emb_file_with_several_tensors_needs_a_key(tmp_path, whole):
    a = np.random.default_rng(0).normal(size=(len(whole), 4)).astype(np.float32)
    np.savez(tmp_path / "v.npz", a=a, b=-a)
    with pytest.raises(DataError, match="2 tensors .*a, b") as e:
        encode(_emb(tmp_path / "v.npz"), whole, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert "options" in str(e.value) and "key" in str(e.value)
    got = encode(_emb(tmp_path / "v.npz", options={"key": "b"}), whole, cache=EmbeddingCache(tmp_path / "c"), settings=SETTINGS)
    assert np.allclose(got.pooled.numpy(), -a)


# --- zoo settings a source cannot honour -----------------------------------------------------------
@pytest.mark.parametrize(("id_", "modality", "field", "value"), [
    ("baseline:pixels", "vision", "pooling", "cls"), ("baseline:pixels", "vision", "layer", -2),
    ("baseline:tfidf", "text", "weights", "/models/x"), ("baseline:random-text", "text", "max_length", 16),
    ("baseline:random-vision", "vision", "image_size", 64), ("baseline:random-net", "vision", "weights", "/w.pth"),
    ("baseline:random-net", "vision", "revision", "abc"), ("emb:/x.npy", "vision", "pooling", "mean"),
    ("emb:/x.npy", "text", "layer", 3), ("emb:/x.npy", "vision", "image_size", 64),
])  # fmt: skip
def test_settings_a_source_cannot_honour_are_refused(id_, modality, field, value):
    from pairscout.resolve import _check_ids
    from pairscout.zoo.registry import Zoo

    spec = EncoderSpec(id=id_, modality=modality, **{field: value})
    with pytest.raises(ZooError, match=field):
        _check_ids(Zoo(name="z", description="", encoders=(spec,), source="ids"))


def test_settings_a_source_honours_are_kept():
    from pairscout.encoders.baselines import check_baseline

    check_baseline(EncoderSpec(id="baseline:random-net", modality="vision", image_size=64, pooling="avg"))
    check_baseline(EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8}, normalize=True))


def test_zoo_file_with_pooling_on_a_baseline_is_one_line(tmp_path, runner):
    zoo = tmp_path / "z.toml"
    zoo.write_text('name = "z"\n[[encoder]]\nid = "baseline:pixels"\nmodality = "vision"\npooling = "cls"\n', encoding="utf-8")
    r = runner.invoke(app, ["rank", "--vision-zoo", str(zoo), "--text-zoo", "baseline:tfidf", "--data", "generated:size=32", "--n", "20",
                            "--cache-dir", str(tmp_path / "c"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and "pooling" in r.output and len(r.output.strip().splitlines()) == 1, r.output


# --- manifests, labels, tars, images, folders ------------------------------------------------------
def _images(folder, names):
    for n in names:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / n)


def test_repeated_caption_columns_are_all_captions(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "m.csv").write_text("image,caption,caption\na.png,a cat,a small cat\nb.png,a dog,\n", encoding="utf-8")
    ds = load_dataset(tmp_path / "m.csv")
    assert ds.captions == [["a cat", "a small cat"], ["a dog"]]
    (tmp_path / "m2.csv").write_text("image,image,caption\na.png,b.png,a cat\n", encoding="utf-8")
    with pytest.raises(DataError, match="image column 'image' 2 times"):
        load_dataset(tmp_path / "m2.csv")


@pytest.mark.parametrize("missing", ["nan", "NaN", "<NA>", "null"])
def test_a_nan_label_is_not_a_class(tmp_path, missing):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "m.csv").write_text(f"image,caption,label\na.png,a cat,cat\nb.png,a dog,{missing}\nc.png,a cow,cow\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 .* no label"):
        load_dataset(tmp_path / "m.csv")
    (tmp_path / "all.csv").write_text(f"image,caption,label\na.png,a cat,{missing}\nb.png,a dog,{missing}\n", encoding="utf-8")
    ds = load_dataset(tmp_path / "all.csv")
    assert ds.labels is None and not ds.classnames


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_latin1_caption_in_a_tar_is_refused_by_name(tmp_path):
    _tar(tmp_path / "s.tar", [("k1.png", _png()), ("k1.txt", "un café".encode("latin-1"))])
    with pytest.raises(DataError, match="k1.txt .* not UTF-8"):
        load_dataset(tmp_path / "s.tar")
    _tar(tmp_path / "u.tar", [("k1.png", _png()), ("k1.txt", "\ufeffun café".encode())])
    assert load_dataset(tmp_path / "u.tar").captions == [["un café"]]


def test_exif_orientation_is_applied(tmp_path):
    from pairscout.data.images import decode_image

    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "p.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "p.jpg")
    assert out.size == (20, 40)  # portrait, as the camera meant it
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after the rotation


def test_a_symlink_loop_in_a_folder_is_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    _images(root, ["a.png"])
    (root / "a.txt").write_text("a cat")
    (root / "x.png").symlink_to(root / "y.png")
    (root / "y.png").symlink_to(root / "x.png")
    (root / "gone.png").symlink_to(root / "missing.png")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root)
    assert len(ds) == 1
    assert any("left out 3 image name(s)" in r.getMessage() for r in caplog.records), caplog.text
