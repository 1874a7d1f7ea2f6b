"""Issue 14, zoos and trust: values checked when the zoo is read, errors name the model; remote code only
on request; a model raising inside its own code fails alone."""

from __future__ import annotations

import os

import pytest

from pairscout.errors import ModelLoadError, ZooError
from pairscout.zoo.registry import get_zoo, load_zoo_file, resolve_zoo
from pairscout.zoo.spec import EncoderSpec


def _zoo(tmp_path, body: str, encoding: str = "utf-8"):
    p = tmp_path / "z.toml"
    p.write_bytes(("[[encoder]]\n" + body).encode(encoding))
    return p


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('id = "baseline:pixels"\nmodality = "vision"\nimage_size = -5\n', r"'baseline:pixels'.*image_size = -5.*positive integer"),
        ('id = "baseline:pixels"\nmodality = "vision"\nimage_size = "big"\n', r"'baseline:pixels'.*image_size.*positive integer"),
        ('id = "baseline:pixels"\nmodality = "vision"\noptions = "size=16"\n', r"'baseline:pixels'.*options.*table"),
        ('id = 5\nmodality = "vision"\n', r"id 5.*string"),
        ('id = "baseline:pixels"\nmodality = "vision"\nname = 5\n', r"'baseline:pixels'.*name = 5.*string"),
        ('id = "baseline:pixels"\nmodality = "vision"\nnormalize = "yes"\n', r"normalize.*true or false"),
    ],
)
def test_bad_zoo_values_name_the_model_when_read(tmp_path, body, match):
    with pytest.raises(ZooError, match=match) as e:
        load_zoo_file(_zoo(tmp_path, body))
    assert "z.toml" in str(e.value) and "\n" not in str(e.value)


def test_zoo_encoder_list_of_non_tables(tmp_path):
    p = tmp_path / "z.toml"
    p.write_text("encoder = [1, 2]\n")
    with pytest.raises(ZooError, match="entry 1 is a int.*not a table"):
        load_zoo_file(p)


def test_latin1_zoo_file_is_one_line_error(tmp_path):
    p = _zoo(tmp_path, 'id = "baseline:pixels"\nmodality = "vision"\nnotes = "caf\u00e9"\n', encoding="latin-1")
    with pytest.raises(ZooError, match="not UTF-8"):
        load_zoo_file(p)


def test_duplicate_ids_on_the_command_line_are_refused():
    with pytest.raises(ZooError, match="baseline:pixels twice"):
        resolve_zoo("baseline:pixels,baseline:pixels", "vision")


def test_standard_zoo_pins_what_it_can_and_says_what_it_does_not():
    z = get_zoo("standard")
    text = [e for e in z.encoders if e.modality == "text"]
    pinned = [e for e in text if e.revision and len(e.revision) == 40]
    unpinned = {e.name for e in text if e.revision == "main"}
    assert len(pinned) == 5
    assert unpinned == {"all-roberta-large-v1", "gte-large", "bge-large-en-v1.5"}


def test_remote_code_never_runs_without_the_command_line_flag(tmp_path):
    from pairscout.encoders import build_encoder
    from pairscout.encoders.hf_source import allow_remote_code

    spec = EncoderSpec(id="hf:some-org/custom-code-model", modality="text", options={"trust_remote_code": True})
    with pytest.raises(ModelLoadError, match="runs Python code.*--trust-remote-code"):
        build_encoder(spec)
    st = EncoderSpec(id="st:some-org/custom-st", modality="text", options={"trust_remote_code": True})
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        build_encoder(st)
    with allow_remote_code(True), pytest.raises(ModelLoadError) as e:  # allowed: now it tries (and cannot) load
        build_encoder(spec)
    assert "--trust-remote-code" not in str(e.value)


def test_cli_refuses_remote_code_model_and_ranks_the_rest(tmp_path):
    import subprocess
    import sys

    zoo = _zoo(tmp_path, 'id = "hf:some-org/custom-code-model"\nmodality = "text"\noptions = { trust_remote_code = true }\n'
               '[[encoder]]\nid = "baseline:tfidf"\nmodality = "text"\n')
    r = subprocess.run([sys.executable, "-c", "from pairscout.cli import main; main()", "encode", "--vision-zoo", "baseline:pixels", "--text-zoo", str(zoo), "--data",
                        "generated:n=16,size=16", "--cache-dir", str(tmp_path / "c"), "--workers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "--trust-remote-code" in r.stderr and "Traceback" not in r.stderr


def test_model_raising_inside_its_own_code_fails_alone(cpu, tmp_path, monkeypatch):
    from pairscout.data import load_dataset
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import encode_zoo

    data = load_dataset("generated:n=12,size=16")
    spec = EncoderSpec(id="baseline:random", modality="text", options={"dim": 4})
    ok = EncoderSpec(id="baseline:tfidf", modality="text")

    def boom(self, texts, *, tokens=False):
        raise ValueError("inside the model")

    import pairscout.encoders as encs

    real = encs.build_encoder

    def build(s):
        enc = real(s)
        if s.id == spec.id:
            enc.encode_texts = lambda texts, tokens=False: boom(enc, texts)
        return enc

    monkeypatch.setattr(encs, "build_encoder", build)
    res = encode_zoo([spec, ok], data, cache=EmbeddingCache(tmp_path), settings=cpu)
    assert set(res.embeddings) == {"tfidf"}
    assert "ValueError: inside the model" in res.failures["random"] and "baseline:random" in res.failures["random"]


def test_zero_encoders_are_failed_models_and_the_rest_are_ranked(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from pairscout.data import load_dataset

    n = 40
    ds = load_dataset(f"generated:n={n},size=16")
    np.save(tmp_path / "zeros_a.npy", np.zeros((n, 8), np.float32))
    np.save(tmp_path / "zeros_b.npy", np.zeros((len(ds.flat_captions()[0]), 8), np.float32))
    r = subprocess.run(
        [sys.executable, "-c", "from pairscout.cli import main; main()", "rank",
         "--vision-zoo", f"baseline:pixels,emb:{tmp_path / 'zeros_a.npy'}", "--text-zoo", f"baseline:tfidf,emb:{tmp_path / 'zeros_b.npy'}",
         "--data", f"generated:n={n},size=16", "--cache-dir", str(tmp_path / "c"), "--workers", "0", "--knn-k", "5",
         "--permutations", "0", "--ci-groups", "0", "--json"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    import json

    payload = json.loads(r.stdout)
    assert [(p["vision"], p["text"]) for p in payload["pairs"]] == [("pixels", "tfidf")]
    fails = payload["meta"]["failures"]
    assert {k.rsplit("/", 1)[-1] for k in fails} == {"zeros_a.npy", "zeros_b.npy"}
    assert all("all-zero" in v and "emb:" in v for v in fails.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": -4}, "--batch-size -4"), ({"num_workers": -1}, "--workers -1"), ({"batch_size": 0}, "--batch-size 0")],
)
def test_impossible_encode_settings_are_errors_up_front(kwargs, match):
    from pairscout.embeddings.runner import EncodeSettings
    from pairscout.errors import PairscoutError

    with pytest.raises(PairscoutError, match=match):
        EncodeSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"permutations": -1}, "--permutations"), ({"ci_groups": -2}, "--ci-groups"), ({"knn_k": 2.5}, "--knn-k"),
     ({"caption_reduce": "median"}, "--caption-reduce")],
)
def test_impossible_rank_settings_are_errors_up_front(kwargs, match):
    from pairscout.errors import PairscoutError
    from pairscout.ranking import RankSettings

    with pytest.raises(PairscoutError, match=match):
        RankSettings(**kwargs)


def test_unknown_device_is_one_line_error():
    from pairscout.embeddings.runner import pick_device
    from pairscout.errors import PairscoutError

    with pytest.raises(PairscoutError, match="'gpu0' is not a device name"):
        pick_device("gpu0")


def test_rank_out_that_is_a_file_fails_before_encoding(tmp_path, monkeypatch):
    from pairscout.errors import PairscoutError
    from pairscout.ranking import rank

    out = tmp_path / "runs"
    out.write_text("x")
    monkeypatch.setattr("pairscout.ranking.core.encode_zoo", lambda *a, **k: pytest.fail("encoded before checking --out"))
    with pytest.raises(PairscoutError, match="existing file"):
        rank("baseline:pixels", "baseline:tfidf", "generated:n=16,size=16", out=out)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root can write anywhere")
def test_read_only_cache_fails_before_encoding(cpu, tmp_path):
    from pairscout.data import load_dataset
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import encode
    from pairscout.errors import CacheError

    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="not writable"):
            encode(EncoderSpec(id="baseline:pixels", modality="vision"), load_dataset("generated:n=8,size=16"),
                   cache=EmbeddingCache(root), settings=cpu)
    finally:
        root.chmod(0o755)


def test_unwritable_cache_fails_before_encoding(cpu, tmp_path, monkeypatch):
    from pairscout import files as _io
    from pairscout.data import load_dataset
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import encode
    from pairscout.errors import CacheError

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.tempfile, "mkstemp", full)
    monkeypatch.setattr("pairscout.encoders.build_encoder", lambda spec: pytest.fail("built before checking the cache"))
    with pytest.raises(CacheError, match="No space left"):
        encode(EncoderSpec(id="baseline:pixels", modality="vision"), load_dataset("generated:n=8,size=16"),
               cache=EmbeddingCache(tmp_path), settings=cpu)


def test_a_misspelled_pack_is_one_line_before_any_encoding(runner, tmp_path):

    from pairscout.cli import app

    r = runner.invoke(app, ["rank", "--vision-zoo", "pack:efficientnet-lit0", "--text-zoo", "baseline:tfidf", "--rows", "16",
                                 "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pack:efficientnet-lit0 is not a pack (for vision)" in lines[0]
    assert "pack:efficientnet-lite0" in lines[0] and "MiniLM" not in lines[0]  # only packs of that modality
    assert not (tmp_path / "c").exists()  # nothing was encoded


def test_a_misspelled_baseline_is_one_line_before_any_encoding(runner, tmp_path):
    """Was: the other encoders ranked, then exit 1 with the typo as a load failure."""

    from pairscout.cli import app

    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:pixel,baseline:random-net", "--text-zoo", "baseline:tfidf",
                                 "--rows", "16", "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "there is no vision baseline named 'pixel'" in lines[0]
    assert "baseline:pixels" in lines[0] and "tfidf" not in lines[0]  # only baselines of that modality
    assert not (tmp_path / "c").exists()


def test_help_shows_defaults_in_words_not_eaten_by_markup(runner):

    from pairscout.cli import app

    out = runner.invoke(app, ["rank", "--help"], env={"COLUMNS": "200"}).output
    assert "(default: auto)" in out and "(default: cka_linear;" in out
    assert " .  " not in out.replace("│", " ")
