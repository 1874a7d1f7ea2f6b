"""``pairscout zoo``, ``pairscout encode`` and ``pairscout cache``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from pairscout.cli import _ui as ui
from pairscout.cli._options import (
    RANK,
    BatchOpt,
    CacheOpt,
    CaptionColOpt,
    DataOpt,
    DeviceOpt,
    ImageColOpt,
    JsonOpt,
    LabelColOpt,
    NOpt,
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

if TYPE_CHECKING:
    from pairscout.zoo.registry import Zoo

zoo_app = typer.Typer(help="List and inspect model zoos.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect and clear the embedding cache.", no_args_is_help=True)


@zoo_app.command("list")
def zoo_list() -> None:
    """The zoos shipped with pairscout."""
    from pairscout.zoo.registry import available_zoos, get_zoo

    with ui.user_errors():
        table = Table(title="zoos")
        for col in ("name", "vision", "text", "description"):
            table.add_column(col)
        for name in available_zoos():
            z = get_zoo(name)
            table.add_row(L(name), str(len(z.of("vision"))), str(len(z.of("text"))), L(z.description))
        ui.out.print(table)


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="Zoo name or TOML path.")]) -> None:
    """Every encoder of a zoo with its settings."""
    from pairscout.zoo.registry import get_zoo, load_zoo_file

    with ui.user_errors():
        z = load_zoo_file(name) if name.endswith(".toml") else get_zoo(name)
        ui.out.print(L(f"zoo {z.name}: {z.description}"))
        for table in zoo_tables(z):
            ui.out.print(table)


def zoo_tables(z: Zoo) -> list[Table]:
    """One table per modality of zoo ``z``.

    Name, id and revision share the first column as short lines (three side-by-side columns left the id
    ~15 characters at 100 columns, folded mid-word), pinned commit shas are shown as their first 12
    characters, and a column that every row of the table leaves empty is left out: the shipped zoos fit
    100 columns with every id whole. On a narrower console that first column folds before the others.
    """
    tables = []
    for modality in ("vision", "text"):
        specs = z.of(modality)
        if not specs:
            continue
        short = [e.revision[:12] if e.revision and re.fullmatch(r"[0-9a-f]{40}", e.revision) else e.revision for e in specs]
        rows = [
            (Text.assemble((e.name, "bold"), "\n", e.id, *(("\nrevision ", rev) if rev else ())),
             L(e.pooling + (f", layer {e.layer}" if e.layer is not None else "") + (f", layers {e.layers}" if e.layers is not None else "")),
             str(e.dim or ""), str(e.params_m or ""), L(e.license or ""))
            for e, rev in zip(specs, short, strict=True)
        ]  # fmt: skip
        caption = "revision: first 12 characters of the pinned commit" if short != [e.revision for e in specs] else None
        table = Table(title=f"{len(specs)} {modality} encoder{'s' if len(specs) > 1 else ''}", caption=caption, show_lines=True)
        columns = [("name, id" + (", revision" if any(short) else ""), {"overflow": "fold"}), ("pooling", {}), ("dim", {"justify": "right", "no_wrap": True}),
                   ("params\n(M)", {"justify": "right", "no_wrap": True}), ("license", {"no_wrap": True})]  # fmt: skip
        keep = [i for i in range(len(columns)) if i == 0 or any(str(row[i]) for row in rows)]
        for i in keep:
            table.add_column(columns[i][0], **columns[i][1])
        for row in rows:
            table.add_row(*(row[i] for i in keep))
        tables.append(table)
    return tables


def encode(
    vision_zoo: VisionZoo = "offline",
    text_zoo: TextZoo = "offline",
    data: DataOpt = "generated",
    n: NOpt = None,
    seed: SeedOpt = RANK.seed,
    image_column: ImageColOpt = None,
    caption_column: CaptionColOpt = None,
    label_column: LabelColOpt = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also cache token-level features.")] = False,
    skip_bad: SkipBadOpt = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Re-encode even when cached.")] = False,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (default: on).", show_default=False)] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Encode a paired dataset with every model of two zoos (cached, resumable)."""
    ui.setup_logging(verbose)
    from pairscout.cli._options import columns, given
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.runner import EncodeSettings, encode_zoo
    from pairscout.resolve import drop_bad_images, resolve_data, resolve_zoos
    from pairscout.runtime import pick_device

    with ui.user_errors():
        vz, tz = resolve_zoos(vision_zoo, text_zoo)
        ds = resolve_data(data, n=n, seed=seed, skip_bad_rows=skip_bad, columns=columns(image_column, caption_column, label_column))
        if skip_bad:
            ds, bad = drop_bad_images(ds)
            if bad:
                ui.warn(f"skipped {len(bad)} bad image(s), e.g. {bad[0][1]}")
        cache = EmbeddingCache(cache_dir)
        settings = given(EncodeSettings, device=device, batch_size=batch_size, num_workers=workers, amp=amp, tokens=tokens,
                         trust_remote_code=trust_remote_code)
        ui.say(f"{ds.name}: {len(ds)} images, fingerprint {ds.fingerprint}; device {pick_device(device)}; cache {cache.root}")
        with ui.progress() as rep:
            res = encode_zoo(list(vz.encoders) + list(tz.encoders), ds, cache=cache, settings=settings, progress=rep.phases(), refresh=refresh)
        table = Table(title="embeddings")
        for col in ("model", "modality", "rows", "dim", "seconds", "status"):
            table.add_column(col)
        for name, e in res.embeddings.items():
            table.add_row(L(name), L(e.meta.get("modality", "")), str(e.pooled.shape[0]), str(e.dim), f"{e.meta.get('encode_seconds', 0):.1f}", "ok")
        for name, msg in res.failures.items():
            table.add_row(L(name), "", "", "", "", Text(str(msg), style="red"))
        ui.err.print(table)
        if as_json:
            summary = {
                "dataset": ds.describe(),
                "embeddings": {k: {kk: v.meta.get(kk) for kk in ("model_id", "modality", "n", "dim", "precision")} for k, v in res.embeddings.items()},
                "failures": res.failures,
            }
            ui.print_json(summary)
        if res.failures:
            ui.error(f"{len(res.failures)} model(s) failed: {', '.join(res.failures)}; the others are cached.")
            raise typer.Exit(1)


@cache_app.command("list")
def cache_list(cache_dir: CacheOpt = None) -> None:
    """Every cached embedding set with its model, dataset and size."""
    from pairscout.embeddings.cache import EmbeddingCache

    with ui.user_errors():
        cache = EmbeddingCache(cache_dir)
        table = Table(title=L(f"cache {cache.root}"), caption=L("fingerprint: its first 12 characters (cache clear --dataset takes a prefix)"))
        rows = list(cache.entries())
        # ids are what `cache clear --model` takes: printed whole (folded, never cut to "efficientnet-l…")
        table.add_column("model", overflow="fold", min_width=min(60, max([len(str(r.get("model_id"))) for r in rows] + [5])))
        table.add_column("dataset", overflow="fold")
        table.add_column("fingerprint", no_wrap=True, min_width=12)
        for col in ("n", "dim", "precision", "tokens", "MB"):
            table.add_column(col, justify="right" if col in ("n", "dim", "MB") else "left")
        for r in rows:
            fp = str(r.get("dataset_fingerprint") or "")[:12]
            table.add_row(*(L(r.get(k)) for k in ("model_id", "dataset")), L(fp), *(L(r.get(k)) for k in ("n", "dim", "precision", "tokens")),
                          f"{r['size_mb']:.1f}")  # fmt: skip
        ui.out.print(table)


@cache_app.command("clear")
def cache_clear(
    cache_dir: CacheOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this encoder id (e.g. pack:efficientnet-lite0).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset (fingerprint prefix or name).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed, remove nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before removing every entry.")] = False,
) -> None:
    """Remove cached embeddings (all, or of one model and/or dataset)."""
    from pairscout.embeddings.cache import EmbeddingCache
    from pairscout.embeddings.housekeeping import clear_cache
    from pairscout.errors import PairscoutError

    with ui.user_errors():
        cache = EmbeddingCache(cache_dir)
        if model is None and dataset is None and not (yes or dry_run):
            if not ui.err.is_terminal:
                raise PairscoutError(f"clearing every entry of {cache.root} needs confirmation.", fix="pass --yes, or --model / --dataset to clear less.")
            typer.confirm(f"remove every cached embedding in {cache.root}?", abort=True, err=True)
        res = clear_cache(cache, model=model, dataset=dataset, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        ui.say(f"{verb} {len(res.paths)} entr{'y' if len(res.paths) == 1 else 'ies'} ({res.bytes / 2**20:.1f} MB) from {cache.root}")
        for p in res.paths if dry_run else []:
            ui.say(f"  {Path(p).relative_to(cache.root)}")
