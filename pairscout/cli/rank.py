"""``pairscout rank`` and ``pairscout report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pairscout.cli import _ui as ui
from pairscout.cli._options import (
    RANK,
    BatchOpt,
    CacheOpt,
    CaptionColOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    ImageColOpt,
    JsonOpt,
    LabelColOpt,
    MetricsHelp,
    NOpt,
    PrimaryHelp,
    SeedOpt,
    SkipBadOpt,
    TextZoo,
    TrustOpt,
    VerboseOpt,
    VisionZoo,
    WorkersOpt,
)
from pairscout.cli._ui import Table
from pairscout.cli._ui import literal as L


def rank(
    vision_zoo: VisionZoo = "offline",
    text_zoo: TextZoo = "offline",
    data: DataOpt = "generated",
    n: NOpt = None,
    seed: SeedOpt = RANK.seed,
    image_column: ImageColOpt = None,
    caption_column: CaptionColOpt = None,
    label_column: LabelColOpt = None,
    metrics: Annotated[str | None, typer.Option(help=MetricsHelp, show_default=False)] = None,
    primary: Annotated[str | None, typer.Option(help=PrimaryHelp, show_default=False)] = None,
    score: Annotated[str, typer.Option(help="'primary', or 'combined' (mean z-score of all metrics).")] = RANK.score,
    ci_groups: Annotated[int, typer.Option(help="Jackknife groups behind the 95% confidence intervals (0: off).")] = RANK.ci_groups,
    permutations: Annotated[int, typer.Option(help="Shuffled pairings behind the calibrated scores of CKNNA (CKA, mutual k-NN: exact, closed form; 0: no calibration).")] = RANK.permutations,
    knn_k: Annotated[int, typer.Option("--knn-k", help="k of mutual k-NN and CKNNA.")] = RANK.knn_k,
    clip_quantile: Annotated[float | None, typer.Option(help="Clip features at this |x| quantile before neighbourhood metrics (platonic-rep: 0.95).")] = RANK.clip_quantile,
    caption_reduce: Annotated[str, typer.Option(help="Text vector per image: 'first' caption or 'mean' of captions.")] = RANK.caption_reduce,
    layers: Annotated[str | None, typer.Option(help="Layer sweep: 'all' or block indices like -1,-4,-8 for every encoder that can read hidden layers; each pair is scored at its best layer pair, p corrected for the search.", show_default=False)] = RANK.layers,
    layer_rows: Annotated[int, typer.Option(help="Rows the layer sweep chooses layers on (a seeded subset, at most half the rows; every number is measured on the others).")] = RANK.layer_rows,
    precision: Annotated[str, typer.Option(help="CKA products: auto (float32 on GPUs, float64 on CPU), float64, float32 or tf32; sums are float64 always.")] = RANK.precision,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for results (parquet, CSV, JSON) and plots (default: a new runs/rank-DATE-TIME; $PAIRSCOUT_RUNS sets the parent).", show_default=False)] = None,
    force: ForceOpt = False,
    top: Annotated[int, typer.Option(help="Rows of the table printed.")] = 10,
    wide: Annotated[bool, typer.Option("--wide", help="Print every metric, not only the primary one.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG and SVG plots to --out.")] = True,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    skip_bad: SkipBadOpt = False,
    as_json: JsonOpt = False,
    with_report: Annotated[bool, typer.Option("--report", help="Also write (or refresh) <out>/report.html.")] = False,
    verbose: VerboseOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Rank every vision x text pair of two zoos (defaults: offline zoos on the generated dataset)."""
    ui.setup_logging(verbose)
    from pairscout.cli._options import columns, given
    from pairscout.embeddings.runner import EncodeSettings
    from pairscout.errors import PairscoutError
    from pairscout.ranking import RankSettings
    from pairscout.ranking import rank as run_rank

    with ui.user_errors():
        from pairscout.bounds import check

        check("--top", top)

        import os

        defaulted = out is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1  # torchrun: each process would pick its own
        if defaulted:  # probe, align and report read a saved run: a rank is never thrown away
            out = default_run_folder()
        if with_report and out is None:
            raise PairscoutError("--report needs --out: the report is rebuilt from the saved results.", fix="add --out DIR.")
        from pairscout.files import check_out_folder

        check_out_folder(out)
        settings = RankSettings(
            metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else RANK.metrics,
            primary=primary, score=score, knn_k=knn_k, clip_quantile=clip_quantile, ci_groups=ci_groups,
            permutations=permutations, caption_reduce=caption_reduce, seed=seed, layers=layers, layer_rows=layer_rows,
            precision=precision,
        )  # fmt: skip
        with ui.progress() as rep:
            res = run_rank(vision_zoo, text_zoo, data, n=n, settings=settings, skip_bad=skip_bad,
                           columns=columns(image_column, caption_column, label_column),
                           encode_settings=given(EncodeSettings, device=device, batch_size=batch_size, num_workers=workers,
                                                        trust_remote_code=trust_remote_code),
                           cache_dir=cache_dir, out=out, force=force, plots=plots, progress=rep.phases(), command=ui.command_line())  # fmt: skip
        ui.print_table(rank_table(res, top, wide), wide)
        for key, note in res.meta.get("adapted", {}).items():
            ui.say(f"small data: --{key.replace('_', '-')} {note['asked']} -> {note['used']} ({note['why']})")
        if res.meta.get("verdict"):
            ui.say(f"verdict: {res.meta['verdict']['reason']}")
        phases = dict(res.meta.get("timings_s", {}).get("metrics_phases") or {})
        total = phases.pop("total", 0.0)
        if total > 0:  # where the metrics phase spent its time, one line per phase with its share
            ui.say(f"metrics phase {total:.1f} s: " + "; ".join(f"{k} {v:.1f} s ({100 * v / total:.0f} %)" for k, v in phases.items()))
        if out is None:
            ui.warn("no --out under torchrun: nothing was saved; probe, align and report need a saved run (add --out DIR).")
        if out is not None:
            ui.say(f"results in {out}/ (pairs.parquet, pairs.csv, models.csv, rank.json, plots/)"
                   + (" (no --out given: a new folder; pass --out DIR to choose one)" if defaulted else ""))
            ui.say(f"next: pairscout probe {out}   (then: pairscout align {out}; pairscout report {out})")
        if with_report and out is not None:
            from pairscout.report import build_report

            ui.say(f"report: {build_report([out])}")
        if as_json:
            payload = {"pairs": res.pairs.to_dict(orient="records"), "models": res.models.to_dict(orient="records"), "meta": res.meta}
            ui.print_json(payload)
        if res.meta["failures"]:
            ui.error(f"{len(res.meta['failures'])} model(s) failed and were left out: "
                     + "; ".join(f"{k}: {v}" for k, v in res.meta["failures"].items()))  # fmt: skip
            raise typer.Exit(1)


def default_run_folder() -> Path:
    """Where a rank without ``--out`` saves: ``$PAIRSCOUT_RUNS`` (default ``runs``) / ``rank-YYYYMMDD-HHMMSS``, a new
    folder each time (a ``-2``, ``-3`` suffix if two runs start in the same second)."""
    import os
    import time

    root = Path(os.environ.get("PAIRSCOUT_RUNS") or "runs")
    base = root / time.strftime("rank-%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def rank_table(res, top: int, wide: bool = False) -> Table:
    """Rank, full model names, the primary value ± its interval and p; every metric with ``wide``.
    Fits 100 columns for names up to ~30 characters (longer names fold, never cut)."""
    from pairscout.metrics.registry import label

    ds, st = res.meta["dataset"], res.meta["settings"]
    has_p = f"{res.primary}_p" in res.pairs
    caption = "value ± half-width of the 95 % jackknife interval (how much the value moves with the rows)"
    if st.get("permutations") and has_p:
        caption += ("; p: Holm-corrected p-value against shuffled pairings (is it above chance; how: rank.json "
                    "null_methods), so a small p beside an interval reaching 0 is no contradiction")
    sweep = "vision_layer" in res.pairs
    if sweep:
        lm = res.meta.get("layers", {})
        caption += (f"; @k: block k (0-based) chosen by the layer sweep on {lm.get('selection_rows')} rows, every number "
                    f"measured on the other {lm.get('estimation_rows')}")
    from pairscout.ranking.verdict import control_pairs

    control = control_pairs(res.pairs)
    if control.any():
        caption += "; c: a control pair (a baseline: encoder on either side), which the verdict never recommends"
    if not wide and len(res.metrics) > 1:
        caption += "; --wide (or pairs.csv) for the other metrics"
    table = Table(title=L(f"top pairs on {ds.get('name')} (n = {st['n']}), ranked by {st['score']}: {label(res.primary)}"), caption=L(caption))
    table.add_column("#", justify="right", no_wrap=True)
    longest = {side: max([len(str(v)) for v in res.pairs[side]] + [4]) + (8 if sweep else 0) for side in ("vision", "text")}
    table.add_column("vision", overflow="fold", min_width=longest["vision"] if wide else None)
    table.add_column("text", overflow="fold", min_width=longest["text"] if wide else None)
    shown = [res.primary, *([m for m in res.metrics if m != res.primary] if wide else [])]
    for m in shown:
        table.add_column(L(label(m)), justify="right", no_wrap=True)
        if m == res.primary and has_p:
            table.add_column("p", justify="right", no_wrap=True)
    for k, (_, row) in enumerate(res.pairs.head(top).iterrows()):
        cells = []
        for m in shown:
            cells.append(ui.with_interval(row, m))
            if m == res.primary and has_p:
                p = row.get(f"{m}_p_holm", row[f"{m}_p"])
                cells.append("<1e-3" if p < 1e-3 else f"{p:.3f}")
        names = [str(row[k]) + (f" @{row[f'{k}_layer']}" if sweep else "") for k in ("vision", "text")]
        table.add_row(str(row["rank"]) + (" c" if control[k] else ""), L(names[0]), L(names[1]), *cells)
    return table


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by rank / probe / align --out.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: <first run>/report.html).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", hidden=True, help="Old spelling of --out.")] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "pairscout report",
) -> None:
    """One self-contained HTML page (inline CSS and SVG, no external URL) rebuilt from saved results."""
    from pairscout.report import build_report

    with ui.user_errors():
        from pairscout.files import check_out_folder

        target = out if out is not None else output
        check_out_folder(target.parent if target is not None and target.suffix else target)
        path = build_report(runs, out if out is not None else output, title=title)
        ui.say(f"report written to {path} ({path.stat().st_size / 1024:.0f} KiB)")
