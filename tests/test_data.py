"""The paired image-caption data layer: every reader, fingerprints, views, generated data, bad inputs."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pairscout.data import PairedDataset, load_dataset
from pairscout.data.generated import CLASSES, OBJECT_COLOURS, sample_scene
from pairscout.data.shards import expand_braces
from pairscout.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 128, 0), (0, 0, 255)


def png(path: Path, colour: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def png_bytes(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def csv_data(tmp_path: Path) -> Path:
    png(tmp_path / "img" / "a.png", RED)
    png(tmp_path / "img" / "b.png", GREEN)
    png(tmp_path / "img" / "c.png", BLUE)
    (tmp_path / "m.csv").write_text(
        "image,caption,label\n"
        "img/a.png,a red square,cat\n"
        "img/b.png,a green square,dog\n"
        "img/a.png,  red  ,cat\n"
        "img/c.png,a blue square,cat\n"
    )
    return tmp_path / "m.csv"


def pixel(ds: PairedDataset, i: int) -> tuple[int, int, int]:
    return ds.load_image(i).getpixel((0, 0))


# --- readers ---------------------------------------------------------------------------------------
def test_csv_groups_captions_by_image_and_maps_label_names(csv_data):
    ds = load_dataset(csv_data)
    assert len(ds) == 3 and ds.name == "m" and ds.format == "csv"
    assert ds.captions == [["a red square", "red"], ["a green square"], ["a blue square"]]
    assert ds.classnames == ["cat", "dog"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 0]
    assert [pixel(ds, i) for i in range(3)] == [RED, GREEN, BLUE]
    assert ds.load_image(0).mode == "RGB" and ds.image_id(1).endswith("b.png")
    texts, rows = ds.flat_captions()
    assert texts == ["a red square", "red", "a green square", "a blue square"]
    assert rows.dtype == np.int64 and rows.tolist() == [0, 0, 1, 2]


def test_csv_alias_columns_json_list_cell_and_images_root(tmp_path):
    png(tmp_path / "pics" / "x.png", RED)
    png(tmp_path / "pics" / "y.png", BLUE)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "m.csv").write_text('FilePath,captions\nx.png,"[""one"", ""two""]"\ny.png,plain text\n')
    ds = load_dataset(tmp_path / "meta" / "m.csv", images_root=tmp_path / "pics")
    assert ds.captions == [["one", "two"], ["plain text"]]
    assert ds.labels is None and ds.classnames is None
    assert pixel(ds, 1) == BLUE


def test_jsonl_caption_lists_int_labels_absolute_paths_and_classnames(tmp_path):
    a = png(tmp_path / "a.png", RED)
    png(tmp_path / "sub" / "b.png", GREEN)
    lines = [
        {"file_name": str(a), "captions": ["red one", "", "red two"], "label": 1},
        {"file_name": "sub/b.png", "text": "ignored: captions column wins", "captions": "green", "label": 0},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset(tmp_path / "m.jsonl", classnames=["zero", "one"])
    assert ds.captions == [["red one", "red two"], ["green"]]
    assert ds.labels.tolist() == [1, 0] and ds.classnames == ["zero", "one"]
    assert [pixel(ds, i) for i in range(2)] == [RED, GREEN]
    (tmp_path / "list.json").write_text(json.dumps(lines))  # a JSON array of the same records
    assert load_dataset(tmp_path / "list.json", classnames=["zero", "one"]).fingerprint == ds.fingerprint
    (tmp_path / "m.txt").write_text((tmp_path / "m.jsonl").read_text())
    assert load_dataset(tmp_path / "m.txt", format="jsonl").captions == ds.captions


def test_coco_finds_the_sibling_split_folder(tmp_path):
    png(tmp_path / "val2017" / "000001.png", RED)
    png(tmp_path / "val2017" / "000002.png", GREEN)
    coco = {
        "images": [{"id": 2, "file_name": "000002.png"}, {"id": 1, "file_name": "000001.png"}],
        "annotations": [
            {"image_id": 1, "caption": "red A"},
            {"image_id": 2, "caption": "green A"},
            {"image_id": 1, "caption": "red B"},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(coco))
    ds = load_dataset(tmp_path / "annotations" / "captions_val2017.json")
    assert ds.format == "coco" and ds.captions == [["green A"], ["red A", "red B"]]
    assert [pixel(ds, i) for i in range(2)] == [GREEN, RED]
    assert Path(ds.image_id(0)).parent.name == "val2017"
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "val2017", other)
    assert Path(load_dataset(tmp_path / "annotations" / "captions_val2017.json", images_root=other).image_id(0)).parent == other


def test_folder_sidecar_captions_with_class_subfolders(tmp_path):
    png(tmp_path / "d" / "dog" / "1.png", GREEN)
    (tmp_path / "d" / "dog" / "1.txt").write_text("a dog\n\n  a green dog  \n")
    png(tmp_path / "d" / "cat" / "2.png", RED)
    (tmp_path / "d" / "cat" / "2.txt").write_text("a cat")
    ds = load_dataset(tmp_path / "d")
    assert ds.format == "folder" and ds.classnames == ["cat", "dog"]
    assert ds.captions == [["a cat"], ["a dog", "a green dog"]] and ds.labels.tolist() == [0, 1]
    assert [pixel(ds, i) for i in range(2)] == [RED, GREEN]

    png(tmp_path / "flat" / "x.png", BLUE)
    (tmp_path / "flat" / "x.txt").write_text("blue")
    flat = load_dataset(tmp_path / "flat")
    assert flat.labels is None and flat.captions == [["blue"]]


def make_shards(tmp_path: Path) -> list[Path]:
    s0 = write_tar(tmp_path / "shard-00.tar", {
        "000.png": png_bytes(RED), "000.txt": b"a red one\nanother red\n", "000.cls": b"2",
        "001.jpg": png_bytes(GREEN, "JPEG"), "001.json": json.dumps({"captions": ["green", "a green one"]}).encode(), "001.cls": b"0",
        "002.json": b'{"caption": "no image: skipped"}',
    })  # fmt: skip
    s1 = write_tar(tmp_path / "shard-01.tar", {
        "dir/000.webp.note": b"not an image extension", "dir/000.png": png_bytes(BLUE),
        "dir/000.json": b'{"caption": "blue"}', "dir/000.cls": b"1",
    })  # fmt: skip
    return [s0, s1]


def test_webdataset_shards_by_pattern_folder_and_single_file(tmp_path):
    make_shards(tmp_path)
    ds = load_dataset(str(tmp_path / "shard-{00..01}.tar"), classnames=["g", "b", "r"])
    assert ds.format == "webdataset" and len(ds) == 3
    assert ds.captions == [["a red one", "another red"], ["green", "a green one"], ["blue"]]
    assert ds.labels.tolist() == [2, 0, 1] and ds.classnames == ["g", "b", "r"]
    assert pixel(ds, 2) == BLUE and pixel(ds, 0) == RED  # random access, any order
    assert max(abs(a - b) for a, b in zip(pixel(ds, 1), GREEN, strict=True)) < 20  # JPEG
    assert ds.image_id(2).endswith("shard-01.tar:dir/000.png")
    by_folder = load_dataset(tmp_path, classnames=["g", "b", "r"])  # a folder holding only .tar files
    assert by_folder.captions == ds.captions and by_folder.fingerprint == ds.fingerprint
    assert len(load_dataset(tmp_path / "shard-01.tar")) == 1


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]


def test_dataloader_workers_read_a_tar_dataset(tmp_path):
    torch = pytest.importorskip("torch")
    make_shards(tmp_path)
    ds = load_dataset(str(tmp_path / "shard-{00..01}.tar"))

    class Pixels(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return i, torch.from_numpy(np.asarray(ds.load_image(i), dtype=np.uint8).copy())

    loader = torch.utils.data.DataLoader(Pixels(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    got = {int(i): x[0] for i, x in loader}
    assert sorted(got) == [0, 1, 2]
    for i, x in got.items():
        assert torch.equal(x, torch.from_numpy(np.array(ds.load_image(i))))
    clone = pickle.loads(pickle.dumps(ds))  # spawn workers get a pickled copy
    assert pixel(clone, 2) == BLUE and clone.fingerprint == ds.fingerprint


# --- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_stable_on_reload_and_move_changes_with_content(csv_data, tmp_path):
    fp = load_dataset(csv_data).fingerprint
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert load_dataset(csv_data).fingerprint == fp
    moved = shutil.copytree(tmp_path, tmp_path.parent / (tmp_path.name + "_moved"))
    assert load_dataset(moved / "m.csv").fingerprint == fp  # content, not paths

    csv_data.write_text(csv_data.read_text().replace("a blue square", "a blue squares"))
    fp_caption = load_dataset(csv_data).fingerprint
    assert fp_caption != fp

    img = Image.new("RGB", (8, 8), BLUE)
    img.putpixel((7, 7), (0, 0, 254))
    img.save(tmp_path / "img" / "c.png")
    assert load_dataset(csv_data).fingerprint not in (fp, fp_caption)


def test_generated_fingerprint_depends_on_every_param():
    fps = {load_dataset(s).fingerprint for s in ("generated:n=8", "generated:n=9", "generated:n=8,seed=1",
                                                  "generated:n=8,size=64", "generated:n=8,noise=0")}  # fmt: skip
    assert len(fps) == 5
    assert load_dataset("generated:n=8").fingerprint == load_dataset("generated:n=8,seed=0,size=128").fingerprint


# --- views ---------------------------------------------------------------------------------------
def test_subset_and_select_are_reproducible_views():
    ds = load_dataset("generated:n=40,size=32")
    a, b = ds.subset(10, seed=1), ds.subset(10, seed=1)
    assert len(a) == 10 and a.captions == b.captions and a.fingerprint == b.fingerprint
    ids = [int(a.image_id(i).rsplit(":", 1)[1]) for i in range(10)]
    assert ids == sorted(ids) and a.captions == [ds.captions[k] for k in ids]
    assert a.labels.tolist() == ds.labels[ids].tolist()
    assert ds.subset(10, seed=2).fingerprint != a.fingerprint
    assert a.fingerprint != ds.fingerprint
    assert ds.subset(40) is ds and ds.subset(100) is ds
    with pytest.raises(DataError, match="Subset size"):
        ds.subset(0)

    sel = ds.select([5, 3])
    assert sel.image_id(0) == ds.image_id(5) and sel.captions == [ds.captions[5], ds.captions[3]]
    assert sel.select([1]).image_id(0) == ds.image_id(3)  # a view of a view maps to the source
    assert np.array_equal(np.asarray(sel.load_image(1)), np.asarray(ds.load_image(3)))
    assert ds.select([5, 3]).fingerprint == sel.fingerprint != ds.select([3, 5]).fingerprint
    mask = np.zeros(40, dtype=bool)
    mask[[3, 5]] = True
    assert ds.select(mask).captions == ds.select([3, 5]).captions
    with pytest.raises(DataError):
        ds.select([40])
    assert sel.describe()["selection"] == {"of_n": 40, "n": 2}


def test_split_is_reproducible_disjoint_covering_and_stratified():
    ds = load_dataset("generated:n=200,size=32,classes=4")
    train, test = ds.split(0.25, seed=3)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(200))
    t2, s2 = ds.split(0.25, seed=3)
    assert np.array_equal(train, t2) and np.array_equal(test, s2)
    assert not np.array_equal(test, ds.split(0.25, seed=4)[1])
    for c in range(4):  # each class ~25 % in test
        n_c = (ds.labels == c).sum()
        assert abs((ds.labels[test] == c).sum() - 0.25 * n_c) <= 0.5

    unlabelled = PairedDataset.from_files([f"x{i}.png" for i in range(10)], [["c"]] * 10)
    tr, te = unlabelled.split(0.3, seed=0)
    assert len(te) == 3 and len(tr) == 7 and np.intersect1d(tr, te).size == 0
    with pytest.raises(DataError):
        ds.split(1.0)


# --- generated data ------------------------------------------------------------------------------
def test_generated_is_deterministic_per_row_and_seed():
    a = load_dataset("generated:n=12,seed=5,size=64")
    b = load_dataset("generated:n=12,seed=5,size=64")
    later_first = np.asarray(b.load_image(11))  # rows render independently, in any order
    assert a.captions == b.captions and a.labels.tolist() == b.labels.tolist()
    for i in (0, 7, 11):
        assert np.array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i)))
    assert np.array_equal(np.asarray(a.load_image(11)), later_first)
    assert a.load_image(0).size == (64, 64) and a.load_image(0).mode == "RGB"
    c = load_dataset("generated:n=12,seed=6,size=64")
    assert c.captions != a.captions
    assert not np.array_equal(np.asarray(a.load_image(0)), np.asarray(c.load_image(0)))
    assert a.image_id(3) == "generated:5:3"
    assert a.find_bad_images() == []
    assert load_dataset("generated:n=12,seed=5,size=64").describe()["params"]["seed"] == 5


def test_generated_captions_describe_the_main_object():
    ds = load_dataset("generated:n=200,seed=0,size=32")
    assert ds.classnames == list(CLASSES) and set(ds.labels.tolist()) == set(range(10))
    assert all(len(caps) == 2 and caps[0] != caps[1] for caps in ds.captions)
    for caps, label in zip(ds.captions, ds.labels, strict=True):
        for cap in caps:
            assert CLASSES[label] in cap
            assert any(colour in cap for colour in OBJECT_COLOURS)
    assert len({c[0] for c in ds.captions}) > 150  # varied wording, not 10 fixed strings
    ds2 = load_dataset("generated", n=30, seed=2)  # the CLI's overrides
    assert len(ds2) == 30 and ds2.describe()["params"]["seed"] == 2


def test_generated_pixels_reflect_the_scene():
    """The main object's colour, named in both captions, covers a real share of the image."""
    ds = load_dataset("generated:n=30,seed=1,size=64,noise=0,distractors=0")
    params = ds.describe()["params"]
    for i in range(len(ds)):
        scene = sample_scene(1, i, params)
        main = scene.main
        for cap in ds.captions[i]:
            assert main.colour in cap.replace(scene.bg_colour, "") and CLASSES[main.cls] in cap
        arr = np.asarray(ds.load_image(i)).astype(int)
        share = (np.abs(arr - np.array(OBJECT_COLOURS[main.colour])).sum(-1) < 10).mean()
        assert share > 0.01, (i, ds.captions[i], share)


@pytest.mark.parametrize("spec", ["generated:n=0", "generated:m=3", "generated:n=x", "generated:size=4"])
def test_generated_bad_spec(spec):
    with pytest.raises(DataError, match="generated"):
        load_dataset(spec)


# --- bad inputs -----------------------------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Fix:" in msg
    return msg


def test_missing_and_corrupt_images_raise_and_are_found(csv_data, tmp_path):
    (tmp_path / "img" / "b.png").unlink()
    (tmp_path / "img" / "c.png").write_bytes(png_bytes(BLUE)[:40])  # truncated
    ds = load_dataset(csv_data)  # lazy: loading the manifest still works
    assert pixel(ds, 0) == RED
    with pytest.raises(DataError, match=r"b\.png \(line 3 of .*m\.csv\) does not exist") as e:
        ds.load_image(1)
    assert "--skip-bad" in one_line(e)
    with pytest.raises(DataError, match=r"c\.png \(line 5 of .*m\.csv\)") as e:
        ds.load_image(2)
    one_line(e)
    bad = ds.find_bad_images()
    assert [i for i, _ in bad] == [1, 2] and "b.png" in bad[0][1] and "c.png" in bad[1][1]
    good = ds.select([i for i in range(len(ds)) if i not in {1, 2}])
    assert good.find_bad_images() == [] and len(good) == 1
    assert ds.fingerprint and good.fingerprint != ds.fingerprint  # fingerprint survives bad images


def test_find_bad_images_with_threads_keeps_row_order(tmp_path):
    good = png(tmp_path / "ok.png", RED)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    paths = [good] * 40
    paths[3], paths[37] = tmp_path / "bad.png", tmp_path / "gone.png"
    ds = PairedDataset.from_files(paths, [["c"]] * 40)
    bad = ds.find_bad_images(num_threads=2)
    assert [i for i, _ in bad] == [3, 37] and "gone.png" in bad[1][1] and "does not exist" in bad[1][1]


def test_folder_with_hf_metadata_manifest(tmp_path):
    png(tmp_path / "ds" / "train" / "x.png", GREEN)
    (tmp_path / "ds" / "metadata.csv").write_text("file_name,text\ntrain/x.png,a green square\n")
    ds = load_dataset(tmp_path / "ds")
    assert ds.format == "csv" and ds.name == "ds" and ds.captions == [["a green square"]] and pixel(ds, 0) == GREEN


def test_corrupt_tar_member_is_named(tmp_path):
    write_tar(tmp_path / "s.tar", {"k1.png": b"garbage", "k1.txt": b"cap", "k2.png": png_bytes(RED), "k2.txt": b"ok"})
    ds = load_dataset(tmp_path / "s.tar")
    with pytest.raises(DataError, match=r"s\.tar:k1\.png"):
        ds.load_image(0)
    assert [i for i, _ in ds.find_bad_images()] == [0]


def bad_spec(tmp_path: Path, case: str) -> tuple[Path | str, str]:
    """Write one malformed dataset; return (spec, a regex its error must match)."""
    png(tmp_path / "a.png", RED)
    if case == "empty caption csv":
        (tmp_path / "m.csv").write_text("image,caption\na.png,   \n")
        return tmp_path / "m.csv", r"a\.png.*m\.csv.*no non-empty caption"
    if case == "missing columns":
        (tmp_path / "m.csv").write_text("picture,words\na.png,red\n")
        return tmp_path / "m.csv", r"m\.csv.*picture, words.*needs an image column"
    if case == "missing caption column jsonl":
        (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n')
        return tmp_path / "m.jsonl", r"m\.jsonl.*\(image\).*caption"
    if case == "empty caption coco":
        (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
        return tmp_path / "c.json", r"a\.png.*c\.json.*no non-empty caption"
    if case == "missing sidecar":
        return tmp_path, r"a\.png.*a\.txt"
    if case == "empty sidecar":
        (tmp_path / "a.txt").write_text("\n \n")
        return tmp_path, r"a\.png.*no non-empty caption"
    if case == "empty caption tar":
        write_tar(tmp_path / "s.tar", {"k.png": png_bytes(RED), "k.txt": b" "})
        return tmp_path / "s.tar", r"s\.tar.*sample k.*no non-empty caption"
    if case == "missing shard":
        write_tar(tmp_path / "s-0.tar", {"k.png": png_bytes(RED), "k.txt": b"x"})
        return str(tmp_path / "s-{0..1}.tar"), r"s-1\.tar.*does not exist"
    if case == "compressed tar":
        (tmp_path / "s.tar.gz").write_bytes(b"\x1f\x8b")
        return tmp_path / "s.tar.gz", r"s\.tar\.gz.*compressed"
    if case == "unknown format":
        (tmp_path / "data.xyz").write_text("?")
        return tmp_path / "data.xyz", r"data\.xyz"
    if case == "nonexistent":
        return tmp_path / "nope.csv", r"nope\.csv.*does not exist"
    if case == "conflicting labels":
        (tmp_path / "m.csv").write_text("image,caption,label\na.png,x,cat\na.png,y,dog\n")
        return tmp_path / "m.csv", r"a\.png.*cat.*dog.*m\.csv"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "empty caption csv", "missing columns", "missing caption column jsonl", "empty caption coco", "missing sidecar",
    "empty sidecar", "empty caption tar", "missing shard", "compressed tar", "unknown format", "nonexistent",
    "conflicting labels",
])  # fmt: skip
def test_bad_inputs_raise_one_line_data_error_naming_the_file(tmp_path, case):
    spec, pattern = bad_spec(tmp_path, case)
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(spec)
    one_line(e)
