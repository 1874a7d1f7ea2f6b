"""The HTML report: built from saved result files, sections filled, nothing external, and it renders in
a real headless browser (Debian chromium; skipped where it is absent, installed by .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import pairscout
from pairscout.cli import app
from pairscout.embeddings.runner import EncodeSettings
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
    # `rank --report` without --out is no longer refused: the rank saves to a new runs/rank-DATE-TIME folder (issue 23)
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
    probe = json.loads((rank_run / "probe.json").read_text())
    target = probe["target"]  # the read-out that separates the pairs best; zero-shot top-1 is among the candidates (labels)
    assert target == probe["target_choice"]["target"] and "zs_top1" in {s["readout"] for s in probe["target_choice"]["separation"]}
    assert ("± 95 % (binomial," in page) == (probe["target_direction"] == "higher")  # a proportion's uncertainty beside it
    assert "Had you followed each rule" in page and "freeze-align: max linear CKA" in page
    assert (rank_run / "plots" / f"probe_{target}_vs_cka_linear_debiased.svg").is_file()
    assert "verdict" in json.loads((rank_run / "rank.json").read_text())
    r = runner.invoke(app, ["align", "--run", str(rank_run), "--cache-dir", cache, "--steps", "24", "--eval-every", "6", "--out-dim", "16",
                            "--hidden-mult", "1", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "model"), "--report"])
    assert r.exit_code == 0, r.output
    page = (rank_run / "report.html").read_text()
    assert 'id="training"' in page and "image-&gt;text R@1 (held out)" in page
    assert (tmp_path / "model" / "plots" / "training_curves.png").is_file()


# --- what a person sees: a probed and aligned run beside a second run, at three widths ------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Run "alpha" (3 x 2 weight-free encoders, probed on 4 pairs, aligned with one evaluation at the end) and run
    "beta" (another dataset), each its own folder: ``(alpha, alpha/align, beta)``."""
    root = tmp_path_factory.mktemp("two")
    cache = root / "cache"
    runs = []
    for name, data in (("alpha", "generated:n=60,seed=0,size=32"), ("beta", "generated:n=40,seed=3,size=32")):
        pairscout.rank("baseline:pixels,baseline:random-vision,baseline:random-net", "baseline:random-text,baseline:tfidf", data,
                       settings=RankSettings(ci_groups=3, permutations=3), encode_settings=EncodeSettings(device="cpu", num_workers=0),
                       cache_dir=cache, out=root / name, plots=False)  # fmt: skip
        runs.append(root / name)
    alpha = runs[0]
    r = CliRunner().invoke(app, ["probe", str(alpha), "--cache-dir", str(cache), "--top-k", "2", "--middle-k", "1", "--bottom-k", "1",
                                 "--steps", "20", "--out-dim", "16", "--batch-size", "16", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["align", str(alpha), "--cache-dir", str(cache), "--steps", "30", "--eval-every", "0", "--out-dim", "16",
                                 "--hidden-mult", "1", "--batch-size", "16", "--device", "cpu", "--out", str(alpha / "align")])  # fmt: skip
    assert r.exit_code == 0, r.output
    return alpha, alpha / "align", runs[1]


def test_combined_report_labels_each_run_and_plots_no_single_point(two_runs, tmp_path):
    alpha, aligned, beta = two_runs
    page = build_report([alpha, aligned, beta], tmp_path / "r.html").read_text()
    assert 'class="run">run: alpha' in page and 'class="run">run: beta' in page and "run: alpha/align" in page
    assert "run alpha: linear CKA (debiased)" in page and "run beta: linear CKA (debiased)" in page  # on the plots too
    assert "Held-out evaluation" in page and not (aligned / "plots" / "eval_curves.svg").exists()  # one evaluation: a table
    assert (aligned / "plots" / "training_curves.svg").is_file()
    assert "knn_acc" not in page.split('id="unimodal"')[1].split("</figure>")[0]  # human names in the unimodal figure
    assert "k-NN accuracy" in page and "SVCCA" in page and "Which measure predicts" in page
    above = json.loads((alpha / "probe.json").read_text())["above_chance"]
    assert ("not clearly above chance" in page) == (not above)
    from pairscout import plots

    assert plots.curves([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}], "step", ["loss"], "t") is None


def _with_published_source(runs: tuple[Path, Path, Path], dest: Path) -> list[Path]:
    """Copies of ``runs`` whose first text encoder of run alpha carries the published MTEB row of all-MiniLM-L6-v2:
    the weight-free encoders have none, and that row's source (a path of ~185 characters) is the widest cell a
    real unimodal table holds."""
    from pairscout.metrics.published import published_mteb

    root = runs[0].parent
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("cache"))
    copies = [dest / p.relative_to(root) for p in runs]
    models_file = copies[0] / "models.parquet"
    models = pd.read_parquet(models_file)
    pub = published_mteb("all-MiniLM-L6-v2")
    row = models.index[models["modality"] == "text"][0]
    models.loc[row, ["published_score", "published_metric", "published_source"]] = [pub.score, pub.metric, pub.source]
    models.to_parquet(models_file)
    return copies


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (apt-get install chromium)")
def test_report_at_three_widths_no_overflow_sticky_names_labels_apart(two_runs, tmp_path):
    """Screenshots at 800, 1300 and 1920 px: no page-level horizontal overflow, the verdict above the fold, the
    ranking table's name columns still in view after scrolling it sideways, every column of the unimodal table in
    view once scrolled (a published source is a long path), plot labels that do not overlap, type no smaller than
    10 px, figures side by side only where there is room."""
    assert CHROMIUM is not None, "CI must run the browser test: .ci/run installs chromium"
    from playwright import sync_api

    path = build_report(_with_published_source(two_runs, tmp_path / "two"), tmp_path / "r.html")
    seen: dict[int, dict] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        for width in (800, 1300, 1920):
            page = browser.new_page(viewport={"width": width, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert errors == []
            info = page.evaluate("""() => {
              const r = e => e.getBoundingClientRect();
              const figs = [...document.querySelectorAll('#heatmaps figure')].map(f => [r(f).left, r(f).top, r(f).right]);
              const labels = [...document.querySelectorAll('figure svg')].map(svg => {
                const box = r(svg);
                return {box: [box.left, box.top, box.right, box.bottom],
                        texts: [...svg.querySelectorAll('g[id^="point-label"] text')].map(t => { const b = r(t); return [b.left, b.top, b.right, b.bottom]; })};
              });
              const sizes = [...document.querySelectorAll('figure svg text')].filter(t => r(t).width > 0)
                .map(t => parseFloat(getComputedStyle(t).fontSize) * r(t.ownerSVGElement).width / t.ownerSVGElement.viewBox.baseVal.width);
              return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth, verdict: r(document.querySelector('.verdict')).top,
                      figs, labels, minFont: Math.min(...sizes)};
            }""")
            seen[width] = info
            assert info["scroll"] <= info["inner"], f"page overflows sideways at {width}px"
            assert info["verdict"] < 600  # the verdict is the first thing on the page
            assert info["minFont"] >= (10 if width >= 1300 else 9), (width, info["minFont"])
            n_labels = 0
            for fig in info["labels"]:
                boxes = fig["texts"]
                n_labels += len(boxes)
                for i, a in enumerate(boxes):
                    assert a[0] >= fig["box"][0] - 1 and a[2] <= fig["box"][2] + 1  # inside its figure
                    for b in boxes[i + 1:]:
                        overlap = min(a[2], b[2]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[1], b[1]) > 1
                        assert not overlap, (width, a, b)
            assert n_labels >= 3  # the scatter plots label the verdict / tied / best pairs
            if width == 1300:  # scroll the ranking table sideways: the names stay, the numbers move
                wrap = page.locator("#ranking .tablewrap").first
                wrap.evaluate("w => w.scrollIntoView({block: 'center'})")  # in the viewport, below the sticky navigation
                dims = wrap.evaluate("w => [w.scrollWidth, w.clientWidth]")
                assert dims[0] > dims[1]  # the table is wider than the page: the test means something
                before = page.evaluate("() => document.querySelector('#ranking tbody tr').cells[6].getBoundingClientRect().left")
                wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")
                page.wait_for_timeout(100)
                state = page.evaluate("""() => {
                  const w = document.querySelector('#ranking .tablewrap').getBoundingClientRect();
                  const row = document.querySelector('#ranking tbody tr');
                  const out = [1, 2].map(i => { const b = row.cells[i].getBoundingClientRect();
                    const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
                    return [b.left >= w.left - 1 && b.right <= w.right + 1, hit === row.cells[i] || row.cells[i].contains(hit)]; });
                  return {names: out, moved: row.cells[6].getBoundingClientRect().left};
                }""")
                assert all(inside and on_top for inside, on_top in state["names"]), state
                assert state["moved"] < before - 50
            # the unimodal tables scrolled to their right end: each last cell whole, beside the sticky encoder column
            page.evaluate("() => document.querySelectorAll('#unimodal .tablewrap').forEach(w => { w.scrollLeft = w.scrollWidth; })")
            page.wait_for_timeout(100)
            last = page.evaluate("""() => [...document.querySelectorAll('#unimodal .tablewrap')].flatMap(w => {
              const box = w.getBoundingClientRect();
              return [...w.querySelectorAll('tr')].map(row => {
                const name = row.cells[0].getBoundingClientRect(), cell = row.cells[row.cells.length - 1];
                const b = cell.getBoundingClientRect();
                return {text: cell.textContent.length, clear: b.left >= name.right - 1, inside: b.right <= box.right + 1};
              });
            })""")
            assert max(c["text"] for c in last) > 100  # the long source is there: the test means something
            assert all(c["clear"] and c["inside"] for c in last), (width, last)
            page.screenshot(path=str(tmp_path / f"report_{width}.png"), full_page=True)
            page.close()
        browser.close()
    # at 800 px the heatmaps stack; at 1920 px at least two share a row
    tops = lambda w: [round(t) for _, t, _ in seen[w]["figs"]]  # noqa: E731
    assert len(set(tops(800))) == len(tops(800)) and len(set(tops(1920))) < len(tops(1920))
    from PIL import Image

    assert all(Image.open(tmp_path / f"report_{w}.png").size[0] == w for w in (800, 1300, 1920))


def test_point_labels_never_overlap_and_only_chosen_points_are_named():
    import numpy as np
    import pandas as pd

    from pairscout import plots

    n = 12  # eight pairs in a tight cluster (tied pairs), four spread out
    df = pd.DataFrame({"rank": range(1, n + 1), "vision": [f"vision{i}" for i in range(n)], "text": "text0",
                       "x": np.r_[np.linspace(0.90, 0.95, 8), [0.1, 0.2, 0.3, 0.5]], "y": np.r_[np.linspace(0.50, 0.55, 8), [0.1, 0.12, 0.2, 0.4]]})  # fmt: skip
    fig = plots.metric_scatter(df, "x", "y", highlight=[0, 1, 2, 8, 9, 11], notes={0: "verdict"})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_gid() == "point-label"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert len(boxes) >= 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    named = " ".join(t.get_text() for t in labels)
    assert "#1" in named and "#10" in named and "#5" not in named  # only the highlighted pairs
    key = fig.texts[-1].get_text()
    assert "#1  vision0 × text0  (verdict)" in key and "vision4" not in key


def test_forest_plot_orders_predictors_and_marks_the_corrected_ones():
    import pandas as pd

    from pairscout import plots
    from pairscout.evaluation.predictors import correlations

    df = pd.DataFrame({"mean_r1": range(8), "cka_linear": range(8), "svcca": [0, 2, 1, 3, 5, 4, 7, 6], "rsa": [3, 1, 4, 1, 5, 9, 2, 6]})
    corr = correlations(df, ["rsa", "svcca", "cka_linear"])
    fig = plots.forest(corr, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == corr["label"].tolist() == ["linear CKA", "SVCCA", "RSA (RDM Spearman)"]
    filled = [ln for ln in ax.lines if ln.get_marker() == "o" and ln.get_markerfacecolor() != "white"]
    assert len(filled) == int((corr["spearman_p_holm"] < 0.05).sum()) >= 1
    assert plots.forest(corr.iloc[:1], "t") is None  # one predictor: a number, not a plot


def test_a_folder_of_aligned_models_is_read_as_its_models(tmp_path):
    """`pairscout align RUN` saves RUN/align/V__T/; `report RUN RUN/align` takes the model folders inside."""
    from pairscout.report.build import _model_folders

    (tmp_path / "align" / "a__x" / "train").mkdir(parents=True)
    (tmp_path / "align" / "a__x" / "train" / "train_log.json").write_text("{}")
    (tmp_path / "align" / "b__y").mkdir()
    (tmp_path / "align" / "b__y" / "notes.txt").write_text("not a model")
    assert _model_folders(tmp_path / "align") == [tmp_path / "align" / "a__x"]
    assert _model_folders(tmp_path / "align" / "a__x") == [tmp_path / "align" / "a__x"]
    assert _model_folders(tmp_path / "align" / "b__y") == [tmp_path / "align" / "b__y"]  # nothing inside: its own one-line error follows


def test_the_folder_finder_and_collect_read_one_list_of_result_files(tmp_path):
    """report.build.RESULT_FILES says where each result file may lie; result_files finds them, collect reads the same
    ones (an alignment's log in model/, its config in train/), and a folder with none is a one-line error naming them."""
    from pairscout.report.build import RESULT_FILES, collect, result_files

    m = tmp_path / "m"
    (m / "model").mkdir(parents=True)
    (m / "train").mkdir()
    (m / "model" / "train_log.json").write_text(json.dumps({"history": [], "config": {"head": "linear"}}))
    (m / "train" / "config.json").write_text(json.dumps({"head": "linear"}))
    (m / "train" / "rank.json").write_text("{}")  # not where a rank run's file lies: not a result
    assert result_files(m) == {"train_log.json": m / "model" / "train_log.json"}
    run = collect([m])[0]
    assert run.rank is None and run.train_log == {"history": [], "config": {"head": "linear"}} and run.model_config == {"head": "linear"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairscoutError, match=f"no {', '.join(list(RESULT_FILES)[:-1])} or {list(RESULT_FILES)[-1]}"):
        collect([tmp_path / "empty"])
