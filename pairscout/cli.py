"""The ``pairscout`` command line: parses, calls the core, prints. No logic of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pairscout.errors import PairscoutError

app = typer.Typer(
    name="pairscout",
    help="Pick the frozen vision and text encoders to pair before you spend GPU-days aligning them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _quiet_libraries() -> None:
    """Our own progress bars only: silence the per-load bars of transformers and the hub client."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


zoo_app = typer.Typer(help="List and inspect model zoos.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect the embedding cache.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(cache_app, name="cache")

err = Console(stderr=True)
"""Everything meant for a human goes to stderr, so stdout stays machine-readable."""
out = Console()


@contextlib.contextmanager
def _user_errors():
    """Print a :class:`PairscoutError` as one red line and exit with its code; no traceback."""
    for console in (err, out):  # piped output (files, CI logs): wide tables, never cut ids
        if not console.is_terminal:
            console.width = max(console.width, 160)
    try:
        yield
    except PairscoutError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # '[a, b]' in a message is text
        raise typer.Exit(e.exit_code) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )


# --- shared options ----------------------------------------------------------------------------
VisionZoo = Annotated[str, typer.Option("--vision-zoo", "-v", help="Zoo name, TOML path, or comma list of vision encoder ids.")]
TextZoo = Annotated[str, typer.Option("--text-zoo", "-t", help="Zoo name, TOML path, or comma list of text encoder ids.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="'generated[:n=..,seed=..]', a CSV/JSONL manifest, COCO caption JSON, image folder, or WebDataset tar(s).")]
NOpt = Annotated[int | None, typer.Option("--n", help="Use a fixed-seed random subset of N rows.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for subsets and splits.")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Embedding cache folder (default: $PAIRSCOUT_CACHE or ~/.cache/pairscout).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Let zoo entries with trust_remote_code run Python code from their model repository.")]


def _load_data(data: str, n: int | None, seed: int, skip_bad: bool):
    from pairscout.data import load_dataset

    # generated data: n rows rendered from seed; files: a fixed-seed subset of n rows
    ds = load_dataset(data, n=n, seed=seed, skip_bad=skip_bad)
    if skip_bad:
        bad = ds.find_bad_images()
        if bad:
            bad_rows = {i for i, _ in bad}
            ds = ds.select([i for i in range(len(ds)) if i not in bad_rows])
            err.print(f"[yellow]skipped {len(bad)} bad image(s)[/], e.g. {bad[0][1]}", highlight=False)
    return ds


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _progress_callback(progress: Progress):
    tasks: dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done, total=total)

    return update


# --- zoo -----------------------------------------------------------------------------------------
@zoo_app.command("list")
def zoo_list() -> None:
    """The zoos shipped with pairscout."""
    from pairscout.zoo.registry import available_zoos, get_zoo

    with _user_errors():
        table = Table(title="zoos")
        for col in ("name", "vision", "text", "description"):
            table.add_column(col)
        for name in available_zoos():
            z = get_zoo(name)
            table.add_row(name, str(len(z.of("vision"))), str(len(z.of("text"))), z.description)
        out.print(table)


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="Zoo name or TOML path.")]) -> None:
    """Every encoder of a zoo with its settings."""
    from pairscout.zoo.registry import get_zoo, load_zoo_file

    with _user_errors():
        z = load_zoo_file(name) if name.endswith(".toml") else get_zoo(name)
        table = Table(title=f"zoo {z.name}: {z.description}")
        for col in ("name", "id", "modality", "revision", "pooling", "dim", "params (M)", "license"):
            table.add_column(col, overflow="fold")
        for e in z.encoders:
            table.add_row(e.name, e.id, e.modality, e.revision or "", e.pooling, str(e.dim or ""), str(e.params_m or ""), e.license or "")
        out.print(table)


# --- encode --------------------------------------------------------------------------------------
@app.command()
def encode(
    vision_zoo: VisionZoo = "offline",
    text_zoo: TextZoo = "offline",
    data: DataOpt = "generated",
    n: NOpt = None,
    seed: SeedOpt = 0,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Images or captions per batch.")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-loading processes.")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also cache token-level features.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip rows whose image is missing or corrupt, and report the count.")] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Re-encode even when cached.")] = False,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log cache hits and resumes.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Encode a paired dataset with every model of two zoos (cached, resumable)."""
    _setup_logging(verbose)
    from pairscout.encode.cache import EmbeddingCache
    from pairscout.encode.runner import EncodeSettings, encode_zoo, pick_device
    from pairscout.zoo.registry import resolve_zoo

    with _user_errors():
        vz, tz = resolve_zoo(vision_zoo, "vision"), resolve_zoo(text_zoo, "text")
        ds = _load_data(data, n, seed, skip_bad)
        cache = EmbeddingCache(cache_dir)
        settings = EncodeSettings(device=device, batch_size=batch_size, num_workers=workers, amp=amp, tokens=tokens,
                                  trust_remote_code=trust_remote_code)
        dev = pick_device(device)
        err.print(f"[bold]{ds.name}[/]: {len(ds)} images, fingerprint {ds.fingerprint}; device {dev}; cache {cache.root}", highlight=False)
        with _progress() as progress:
            res = encode_zoo(list(vz.encoders) + list(tz.encoders), ds, cache=cache, settings=settings, progress=_progress_callback(progress), refresh=refresh)
        table = Table(title="embeddings")
        for col in ("model", "modality", "rows", "dim", "seconds", "status"):
            table.add_column(col)
        for name, e in res.embeddings.items():
            table.add_row(name, e.meta.get("modality", ""), str(e.pooled.shape[0]), str(e.dim), f"{e.meta.get('encode_seconds', 0):.1f}", "ok")
        for name, msg in res.failures.items():
            table.add_row(name, "", "", "", "", f"[red]{escape(msg)}[/]")
        err.print(table)
        if as_json:
            summary = {
                "dataset": ds.describe(),
                "embeddings": {k: {kk: v.meta.get(kk) for kk in ("model_id", "modality", "n", "dim", "precision")} for k, v in res.embeddings.items()},
                "failures": res.failures,
            }
            out.print_json(json.dumps(summary, default=str))
        if res.failures:
            err.print(f"[bold red]error:[/] {len(res.failures)} model(s) failed: {', '.join(res.failures)}; the others are cached.")
            raise typer.Exit(1)


# --- rank ----------------------------------------------------------------------------------------
@app.command()
def rank(
    vision_zoo: VisionZoo = "offline",
    text_zoo: TextZoo = "offline",
    data: DataOpt = "generated",
    n: NOpt = None,
    seed: SeedOpt = 0,
    metrics: Annotated[str | None, typer.Option(help="Comma list of pair metrics from cka_linear, cka_linear_debiased, cka_rbf, cka_rbf_debiased, mutual_knn, cknna (default: all).")] = None,
    primary: Annotated[str | None, typer.Option(help="Metric that ranks the pairs (default: cka_linear; cka_linear_debiased below 10,000 rows).")] = None,
    score: Annotated[str, typer.Option(help="'primary', or 'combined' (mean z-score of all metrics).")] = "primary",
    ci_groups: Annotated[int, typer.Option(help="Jackknife groups behind the 95% confidence intervals (0: off).")] = 10,
    permutations: Annotated[int, typer.Option(help="Shuffled pairings for the primary metric's chance level and p-value (0: off).")] = 20,
    knn_k: Annotated[int, typer.Option("--knn-k", help="k of mutual k-NN and CKNNA.")] = 10,
    clip_quantile: Annotated[float | None, typer.Option(help="Clip features at this |x| quantile before neighbourhood metrics (platonic-rep: 0.95).")] = None,
    caption_reduce: Annotated[str, typer.Option(help="Text vector per image: 'first' caption or 'mean' of captions.")] = "first",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for results (parquet, CSV, JSON) and plots.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a run with other settings in --out.")] = False,
    top: Annotated[int, typer.Option(help="Rows of the table printed.")] = 10,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG and SVG plots to --out.")] = True,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Images or captions per batch.")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-loading processes.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip rows whose image is missing or corrupt.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (everything human goes to stderr).")] = False,
    with_report: Annotated[bool, typer.Option("--report", help="Also write (or refresh) <out>/report.html.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log cache hits and resumes.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Rank every vision x text pair of two zoos (defaults: offline zoos on the generated dataset)."""
    _setup_logging(verbose)
    from pairscout.encode.runner import EncodeSettings
    from pairscout.ranking import RankSettings
    from pairscout.ranking import rank as run_rank
    from pairscout.ranking.compute import DEFAULT_METRICS

    with _user_errors():
        if with_report and out is None:
            raise PairscoutError("--report needs --out: the report is rebuilt from the saved results.", fix="add --out DIR.")
        settings = RankSettings(
            metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else DEFAULT_METRICS,
            primary=primary, score=score, knn_k=knn_k, clip_quantile=clip_quantile, ci_groups=ci_groups,
            permutations=permutations, caption_reduce=caption_reduce, seed=seed,
        )
        ds = _load_data(data, n, seed, skip_bad)
        with _progress() as progress:
            res = run_rank(
                vision_zoo, text_zoo, ds, settings=settings,
                encode_settings=EncodeSettings(device=device, batch_size=batch_size, num_workers=workers, trust_remote_code=trust_remote_code),
                cache_dir=cache_dir, out=out, force=force, plots=plots, progress=_progress_callback(progress),
                command=" ".join(["pairscout", *sys.argv[1:]]),
            )
        err.print(_rank_table(res, top))
        if out is not None:
            err.print(f"results in {out}/ (pairs.parquet, pairs.csv, models.csv, rank.json, plots/)", highlight=False)
        if with_report and out is not None:
            from pairscout.report import build_report

            err.print(f"report: {build_report([out])}", highlight=False)
        if as_json:
            payload = {"pairs": res.pairs.to_dict(orient="records"), "models": res.models.to_dict(orient="records"), "meta": res.meta}
            out_console = Console(soft_wrap=True)
            out_console.print_json(json.dumps(payload, default=str))
        if res.meta["failures"]:
            err.print(f"[bold red]error:[/] {len(res.meta['failures'])} model(s) failed and were left out: "
                      + escape("; ".join(f"{k}: {v}" for k, v in res.meta["failures"].items())), highlight=False, soft_wrap=True)
            raise typer.Exit(1)


def _fmt(row, m: str) -> str:
    """``0.143 ± 0.011`` (value and half-width of its 95 % interval) or just the value."""
    v = row.get(m)
    if v is None or v != v:
        return "-"
    lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
    if lo is not None and hi is not None and lo == lo and hi == hi:
        return f"{v:.3f} ± {(hi - lo) / 2:.3f}"
    return f"{v:.3f}"


def _rank_table(res, top: int) -> Table:
    from pairscout.ranking.compute import LABELS

    ds = res.meta["dataset"]
    st = res.meta["settings"]
    table = Table(
        title=f"top pairs on {ds.get('name')} (n = {st['n']}), ranked by {st['score']}: {LABELS.get(res.primary, res.primary)}",
        caption="value ± half-width of the 95 % jackknife interval"
        + (f"; p: permutation p-value of the primary metric over {st['permutations']} shuffled pairings (smallest possible 1/{st['permutations'] + 1})"
           if st.get("permutations") else ""),
    )
    table.add_column("#", justify="right")
    table.add_column("vision", no_wrap=True)
    table.add_column("text", no_wrap=True)
    ordered = [res.primary, *[m for m in res.metrics if m != res.primary]]
    for m in ordered:
        table.add_column(LABELS.get(m, m), justify="right", no_wrap=True)
        if m == res.primary and f"{m}_p" in res.pairs:
            table.add_column("p", justify="right")
    for _, row in res.pairs.head(top).iterrows():
        cells = []
        for m in ordered:
            cells.append(_fmt(row, m))
            if m == res.primary and f"{m}_p" in res.pairs:
                cells.append(f"{row[f'{m}_p']:.3f}")
        table.add_row(str(row["rank"]), row["vision"], row["text"], *cells)
    return table


# --- report --------------------------------------------------------------------------------------
@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by rank / probe / align --out.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file (default: <first run>/report.html).")] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "pairscout report",
) -> None:
    """One self-contained HTML page (inline CSS and SVG, no external URL) rebuilt from saved results."""
    from pairscout.report import build_report

    with _user_errors():
        path = build_report(runs, output, title=title)
        err.print(f"report written to {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False)


# --- cache ---------------------------------------------------------------------------------------
@cache_app.command("list")
def cache_list(cache_dir: CacheOpt = None) -> None:
    """Every cached embedding set with its model, dataset and size."""
    from pairscout.encode.cache import EmbeddingCache

    with _user_errors():
        cache = EmbeddingCache(cache_dir)
    table = Table(title=f"cache {cache.root}")
    for col in ("model", "dataset", "fingerprint", "n", "dim", "precision", "tokens", "MB"):
        table.add_column(col)
    for r in cache.entries():
        table.add_row(
            str(r.get("model_id")), str(r.get("dataset")), str(r.get("dataset_fingerprint")), str(r.get("n")),
            str(r.get("dim")), str(r.get("precision")), str(r.get("tokens")), f"{r['size_mb']:.1f}",
        )
    out.print(table)


def main() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun (torch imported only then)
        from pairscout import distributed

        if distributed.init_from_env() and not distributed.is_main():
            err.quiet = out.quiet = True  # only rank 0 talks
    try:
        app()
    except PairscoutError as e:  # raised outside a command body (should not happen, but never a traceback)
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)



# --- probe / align / zero-shot (issue 5): defined in pairscout.align.cli, registered here -------
from pairscout.align.cli import align_command, probe_command, zero_shot_command  # noqa: E402

app.command("probe")(probe_command)
app.command("align")(align_command)
app.command("zero-shot")(zero_shot_command)


if __name__ == "__main__":
    main()
