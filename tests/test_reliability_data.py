"""Issue 14, datasets: malformed rows name their line (or are skipped and counted), odd files never hang,
16-bit images keep their values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pairscout.data import load_dataset
from pairscout.data.images import decode_image
from pairscout.errors import DataError


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(25):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(p)
        paths.append(p.name)
    return paths


def _csv(tmp_path, images, bad_row: int | None = None, line: str | None = None):
    lines = ["image,caption"]
    for i, p in enumerate(images):
        lines.append(line if (bad_row is not None and i == bad_row) else f"{p},a red square number {i}")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_stray_quote_is_an_error_naming_the_line(tmp_path, images):
    path = _csv(tmp_path, images, 6, f'{images[6]},"a red square number 6')  # row 7 of 25 = line 8
    with pytest.raises(DataError, match=r"[Ll]ine 8 of .*m\.csv.*malformed CSV"):
        load_dataset(path)


def test_csv_stray_quote_with_later_quotes_is_an_error(tmp_path, images):
    lines = ["image,caption"] + [f'{p},"caption {i}"' for i, p in enumerate(images)]
    lines[7] = f'{images[6]},"a red "square"'
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"[Ll]ine \d+ of .*malformed CSV"):
        load_dataset(path)


def test_csv_stray_quote_skip_bad_skips_and_counts(tmp_path, images):
    path = _csv(tmp_path, images, 6, f'{images[6]},"a red square number 6')
    ds = load_dataset(path, skip_bad=True)
    assert len(ds) == 24
    assert ds.describe()["skipped_lines"]["count"] == 1
    assert "line 8" in ds.describe()["skipped_lines"]["first"][0]


def test_csv_wrong_field_count_names_the_line(tmp_path, images):
    path = _csv(tmp_path, images, 3, f"{images[3]},a caption,extra")
    with pytest.raises(DataError, match=r"[Ll]ine 5 of .*3 fields but the header has 2"):
        load_dataset(path)
    assert len(load_dataset(path, skip_bad=True)) == 24


def test_csv_multiline_quoted_caption_still_works(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_text(f'image,caption\n{images[0]},"two\nlines"\n{images[1]},one\n')
    ds = load_dataset(path)
    assert len(ds) == 2 and ds.captions[0] == ["two lines"]


def test_jsonl_bad_line_names_it_or_is_skipped(tmp_path, images):
    lines = [json.dumps({"image": p, "caption": f"c {i}"}) for i, p in enumerate(images)]
    lines[4] = '{"image": "x.png", "caption": '
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"[Ll]ine 5 of .*not valid JSON"):
        load_dataset(path)
    ds = load_dataset(path, skip_bad=True)
    assert len(ds) == 24 and ds.describe()["skipped_lines"]["count"] == 1


@pytest.mark.parametrize(("caption", "what"), [(5, "int"), ({"en": "a cat"}, "dict"), (["ok", 3], "int")])
def test_jsonl_caption_that_is_not_text_names_the_line(tmp_path, images, caption, what):
    lines = [json.dumps({"image": p, "caption": f"c {i}"}) for i, p in enumerate(images)]
    lines[2] = json.dumps({"image": images[2], "caption": caption})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"line 3 of .*{what}.*not text"):
        load_dataset(path)
    assert len(load_dataset(path, skip_bad=True)) == 24


def test_coco_list_ids_are_one_line_errors(tmp_path, images):
    coco = {"images": [{"id": [1], "file_name": images[0]}], "annotations": [{"image_id": [1], "caption": "x"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="Entry 0 of 'images'.*not an integer or a string"):
        load_dataset(path)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = (np.arange(32 * 32).reshape(32, 32) * 5).astype(np.uint16)  # 0 .. 5115: dark in 16-bit terms
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    got = np.asarray(decode_image(p)).astype(float)
    assert got.shape == (32, 32, 3)
    assert abs(got.mean() - a.mean() / 257) < 0.6  # about 10, not 248 (clipped to white)


def test_device_file_in_manifest_is_a_bad_image_not_a_hang(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_text(f"image,caption\n{images[0]},ok\n/dev/zero,zero\n")
    code = (
        "import sys; from pairscout.data import load_dataset; ds = load_dataset(sys.argv[1]);"
        "print(ds.fingerprint); print(ds.find_bad_images())"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "/dev/zero" in r.stdout and "not a regular file" in r.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_manifest_and_image_never_hang(tmp_path, images):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    path = tmp_path / "m.csv"
    path.write_text(f"image,caption\n{images[0]},ok\n{fifo},pipe\n")
    man = tmp_path / "fifo.csv"
    os.mkfifo(man)
    code = (
        "import sys; from pairscout.data import load_dataset; from pairscout.errors import DataError\n"
        "ds = load_dataset(sys.argv[1]); print(ds.fingerprint); print(ds.find_bad_images())\n"
        "try: load_dataset(sys.argv[2])\nexcept DataError as e: print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path), str(man)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "a FIFO, not a regular file" in r.stdout
    assert r.stdout.count("FIFO") == 2


def test_oversized_image_file_is_a_bad_image(tmp_path, monkeypatch):
    from pairscout.data import images as images_mod

    p = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(p)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(images_mod.ImageReadError, match="over the limit"):
        decode_image(p)


def test_plots_go_through_the_atomic_writer(tmp_path, monkeypatch):
    """A full disk mid-save leaves no truncated PNG under the real name."""
    import matplotlib.figure

    from pairscout import plots

    fig = plots.heatmap(__import__("pandas").DataFrame([[0.1, 0.2]], index=["v"], columns=["a", "b"]), "t")
    real = matplotlib.figure.Figure.savefig

    def full_disk(self, fname, *a, **k):
        if not hasattr(fname, "write"):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG trunc")
            raise OSError(28, "No space left on device")
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        plots.render(fig, tmp_path / "plots", "heat")
    assert not (tmp_path / "plots" / "heat.png").exists()
    assert list((tmp_path / "plots").iterdir()) == []


def test_n_larger_than_the_data_is_said(caplog):
    """--n beyond the rows a dataset holds uses them all and says so (it was silent)."""
    import logging

    from pairscout.resolve import resolve_data

    ds = resolve_data("generated", n=20)
    with caplog.at_level(logging.WARNING):
        got = resolve_data(ds, n=50)
    assert len(got) == 20
    assert "--n 50 asks for more rows than the data has: using all 20" in caplog.text
