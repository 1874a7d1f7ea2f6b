"""The HTML report: built from saved result files, sections filled, nothing external, and it renders in
a real headless browser (Debian chromium; skipped where it is absent, installed by .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pairscout
from pairscout.cli import app
from pairscout.encode.runner import EncodeSettings
from pairscout.errors import PairscoutError
from pairscout.ranking import RankSettings
from pairscout.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    pairscout.rank("baseline:pixels,baseline:random-vision", "baseline:random-text,baseline:tfidf", "generated:n=40,seed=0,size=32",
                   settings=RankSettings(ci_groups=3, permutations=3), encode_settings=EncodeSettings(device="cpu", num_workers=0),
                   cache_dir=out / "cache", out=out)
    return out


def test_report_from_saved_files_has_every_section(rank_run, tmp_path):
    page = build_report([rank_run], tmp_path / "r.html").read_text()
    for anchor in ('id="summary"', 'id="ranking"', 'id="heatmaps"', 'id="unimodal"', 'id="provenance"'):
        assert anchor in page
    assert page.count("<svg") >= 6  # five metric heatmaps + unimodal quality
    assert page.count("<tr>") >= 4 + 4 + 4  # pairs, models, zoo provenance
    res = pairscout.RankResult.load(rank_run)
    assert f"{res.best()[0]} + {res.best()[1]}" in page
    assert res.meta["settings"]["dataset_fingerprint"] in page
    assert (rank_run / "plots" / "heatmap_cka_linear.svg").is_file() and (rank_run / "plots" / "heatmap_cka_linear.png").is_file()


def test_report_references_nothing_outside_itself(rank_run, tmp_path):
    page = build_report([rank_run], tmp_path / "r.html").read_text()
    assert not re.search(r"https?:|ftp:|//[a-z0-9.-]+\.[a-z]{2,}/", page, flags=re.I)
    # only in-page anchors and data: URIs (matplotlib embeds imshow rasters that way)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", page, flags=re.I)
    assert not re.search(r"url\((?!#)", page)  # SVG clip paths point inside the page
    assert "<link" not in page and "@import" not in page


def test_report_cli_and_rank_flag(rank_run, tmp_path):
    r = CliRunner().invoke(app, ["report", str(rank_run), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.html").stat().st_size > 10_000
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "holds no pairscout results" in r.output
    r = CliRunner().invoke(app, ["rank", "--report"])
    assert r.exit_code == 2 and "--report needs --out" in r.output
    with pytest.raises(PairscoutError, match="is not a folder"):
        build_report([tmp_path / "missing"])


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(rank_run, tmp_path):
    assert CHROMIUM is not None, "CI must run the browser test: .ci/run installs chromium"
    from playwright import sync_api
    path = build_report([rank_run], tmp_path / "r.html")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        assert errors == []
        assert all(u.startswith("file://") for u in requests)  # the page asked for nothing else
        sizes = page.eval_on_selector_all("figure svg", "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
        assert len(sizes) >= 6 and all(w > 50 and h > 50 for w, h in sizes)
        # sorting: click the "vision" header of the ranking table, the first column becomes sorted
        first = page.eval_on_selector_all("#ranking tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
        page.click("#ranking th:nth-child(2)")
        after = page.eval_on_selector_all("#ranking tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
        assert after == sorted(first)
        shot = page.screenshot(full_page=True)
        browser.close()
    from io import BytesIO

    from PIL import Image, ImageStat

    img = Image.open(BytesIO(shot)).convert("L")
    assert img.size[1] > 1000
    assert ImageStat.Stat(img).stddev[0] > 10  # not a blank page


def test_probe_and_align_refresh_the_report_with_their_sections(rank_run, tmp_path):
    runner = CliRunner()
    cache = str(rank_run / "cache")
    r = runner.invoke(app, ["probe", "--run", str(rank_run), "--cache-dir", cache, "--top-k", "2", "--bottom-k", "1", "--steps", "10",
                            "--out-dim", "16", "--batch-size", "16", "--device", "cpu", "--report"])
    assert r.exit_code == 0, r.output
    page = (rank_run / "report.html").read_text()
    assert 'id="probe"' in page and "spearman" in page and 'id="training"' not in page
    target = json.loads((rank_run / "probe.json").read_text())["target"]  # zero-shot: the generated data has labels
    assert target == "zs_top1" and (rank_run / "plots" / f"probe_{target}_vs_cka_linear_debiased.svg").is_file()
    assert "verdict" in json.loads((rank_run / "rank.json").read_text())
    r = runner.invoke(app, ["align", "--run", str(rank_run), "--cache-dir", cache, "--steps", "24", "--eval-every", "6", "--out-dim", "16",
                            "--hidden-mult", "1", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "model"), "--report"])
    assert r.exit_code == 0, r.output
    page = (rank_run / "report.html").read_text()
    assert 'id="training"' in page and "image-&gt;text R@1 (held out)" in page
    assert (tmp_path / "model" / "plots" / "training_curves.png").is_file()
