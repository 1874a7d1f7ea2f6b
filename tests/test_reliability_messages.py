"""Issue 23, messages that name the wrong thing: a --skip-bad run can be probed, a run folder inside the data
folder is never read as data, text weights files name themselves, every "Fix:" names an option the command has,
and the API's zoo arguments take lists."""

from __future__ import annotations

import pytest
from PIL import Image

import pairscout
from pairscout.ranking import RankSettings

WORDS = ["red", "green", "blue", "yellow"]
FAST = RankSettings(ci_groups=0, permutations=0)


def _manifest(tmp_path, n=30, bad=(7,)):
    lines = ["image,caption,label"]
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (8, 8), (i * 8, 255 - i * 8, (i * 37) % 255)).save(p)
        lines.append(f"{p.name},a {WORDS[i % 4]} square {WORDS[(i // 4) % 4]},c{i % 4}")
    for i in bad:
        (tmp_path / f"im{i}.png").write_bytes(b"not a png")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- 1. a --skip-bad rank run can be probed -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [None, 24])
def test_a_skip_bad_run_rebuilds_the_same_dataset(tmp_path, n):
    from pairscout.align.pairdata import source_from_rank

    data = _manifest(tmp_path)
    res = pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:tfidf,baseline:random-text", str(data), n=n,
                         skip_bad=True, settings=FAST, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    src = source_from_rank(tmp_path / "run", cache_dir=tmp_path / "cache")  # was: "is not the one the rank run used"
    assert src.dataset.fingerprint == res.meta["settings"]["dataset_fingerprint"]
    assert len(src.dataset) == res.meta["settings"]["n"] < (n or 30)
    assert "--skip-bad" in src.data_arg


def test_a_skip_bad_run_that_skipped_a_malformed_line_rebuilds_the_same_dataset(tmp_path):
    from pairscout.align.pairdata import source_from_rank

    data = _manifest(tmp_path, bad=())
    lines = data.read_text().splitlines()
    lines[5] = 'im4.png,"an unclosed quote,c0'
    data.write_text("\n".join(lines) + "\n")
    res = pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:tfidf,baseline:random-text", str(data),
                         skip_bad=True, settings=FAST, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert res.meta["settings"]["n"] == 29
    src = source_from_rank(tmp_path / "run", cache_dir=tmp_path / "cache")  # was: "line 6 ... malformed CSV"
    assert src.dataset.fingerprint == res.meta["settings"]["dataset_fingerprint"]


def test_data_that_broke_since_the_rank_is_one_fix_with_options_probe_has(tmp_path):
    from pairscout.align.pairdata import source_from_rank
    from pairscout.errors import DataError

    data = _manifest(tmp_path, bad=())
    pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:tfidf,baseline:random-text", str(data),
                   settings=FAST, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    lines = data.read_text().splitlines()
    lines[5] = 'im4.png,"an unclosed quote,c0'
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        source_from_rank(tmp_path / "run", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert msg.count("Fix:") == 1 and "--skip-bad" not in msg and "Line 6" in msg, msg


def test_a_skip_bad_run_can_be_probed_from_the_cli(runner, tmp_path):
    from pairscout.cli import app

    data = _manifest(tmp_path)
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, ["rank", "--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo",
                            "baseline:tfidf,baseline:random-text", *common, "--skip-bad", "--ci-groups", "0",
                            "--permutations", "0", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "20"])
    assert r.exit_code == 0, r.output
    assert "not the one the rank run used" not in r.output


# --- 2. a run folder inside the data folder is never read as data -----------------------------------------------------
def _folder(tmp_path, n=24):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 10, 255 - i * 10, (i * 37) % 255)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"a {WORDS[i % 4]} square {WORDS[(i // 4) % 4]}\n")
    return root


def test_a_run_folder_inside_the_data_folder_is_not_read_as_data(runner, tmp_path):
    from pairscout.cli import app
    from pairscout.data import load_dataset

    root = _folder(tmp_path)
    before = load_dataset(root).fingerprint
    args = ["rank", "--vision-zoo", "baseline:pixels,baseline:random-vision", "--text-zoo", "baseline:tfidf,baseline:random-text",
            "--data", str(root), "--cache-dir", str(root / "cache"), "--ci-groups", "0", "--permutations", "0"]
    r = runner.invoke(app, [*args, "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    assert list((root / "run").rglob("*.png")), "the run writes plots (images) inside the data folder"
    assert len(load_dataset(root)) == 24 and load_dataset(root).fingerprint == before
    r = runner.invoke(app, ["probe", str(root / "run"), "--cache-dir", str(root / "cache"), "--steps", "20"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--out", str(root / "run2")])  # the next rank reads the same rows
    assert r.exit_code == 0, r.output
    assert "has no caption file" not in r.output


# --- 3. weights files that hold text name themselves ------------------------------------------------------------------
LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 46830571\n"


def _spec(id_, **kw):
    from pairscout.zoo.spec import EncoderSpec

    return EncoderSpec.from_dict({"id": id_, "modality": "vision", **kw}, where="test")


@pytest.mark.parametrize("ext", ["safetensors", "pth", "bin"])
def test_a_text_timm_weights_file_is_named(tmp_path, ext):
    pytest.importorskip("timm")
    from pairscout.encoders import build_encoder
    from pairscout.errors import ModelLoadError

    p = tmp_path / f"model.{ext}"
    p.write_text(LFS)
    with pytest.raises(ModelLoadError, match=rf"model\.{ext} holds text, not weights \(a Git LFS pointer.*Fix: fetch the real file"):
        build_encoder(_spec("timm:resnet18", weights=str(p)))


def test_a_text_onnx_file_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    from pairscout.encoders import build_encoder
    from pairscout.errors import ModelLoadError

    p = tmp_path / "model.onnx"
    p.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(ModelLoadError, match=r"model\.onnx holds text, not weights \(it starts '<html>"):
        build_encoder(_spec(f"onnx:{p}"))


def test_a_text_weights_file_in_a_hf_folder_is_named(tmp_path):
    from pairscout.encoders import build_encoder
    from pairscout.errors import ModelLoadError

    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    (tmp_path / "model.safetensors").write_text(LFS)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors holds text"):
        build_encoder(_spec(f"hf:{tmp_path}"))


def test_real_weights_files_pass_the_text_check(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pairscout.encoders._common import check_weights_files

    save_file({"w": torch.zeros(3)}, tmp_path / "a.safetensors")
    torch.save({"w": torch.zeros(3)}, tmp_path / "b.pth")
    for p in (tmp_path / "a.safetensors", tmp_path / "b.pth", tmp_path):
        check_weights_files("x", p)  # no error


# --- 4. every "Fix:" names an option the command has ------------------------------------------------------------------
def _command_options() -> dict[str, set[str]]:
    from typer.main import get_command

    from pairscout.cli import app

    out: dict[str, set[str]] = {}

    def walk(c, prefix=""):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            out[prefix] = {o for p in c.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}

    walk(get_command(app))
    return out


def _fix_options(under: str = "") -> dict[str, list[str]]:
    """Every --option named in a ``fix=`` text in the package, or in its sub-package ``under`` (other tools' options,
    pip's and torchrun's, left out)."""
    import ast
    import pathlib
    import re

    opt = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
    other_tool = re.compile(r"(pip install|torchrun)[^,;.)]*")
    found: dict[str, list[str]] = {}
    for f in (pathlib.Path(pairscout.__file__).parent / under).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "fix":
                for c in ast.walk(node.value):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str):
                        for o in opt.findall(other_tool.sub("", c.value)):
                            found.setdefault(o, []).append(f"{f.name}:{c.lineno}")
    return found


def test_every_option_a_fix_names_exists():
    every = set().union(*_command_options().values())
    found = _fix_options()
    assert "--force" in found and "--trust-remote-code" in found  # the walk sees the messages
    assert {o: w for o, w in found.items() if o not in every} == {}
    # the probe's own modules (only `pairscout probe` runs them) name only probe's options
    probe_opts = _command_options()["probe"]
    assert {o: w for o, w in _fix_options("evaluation").items() if o not in probe_opts} == {}


def test_every_command_that_loads_encoders_has_trust_remote_code():
    """The "pass --trust-remote-code" fix can be raised wherever an encoder is built: each of those commands has it."""
    opts = _command_options()
    for command in ("encode", "rank", "probe", "align", "zero-shot"):
        assert "--trust-remote-code" in opts[command], command


def test_the_remote_code_permission_of_the_command_reaches_the_encoder_runner():
    from pairscout.encoders.hf_source import allow_remote_code, remote_code_allowed

    with allow_remote_code(True), allow_remote_code(False or remote_code_allowed()):  # what runner.py does inside
        assert remote_code_allowed()
    import inspect

    from pairscout.embeddings import runner

    assert "remote_code_allowed()" in inspect.getsource(runner)


def test_an_unreadable_probe_file_names_probe_without_force(tmp_path):
    from pairscout.errors import PairscoutError
    from pairscout.files import check_shape

    opts = _command_options()
    for name, command in (("probe.json", "probe"), ("verdicts.json", "probe"), ("rank.json", "rank"), ("config.json", "align")):
        with pytest.raises(PairscoutError) as e:
            check_shape([], {}, str(tmp_path / name))
        fix = str(e.value).split("Fix:", 1)[1]
        assert f"`pairscout {command}`" in fix, fix
        assert all(o in opts[command] for o in __import__("re").findall(r"--[a-z-]+", fix)), fix


def test_a_diverged_probe_does_not_suggest_resume_or_force():
    """Training without a folder (as probe trains) cannot --resume: its divergence fix names --lr only."""
    import torch

    from pairscout.align.train import train
    from pairscout.align.train_config import TrainConfig
    from pairscout.errors import DivergenceError

    torch.manual_seed(0)
    v, t = torch.randn(32, 8), torch.randn(32, 8)
    with pytest.raises(DivergenceError) as e:
        train(v, t, torch.arange(32), TrainConfig(head="linear", out_dim=4, steps=30, batch_size=16, lr=1e30, grad_clip=0, eval_every=0))
    fix = str(e.value).split("Fix:", 1)[1]
    assert "--lr" in fix and "--resume" not in fix and "--force" not in fix and "--grad-clip" not in fix


# --- 5. the API's zoo arguments take lists of ids ---------------------------------------------------------------------
def test_rank_takes_lists_of_ids_like_a_comma_string():
    as_list = pairscout.rank(["baseline:pixels", "baseline:random-vision"], ("baseline:tfidf", "baseline:random-text"),
                             "generated", n=40, settings=FAST)
    as_text = pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:tfidf,baseline:random-text",
                             "generated", n=40, settings=FAST)
    assert set(as_list.pairs["vision"]) == {"pixels", "random-vision"}
    assert as_list.meta["settings"]["vision_zoo"] == as_text.meta["settings"]["vision_zoo"]
    assert as_list.meta["settings"]["text_zoo"] == as_text.meta["settings"]["text_zoo"]


@pytest.mark.parametrize("zoo, words", [([], "list is empty"), ([5], "list holds 5"), ([""], "list holds ''"),
                                        (5, "zoo is a int"), (["baseline:pixels", "baseline:pixels"], "pixels")])
def test_a_bad_zoo_list_is_one_line(zoo, words):
    from pairscout.errors import ZooError

    with pytest.raises(ZooError, match=words) as e:
        pairscout.rank(zoo, "baseline:tfidf", "generated", n=40, settings=FAST)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)
