"""Hugging Face datasets as --data: every layout written here by the ``datasets`` library itself; no network."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from pairscout.cli import app  # noqa: E402
from pairscout.data import load_dataset  # noqa: E402
from pairscout.errors import DataError  # noqa: E402

RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)
WORDS = ["cat", "dog", "hen", "fox", "owl", "yak", "emu"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """The parquet conversion and imagefolder builds write into the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def image(colour, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, colour)


def pixel(ds, i) -> tuple[int, int, int]:
    return ds.load_image(i).getpixel((0, 0))


def coco_like() -> datasets.Dataset:
    """One row per image, captions as a list, a ClassLabel, and a repeated image in its own row."""
    feats = datasets.Features({"image": datasets.Image(), "sentences": datasets.Sequence(datasets.Value("string")),
                               "label": datasets.ClassLabel(names=["red", "green", "blue"])})  # fmt: skip
    return datasets.Dataset.from_dict(
        {"image": [image(RED), image(GREEN), image(BLUE), image(RED)],
         "sentences": [["a red square", "red"], ["a green square"], ["blue"], ["crimson again"]],
         "label": [0, 1, 2, 0]},
        features=feats,
    )  # fmt: skip


def test_save_to_disk_parquet_and_arrow_read_alike(tmp_path):
    ds = coco_like()
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "coco.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    loaded = [load_dataset(tmp_path / "saved"), load_dataset(str(tmp_path / "coco.parquet")), load_dataset(arrow)]
    assert [d.format for d in loaded] == ["hf", "parquet", "arrow"]
    assert [d.name for d in loaded] == ["saved", "coco", "saved"]
    for d in loaded:
        # the repeated red image is one row holding both rows' captions, in order
        assert d.captions == [["a red square", "red", "crimson again"], ["a green square"], ["blue"]]
        assert d.labels.tolist() == [0, 1, 2] and d.classnames == ["red", "green", "blue"]
        assert [pixel(d, i) for i in range(3)] == [RED, GREEN, BLUE]
        assert d.describe()["columns"] == {"image": "image", "caption": "sentences", "label": "label"}
    # content keys the cache: the same rows in three files have one fingerprint; a changed caption changes it
    assert len({d.fingerprint for d in loaded}) == 1
    other = ds.map(lambda r: {"sentences": [s.upper() for s in r["sentences"]]})
    other.save_to_disk(str(tmp_path / "other"))
    assert load_dataset(tmp_path / "other").fingerprint != loaded[0].fingerprint
    # DataLoader workers get the dataset pickled: memory-mapped tables travel as file references
    clone = pickle.loads(pickle.dumps(loaded[0]))
    assert len(pickle.dumps(loaded[0])) < 20_000 and pixel(clone, 1) == GREEN


def test_usual_column_names_bytes_and_karpathy_records(tmp_path):
    import io

    def png(colour) -> bytes:
        buf = io.BytesIO()
        image(colour).save(buf, format="PNG")
        return buf.getvalue()

    # WebDataset-style columns: jpg (raw bytes), txt, cls
    datasets.Dataset.from_dict({"jpg": [png(RED), png(BLUE)], "txt": ["one", "two"], "cls": ["b", "a"]}).to_parquet(str(tmp_path / "wds.parquet"))
    d = load_dataset(str(tmp_path / "wds.parquet"))
    assert d.captions == [["one"], ["two"]] and [pixel(d, 0), pixel(d, 1)] == [RED, BLUE]
    assert d.labels.tolist() == [1, 0] and d.classnames == ["a", "b"]
    # Karpathy layout: sentences as records with a 'raw' field; a second caption column chosen by name
    ds = datasets.Dataset.from_dict({"img": [image(GREEN)], "sentences": [[{"raw": "a green box", "tokens": ["a"]}, {"raw": "green"}]],
                                     "alt": ["alt text"]})  # fmt: skip
    ds.save_to_disk(str(tmp_path / "karpathy"))
    assert load_dataset(tmp_path / "karpathy").captions == [["a green box", "green"]]
    assert load_dataset(tmp_path / "karpathy", caption_column="alt").captions == [["alt text"]]
    with pytest.raises(DataError, match=r"no caption column 'nope'; its columns: img, sentences, alt"):
        load_dataset(tmp_path / "karpathy", caption_column="nope")
    datasets.Dataset.from_dict({"picture": [png(RED)], "words": ["x"]}).to_parquet(str(tmp_path / "odd.parquet"))
    with pytest.raises(DataError, match=r"columns \(picture, words\) but no image column") as e:
        load_dataset(str(tmp_path / "odd.parquet"))
    assert "--image-column" in str(e.value) and "\n" not in str(e.value)
    d = load_dataset(str(tmp_path / "odd.parquet"), image_column="picture", caption_column="words")
    assert d.captions == [["x"]] and pixel(d, 0) == RED


def test_path_columns_resolve_beside_the_file_and_label_column_can_be_dropped(tmp_path):
    (tmp_path / "imgs").mkdir()
    image(BLUE).save(tmp_path / "imgs" / "b.png")
    image(RED).save(tmp_path / "imgs" / "r.png")
    datasets.Dataset.from_dict({"file_name": ["imgs/b.png", "imgs/r.png", "imgs/b.png"], "caption": ["blue", "red", "azure"],
                                "label": [1, 0, 1]}).to_parquet(str(tmp_path / "paths.parquet"))  # fmt: skip
    d = load_dataset(str(tmp_path / "paths.parquet"))
    assert d.captions == [["blue", "azure"], ["red"]] and [pixel(d, 0), pixel(d, 1)] == [BLUE, RED]
    assert d.labels.tolist() == [1, 0]
    assert load_dataset(str(tmp_path / "paths.parquet"), label_column="").labels is None
    (tmp_path / "imgs" / "r.png").unlink()
    bad = load_dataset(str(tmp_path / "paths.parquet"))
    assert [i for i, _ in bad.find_bad_images()] == [1]
    with pytest.raises(DataError, match=r"r\.png"):
        bad.load_image(1)


def test_parquet_shards_by_glob_and_dataset_dict_splits(tmp_path):
    ds = coco_like()
    ds.select([0, 1]).to_parquet(str(tmp_path / "test-00000-of-00002.parquet"))
    ds.select([2, 3]).to_parquet(str(tmp_path / "test-00001-of-00002.parquet"))
    d = load_dataset(str(tmp_path / "test-*.parquet"))
    assert d.name == "test" and len(d) == 3 and d.captions[2] == ["blue"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "one"))
    assert len(load_dataset(tmp_path / "one")) == 3
    datasets.DatasetDict({"train": ds, "test": ds.select([1, 2])}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"splits train, test.*two/train"):
        load_dataset(tmp_path / "two")
    assert load_dataset(tmp_path / "two" / "test").captions == [["a green square"], ["blue"]]


def test_imagefolder_with_metadata_jsonl_reads_as_datasets_does(tmp_path):
    root = tmp_path / "folder"
    (root / "imgs").mkdir(parents=True)
    rows = [("imgs/a.png", RED, "a red thing"), ("imgs/b.png", GREEN, "a green thing"), ("c.png", BLUE, "a blue thing")]
    for rel, colour, _ in rows:
        image(colour).save(root / rel)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": rel, "text": cap}) + "\n" for rel, _, cap in rows))
    ours = load_dataset(root)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    want = {t: im.convert("RGB").getpixel((0, 0)) for t, im in zip(theirs["text"], theirs["image"], strict=True)}
    assert {c[0]: pixel(ours, i) for i, c in enumerate(ours.captions)} == want == {cap: col for _, col, cap in rows}
    # the split layout (train/metadata.jsonl, test/metadata.jsonl) names the splits
    split = tmp_path / "split"
    for s, (_rel, colour, cap) in zip(("train", "test"), rows[:2], strict=True):
        (split / s).mkdir(parents=True)
        image(colour).save(split / s / "x.png")
        (split / s / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": cap}) + "\n")
    with pytest.raises(DataError, match=r"imagefolder with splits test, train"):
        load_dataset(split)
    assert load_dataset(split / "test").captions == [["a green thing"]]


def test_hub_ids_offline_fail_in_one_line(monkeypatch, runner):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("hf:nlphuji/flickr30k:test", "hf:yerevann/coco-karpathy"):
        with pytest.raises(DataError, match=r"Cannot load hf:.* from the Hugging Face hub \(offline") as e:
            load_dataset(spec)
        assert "\n" not in str(e.value) and "save_to_disk" in str(e.value)
    with pytest.raises(DataError, match="not a hub dataset id"):
        load_dataset("hf:a/b/c")
    r = runner.invoke(app, ["encode", "--data", "hf:nlphuji/flickr30k:test", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:random"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert sum(1 for line in r.output.splitlines() if line.startswith("error:")) == 1


def test_cli_columns_and_the_cache_keyed_by_content(tmp_path, runner):
    ds = datasets.Dataset.from_dict({"picture": [image(c, (16, 16)) for c in (RED, GREEN, BLUE, RED, (9, 9, 9), (200, 200, 0))],
                                     "words": ["r", "g", "b", "r2", "k", "y"]},
                                    features=datasets.Features({"picture": datasets.Image(), "words": datasets.Value("string")}))  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "same.parquet"))
    cache = tmp_path / "cache"
    base = ["encode", "--vision-zoo", "baseline:pixels", "--text-zoo", "baseline:random-text", "--device", "cpu", "--workers", "0",
            "--cache-dir", str(cache), "--json", "--caption-column", "words"]  # fmt: skip
    r = runner.invoke(app, [*base, "--data", str(tmp_path / "saved")])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["dataset"]["n"] == 5 and first["dataset"]["columns"]["caption"] == "words"  # the repeated red image: one row
    entries = sorted(cache.glob("*/*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    r = runner.invoke(app, [*base, "--data", str(tmp_path / "same.parquet")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]
    assert sorted(cache.glob("*/*.safetensors")) == entries and {p: p.stat().st_mtime_ns for p in entries} == stamps  # cache hits
    r = runner.invoke(app, [*base[:-2], "--data", str(tmp_path / "saved")])
    assert r.exit_code == 2 and "no caption column" in r.output and "--caption-column" in r.output
    r = runner.invoke(app, [*base, "--data", "generated:n=4,size=16"])
    assert r.exit_code == 2 and "--caption-column name columns of a table" in r.output


def test_a_rank_run_reloads_its_dataset_with_the_recorded_columns(tmp_path, runner):
    from pairscout.align.pairdata import source_from_rank

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(40)]
    datasets.Dataset.from_dict({"pic": ims, "alt": [f"a {WORDS[i % 7]} beside a {WORDS[(3 * i) % 5]}" for i in range(40)], "label": [i % 4 for i in range(40)]},
                               features=datasets.Features({"pic": datasets.Image(), "alt": datasets.Value("string"),
                                                           "label": datasets.Value("int64")})).save_to_disk(str(tmp_path / "d"))  # fmt: skip
    run = tmp_path / "run"
    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo", "baseline:random-text,baseline:tfidf",
                            "--data", str(tmp_path / "d"), "--image-column", "pic", "--caption-column", "alt", "--label-column", "",
                            "--out", str(run), "--cache-dir", str(tmp_path / "cache"), "--ci-groups", "3", "--permutations", "3",
                            "--no-plots", "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    src = source_from_rank(run, cache_dir=tmp_path / "cache")
    assert src.dataset.labels is None and src.dataset.captions[3] == ["a fox beside a owl"]  # '' kept the label column out


def test_encoding_workers_read_a_saved_dataset(tmp_path):
    """DataLoader workers get the dataset pickled (file references) and read the same pixels."""
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import EncodeSettings, encode
    from pairscout.zoo.spec import EncoderSpec

    coco_like().save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(tmp_path / "saved")
    spec = EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 4})
    one = encode(spec, ds, settings=EncodeSettings(device="cpu", num_workers=0, batch_size=2), cache=EmbeddingCache(tmp_path / "c0"))
    two = encode(spec, ds, settings=EncodeSettings(device="cpu", num_workers=2, batch_size=2), cache=EmbeddingCache(tmp_path / "c2"))
    assert one.pooled.shape == (3, 48) and np.array_equal(one.pooled.numpy(), two.pooled.numpy())
