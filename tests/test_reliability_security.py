"""Issue 23, nothing written outside its place: names become path components through one function, and
control characters in names, paths and file contents never reach the terminal raw."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pairscout.cli import app
from pairscout.errors import DataError, PairscoutError, printable
from pairscout.files import safe_name

HOSTILE = ["/abs/path/feats.npy", "../../../escaped", "..", ".", "", "a/../../b", "C:\\x\\y", "hf:/models/m",
           "\x1b[2J", "name\x00nul", "x" * 300, ".hidden", "~/home", "pix@12 + mean"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_name_is_one_component_inside_its_folder(tmp_path, name):
    s = safe_name(name)
    assert s and s not in (".", "..") and not s.startswith(".")
    assert "/" not in s and "\\" not in s and "\x00" not in s and len(s) <= 80
    assert (tmp_path / s).parent == tmp_path
    assert (tmp_path / s).resolve().parent == tmp_path.resolve()


def test_safe_name_keeps_ordinary_names():
    assert safe_name("efficientnet-lite0") == "efficientnet-lite0"
    assert safe_name("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert safe_name("timm:vit_small.dino") == "timm_vit_small.dino"  # the cache's folder names are unchanged


@pytest.mark.parametrize("pair", [("/abs/path/feats.npy", "tfidf"), ("../../../escaped", "tfidf"), ("pixels", "/models/minilm"),
                                  ("..", "..")])  # fmt: skip
def test_align_default_folder_stays_in_the_run(tmp_path, pair):
    from pairscout.align.model import default_out

    run = tmp_path / "run"
    out = default_out(run, pair)
    assert out.parent == run / "align"
    assert out.resolve().is_relative_to((run / "align").resolve())


def test_plot_stems_stay_in_their_folder(tmp_path):
    import matplotlib.pyplot as plt

    from pairscout import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    p = plots.render(fig, tmp_path / "plots", "probe_../../../x")
    assert all(q.parent == tmp_path / "plots" for q in p.paths)


def test_cache_folder_for_an_absolute_id_stays_in_the_cache(tmp_path):
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.zoo.spec import EncoderSpec

    cache = EmbeddingCache(tmp_path / "cache")
    for id_ in ("emb:/abs/x.npy", "emb:../../x.npy", "hf:/models/m", "st:.."):
        spec = EncoderSpec(id=id_, modality="text" if id_.startswith(("hf", "st")) else "vision")
        p = cache.entry_path(spec, "f" * 32, "fp32")
        assert p.resolve().is_relative_to((tmp_path / "cache").resolve()), p


def test_align_of_an_absolute_emb_encoder_writes_inside_the_run(tmp_path, runner, monkeypatch):
    """`emb:/ABS/path` is displayed as `/ABS/path`: align's default folder once became `/ABS/path__tfidf`."""
    feats = tmp_path / "feats.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    r = runner.invoke(app, ["rank", "--vision-zoo", f"emb:{feats},baseline:pixels", "--text-zoo", "baseline:tfidf,baseline:random-text",
                            "--data", "generated:size=32", "--n", "40", "--out", "run", "--ci-groups", "3", "--permutations", "3",
                            "--no-plots", "--workers", "0", *common])  # fmt: skip
    assert r.exit_code == 0, r.output
    before = set(tmp_path.iterdir())
    r = runner.invoke(app, ["align", "run", "--pair", f"{feats},tfidf", "--steps", "2", *common])
    assert r.exit_code == 0, r.output
    assert set(tmp_path.iterdir()) == before  # nothing new beside the run folder (was: /ABS/feats.npy__tfidf/)
    made = list((tmp_path / "run" / "align").iterdir())
    assert len(made) == 1 and (made[0] / "config.json").is_file()
    assert not Path(f"{feats}__tfidf").exists()


# --- terminal escape sequences ---------------------------------------------------------------------
ESC = "\x1b]0;owned\x07\x1b[2J"


def test_printable_shows_control_characters():
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("x\u202ey") == "x\\u202ey"  # a bidi override cannot reorder what the user reads
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"
    assert printable("naïve ü 日本") == "naïve ü 日本"


def test_error_messages_never_carry_raw_escapes():
    e = DataError(f"image {ESC}.png is missing.", fix=f"write {ESC}")
    assert "\x1b" not in str(e) and "\x07" not in str(e) and "\\x1b" in str(e)
    assert "\x1b" not in str(PairscoutError("x\x1b"))


def test_cli_error_for_an_id_with_escapes_is_printable(runner, tmp_path):
    r = runner.invoke(app, ["rank", "--vision-zoo", f"emb:{tmp_path}/v{ESC}.npy", "--text-zoo", "baseline:tfidf",
                            "--data", "generated:size=32", "--n", "20", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "\\x1b" in r.output


def test_tables_and_logs_with_an_encoder_name_holding_escapes(runner, tmp_path):
    zoo = tmp_path / "z.toml"
    zoo.write_text('name = "z"\n[[encoder]]\nid = "baseline:pixels"\nmodality = "vision"\nname = "pix\\u001b[2Jels"\n', encoding="utf-8")
    r = runner.invoke(app, ["zoo", "show", str(zoo)])
    assert r.exit_code == 0, r.output
    assert "pix\\x1b[2Jels" in r.output and "\x1b" not in r.output

    from pairscout.cli import _ui

    rec = logging.LogRecord("pairscout", logging.WARNING, __file__, 1, "left out %s", (f"enc{ESC}",), None)
    line = _ui._PlainFormatter().format(rec)
    assert "\x1b" not in line and "\\x1b" in line


def test_safe_console_keeps_its_own_styles_but_not_the_texts():
    import io

    from rich.text import Text

    from pairscout.cli._ui import SafeConsole

    buf = io.StringIO()
    SafeConsole(file=buf, force_terminal=True, color_system="standard").print(Text("x\x1b[2J", style="red"))
    s = buf.getvalue()
    assert s.startswith("\x1b[31m")  # rich's own colour code is kept
    assert "\x1b[2J" not in s and "\\x1b[2J" in s
