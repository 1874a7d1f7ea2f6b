"""Issue 14, the aligned-model cases: damaged files and impossible options end in one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pairscout.align import TrainConfig
from pairscout.align.model import AlignedModel, align
from pairscout.errors import PairscoutError, TrainError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    cfg = TrainConfig(head="linear", out_dim=8, steps=4, batch_size=16, device="cpu", checkpoint_every=2)
    align(("pixels", "tfidf"), vision_zoo="baseline:pixels", text_zoo="baseline:tfidf", data="generated:n=48,size=32",
          config=cfg, cache_dir=root / "cache", out=root / "model", force=True, keep_checkpoint=True)
    Image.new("RGB", (40, 40), "red").save(root / "img.png")
    return root


def _copy(model_dir, name):
    dst = model_dir / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(model_dir / "model", dst)
    return dst


def test_truncated_heads_and_missing_config_key(model_dir):
    m1 = _copy(model_dir, "trunc")
    (m1 / "heads.safetensors").write_bytes((model_dir / "model" / "heads.safetensors").read_bytes()[:100])
    with pytest.raises(PairscoutError, match="unreadable"):
        AlignedModel.load(m1)
    m2 = _copy(model_dir, "notext")
    cfg = json.loads((m2 / "config.json").read_text())
    del cfg["text"]
    (m2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairscoutError, match="lacks text"):
        AlignedModel.load(m2)


@pytest.mark.slow
def test_cli_zero_shot_bad_inputs_are_one_line(model_dir):
    big = model_dir / "big.png"
    Image.new("RGB", (20000, 20000), "red").save(big)  # 400 M pixels: over PIL's decompression-bomb limit
    m1 = _copy(model_dir, "trunc_cli")
    (m1 / "heads.safetensors").write_bytes(b"\0" * 50)
    cases = [(["--model", str(m1), "-c", "a,b", str(model_dir / "img.png")], "unreadable"),
             (["--model", str(model_dir / "model"), "-c", "a,b", str(big)], "big.png"),
             (["--model", str(model_dir / "model"), "-c", "a,b", "--top-k", "-1", str(model_dir / "img.png")], "--top-k")]
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", "pairscout", "zero-shot", *args], capture_output=True, text=True,
                           timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                             "PAIRSCOUT_CACHE": str(model_dir / "cache")})
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and needle in r.stderr


def test_resume_from_truncated_checkpoint_is_one_line(model_dir):
    ckdir = model_dir / "model" / "train" / "checkpoints"
    files = sorted(ckdir.glob("step_*.pt"))
    assert files, list(ckdir.iterdir())
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) // 3])
    cfg = TrainConfig(head="linear", out_dim=8, steps=4, batch_size=16, device="cpu", checkpoint_every=2)
    with pytest.raises(TrainError, match="damaged"):
        align(("pixels", "tfidf"), vision_zoo="baseline:pixels", text_zoo="baseline:tfidf",
              data="generated:n=48,size=32", config=cfg, cache_dir=model_dir / "cache", out=model_dir / "model",
              resume=True, keep_checkpoint=True)


def test_negative_epochs_refused():
    with pytest.raises(TrainError, match="--epochs"):
        TrainConfig(epochs=-1)
    assert TrainConfig(epochs=0.5).epochs == 0.5
    assert torch.tensor(1.0).item() == 1.0


def test_garbage_timm_weights_fail_that_model_alone(cpu, tmp_path):
    from pairscout.data import load_dataset
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import encode_zoo
    from pairscout.zoo.spec import EncoderSpec

    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(bytes(range(256)) * 4)
    specs = [EncoderSpec(id="timm:test_vit", modality="vision", weights=str(bad)),
             EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8})]
    res = encode_zoo(specs, load_dataset("generated:n=12,size=16"), cache=EmbeddingCache(tmp_path / "c"),
                     settings=cpu)
    assert "pixels" in res.embeddings and "test_vit" in res.failures
    assert "\n" not in res.failures["test_vit"] and "test_vit" in res.failures["test_vit"]


def test_report_out_folder_and_missing_folder(tmp_path):
    """Issue 14: `report -o DIR` crashed in the atomic rename; `report` on an empty rank.json."""
    from pairscout.ranking import rank
    from pairscout.report import build_report

    rank("baseline:pixels", "baseline:tfidf,baseline:random", "generated:n=40,size=16", out=tmp_path / "run",
         cache_dir=tmp_path / "c", plots=False)
    (tmp_path / "dir").mkdir()
    assert build_report([tmp_path / "run"], tmp_path / "dir") == tmp_path / "dir" / "report.html"
    assert (tmp_path / "dir" / "report.html").stat().st_size > 1000
    with pytest.raises(PairscoutError, match="does not exist"):
        build_report([tmp_path / "run"], tmp_path / "nope" / "r.html")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "rank.json").write_text("")
    with pytest.raises(PairscoutError, match="unreadable"):
        build_report([tmp_path / "empty"])
