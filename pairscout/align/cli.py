"""Command functions of ``pairscout probe``, ``pairscout align`` and ``pairscout zero-shot``.

Registered on the main typer app at the end of :mod:`pairscout.cli`. They parse, call the core
(:mod:`.probe`, :mod:`.model`) and print; heavy modules are imported inside the functions so that
``pairscout --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pairscout.cli import CacheOpt, DeviceOpt, _progress, _setup_logging, _user_errors, err, out
from pairscout.errors import PairscoutError

RunOpt = Annotated[Path | None, typer.Option("--run", "-r", help="Folder of a `pairscout rank --out` run (its pairs, zoos, data and cache).")]
VisionOpt = Annotated[str | None, typer.Option("--vision-zoo", "-v", help="Without --run: vision zoo (name, TOML or comma list of ids).")]
TextOpt = Annotated[str | None, typer.Option("--text-zoo", "-t", help="Without --run: text zoo.")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="Without --run: the dataset (default 'generated'); with --run: where the run's data lives now.")]
NOpt = Annotated[int | None, typer.Option("--n", help="Without --run: a fixed-seed subset of N rows.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (everything human goes to stderr).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Log each pair's result and cache hits.")]


def _command() -> str:
    return " ".join(["pairscout", *sys.argv[1:]])


def _check_source(run: Path | None, vision_zoo: str | None, text_zoo: str | None) -> None:
    if run is not None and (vision_zoo or text_zoo):
        raise PairscoutError("got both --run and --vision-zoo/--text-zoo.", fix="pass either a rank run (--run DIR) or zoos and --data.")


def _train_progress(progress, label: str):
    task = progress.add_task(label, total=None)

    def update(step: int, total: int, info: dict) -> None:
        progress.update(task, completed=step, total=total,
                        description=f"{label} loss {info['loss']:.3f} {info['samples_per_s']:.0f}/s")  # fmt: skip

    return update


def _probe_progress(progress):
    tasks: dict[str, int] = {}

    def update(name: str, step: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name[:40], total=total)
        progress.update(tasks[name], completed=step, total=total)

    return update


ReportOpt = Annotated[bool, typer.Option("--report", help="Also write (or refresh) report.html in the run folder.")]


def _r(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


# --- probe ---------------------------------------------------------------------------------------
def probe_command(
    run: RunOpt = None,
    vision_zoo: VisionOpt = None,
    text_zoo: TextOpt = None,
    data: DataOpt = None,
    n: NOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Probe the K best-ranked pairs.")] = 5,
    bottom_k: Annotated[int, typer.Option("--bottom-k", help="... and the K worst-ranked ones.")] = 2,
    middle_k: Annotated[int, typer.Option("--middle-k", help="... and K pairs evenly spaced between them.")] = 3,
    pairs: Annotated[str | None, typer.Option("--pairs", help="Probe these pairs instead: 'v1,t1;v2,t2'.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps per probe (the same for every pair).")] = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    out_dim: Annotated[int, typer.Option(help="Probe output dimension (SAIL: 2048).")] = 512,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adamw or lion.")] = "adamw",
    test_fraction: Annotated[float, typer.Option(help="Held-out share of the images.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and the probes.")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for probe.json / probe.csv (default: the --run folder).")] = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    with_report: ReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Short linear probes on the top and bottom pairs of a ranking: did the metrics predict alignment?"""
    _setup_logging(verbose)
    from pairscout.align.probe import ProbeSettings, probe, verdict

    with _user_errors():
        _check_source(run, vision_zoo, text_zoo)
        chosen = None
        if pairs:
            chosen = [tuple(p.split(",", 1)) for p in pairs.split(";") if p.strip()]
            if any(len(p) != 2 for p in chosen):
                raise PairscoutError(f"--pairs {pairs!r} is malformed.", fix="write it as 'vision1,text1;vision2,text2'.")
        settings = ProbeSettings(top_k=top_k, bottom_k=bottom_k, middle_k=middle_k, steps=steps, batch_size=batch_size, out_dim=out_dim, lr=lr,
                                 optimizer=optimizer, test_fraction=test_fraction, seed=seed, device=device)  # fmt: skip
        with _progress() as progress:
            res = probe(run, vision_zoo=vision_zoo, text_zoo=text_zoo, data=data, n=n, settings=settings, pairs=chosen,
                        cache_dir=cache_dir, out=out_dir, progress=_probe_progress(progress), command=_command())  # fmt: skip
        err.print(_probe_table(res))
        err.print(_corr_table(res))
        primary = res.meta.get("primary")
        if primary:
            err.print(verdict(res.correlations, primary), highlight=False)
        if res.meta.get("out"):
            err.print(f"results in {res.meta['out']}/ (probe.json, probe.csv, probe.parquet, probe_correlations.csv)", highlight=False)
            if with_report:
                from pairscout.report import build_report

                err.print(f"report: {build_report([res.meta['out']])}", highlight=False)
        if as_json:
            from pairscout.align.probe import _records

            payload = {"pairs": _records(res.pairs), "correlations": _records(res.correlations), "meta": res.meta}
            out.print_json(json.dumps(payload, default=str))


def _probe_table(res) -> Table:
    from pairscout.ranking.compute import LABELS

    metrics = [m for m in res.metrics if m != "score"]
    t = Table(title=f"linear probes ({res.meta['settings']['steps']} steps each), held-out retrieval",
              caption="R@1 i2t: image -> its captions; t2i: caption -> its image")  # fmt: skip
    for col in ("#", "group", "vision", "text"):
        t.add_column(col, no_wrap=True)
    for m in metrics:
        t.add_column(LABELS.get(m, m), justify="right")
    for col in ("R@1 i2t", "R@1 t2i", "R@5 mean", "loss", "s"):
        t.add_column(col, justify="right")
    for _, r in res.pairs.iterrows():
        t.add_row(str(r.get("rank", "")), str(r.get("group", "")), str(r["vision"]), str(r["text"]), *[_r(r.get(m)) for m in metrics],
                  _r(r["i2t_r1"]), _r(r["t2i_r1"]), _r(r["mean_r5"]), _r(r["final_loss"]), f"{r['train_s']:.1f}")  # fmt: skip
    return t


def _corr_table(res) -> Table:
    from pairscout.ranking.compute import LABELS

    t = Table(title="did the metric predict the probe? correlation with probe R@1 (mean of both directions)")
    for col in ("metric", "pairs", "Spearman rho", "p", "Kendall tau", "p "):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for _, r in res.correlations.iterrows():
        t.add_row(LABELS.get(r["metric"], r["metric"]), str(int(r["n_pairs"])), _r(r["spearman"]), _r(r["spearman_p"]),
                  _r(r["kendall"]), _r(r["kendall_p"]))  # fmt: skip
    return t


# --- align ---------------------------------------------------------------------------------------
def align_command(
    pair: Annotated[str | None, typer.Option("--pair", "-p", help="VISION,TEXT encoder names (default: the best pair of --run).")] = None,
    run: RunOpt = None,
    vision_zoo: VisionOpt = None,
    text_zoo: TextOpt = None,
    data: DataOpt = None,
    n: NOpt = None,
    head: Annotated[str, typer.Option(help="linear, mlp, glu (SAIL) or local_global (freeze-align; needs `encode --tokens`).")] = "glu",
    out_dim: Annotated[int, typer.Option(help="Shared space dimension (SAIL: 1024).")] = 1024,
    hidden_mult: Annotated[int, typer.Option(help="GLU hidden width / input dim (SAIL: 8).")] = 8,
    loss: Annotated[str, typer.Option(help="sigmoid (SigLIP/SAIL) or infonce (CLIP).")] = "sigmoid",
    loss_norm: Annotated[str, typer.Option(help="Sigmoid loss normaliser: batch (SigLIP) or pairs (SAIL).")] = "batch",
    chunk: Annotated[int | None, typer.Option(help="Sigmoid loss: captions per logit block (memory O(batch x chunk)).")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw or lion.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-3 AdamW, 3e-4 Lion).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on weight matrices.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 200 unless --epochs; ~2 min for the default demo pair on 2 CPU cores).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training images (instead of --steps).")] = None,
    warmup: Annotated[float, typer.Option(help="Warm-up fraction of the steps.")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm (0: off).")] = 1.0,
    captions: Annotated[str, typer.Option(help="sample one caption per image per step, or all as multi-positives.")] = "sample",
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Held-out share of the images.")] = 0.2,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: at the end).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: at the end).")] = 100,
    zero_shot: Annotated[bool, typer.Option("--zero-shot/--no-zero-shot", help="Zero-shot classification read-out when the data has labels.")] = True,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the aligned model (default: RUN/align/VISION__TEXT).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over although --out holds checkpoints.")] = False,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint/--drop-checkpoint",
                                                  help="Keep the final checkpoint (heads + optimiser state, ~4x the model) to continue the run later.")] = False,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    with_report: ReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train projector heads for one vision x text pair on its cached embeddings and save the aligned model."""
    _setup_logging(verbose)
    from pairscout.align.model import align
    from pairscout.align.train import TrainConfig

    with _user_errors():
        _check_source(run, vision_zoo, text_zoo)
        chosen = None
        if pair:
            parts = [p.strip() for p in pair.split(",")]
            if len(parts) != 2 or not all(parts):
                raise PairscoutError(f"--pair {pair!r} is malformed.", fix="write it as VISION,TEXT, e.g. --pair efficientnet-lite2,all-MiniLM-L6-v2.")
            chosen = (parts[0], parts[1])
        if chosen is None and run is None:
            raise PairscoutError("align needs --pair or --run.", fix="pass --run DIR (its best pair is aligned) or --pair VISION,TEXT.")
        config = TrainConfig(head=head, out_dim=out_dim, hidden_mult=hidden_mult, loss=loss, loss_norm=loss_norm, chunk=chunk,
                             optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                             steps=steps if steps is not None or epochs is not None else 200, epochs=epochs, warmup=warmup,
                             grad_clip=grad_clip or None, captions=captions, seed=seed, device=device, eval_every=eval_every,
                             checkpoint_every=checkpoint_every)  # fmt: skip
        if out_dir is None and run is not None:
            from pairscout.ranking import RankResult

            v, t = chosen or RankResult.load(run).best()
            out_dir = run / "align" / f"{v}__{t}"
        with _progress() as progress:
            label = f"align {chosen[0]} x {chosen[1]}" if chosen else "align best pair"
            res = align(chosen, run=run, vision_zoo=vision_zoo, text_zoo=text_zoo, data=data, n=n, config=config,
                        test_fraction=test_fraction, split_seed=seed, zero_shot=zero_shot, cache_dir=cache_dir, out=out_dir,
                        resume=resume, force=force, keep_checkpoint=keep_checkpoint, progress=_train_progress(progress, label), command=_command())  # fmt: skip
        err.print(_align_table(res))
        if res.out is not None:
            err.print(f"aligned model in {res.out}/ (config.json, heads.safetensors, train/train_log.json); "
                      f"use it: pairscout zero-shot --model {res.out} IMAGE... --classes a,b,c", highlight=False)  # fmt: skip
            if with_report:
                from pairscout.report import build_report

                err.print(f"report: {build_report([run, res.out] if run is not None else [res.out])}", highlight=False)
        else:
            err.print("[yellow]no --out: the aligned model was not saved[/]")
        if as_json:
            payload = {"model": str(res.out) if res.out else None, "vision": res.model.vision_spec.name, "text": res.model.text_spec.name,
                       "metrics": res.metrics, "train": res.train.summary()}  # fmt: skip
            out.print_json(json.dumps(payload, default=str))


def _align_table(res) -> Table:
    m, tr = res.metrics, res.train
    t = Table(title=f"aligned {res.model.vision_spec.name} x {res.model.text_spec.name}: {tr.config.head} heads -> {tr.config.out_dim}-d, "
                    f"{tr.steps} steps, {tr.samples_per_s:.0f} images/s on {tr.device}")  # fmt: skip
    for col in ("held-out read-out", "image -> text", "text -> image", "mean"):
        t.add_column(col, justify="right" if col != "held-out read-out" else "left")
    for k in (1, 5, 10):
        t.add_row(f"Recall@{k}", _r(m.get(f"i2t_r{k}")), _r(m.get(f"t2i_r{k}")), _r(m.get(f"mean_r{k}")))
    if "zs_top1" in m:
        t.add_row("zero-shot top-1 / top-5 (per class)", _r(m.get("zs_top1")), _r(m.get("zs_top5")), "")
    lp = tr.loss_parameters()
    t.add_row("final loss / scale t / bias b", _r(tr.final_loss), f"{lp['scale']:.2f}", f"{lp.get('bias', float('nan')):.2f}")
    return t


# --- zero-shot -----------------------------------------------------------------------------------
def zero_shot_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Folder of an aligned model (`pairscout align --out`).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    classes: Annotated[str, typer.Option("--classes", "-c", help="Comma list of class names.")],
    templates: Annotated[str | None, typer.Option(help="'|'-separated prompt templates with {c} (default: 6 built-in ones).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes shown per image.")] = 3,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Classify images among class names with a saved aligned model."""
    from pairscout.align.model import AlignedModel

    with _user_errors():
        names = [c.strip() for c in classes.split(",") if c.strip()]
        files = _image_files(images)
        tpl = [t for t in templates.split("|") if t.strip()] if templates else None
        if tpl and any("{c}" not in t for t in tpl):
            raise PairscoutError(f"template {next(t for t in tpl if '{c}' not in t)!r} has no {{c}}.", fix="put {c} where the class name goes.")
        m = AlignedModel.load(model, device="cpu" if device == "auto" else device)
        pred = m.zero_shot(files, names, tpl, top_k=top_k)
        t = Table(title=f"zero-shot with {m}")
        t.add_column("image")
        for i in range(min(top_k, len(names))):
            t.add_column(f"#{i + 1}")
        for f, top in zip(files, pred.top, strict=True):
            t.add_row(str(f), *[f"{c} ({p:.2f})" for c, p in top])
        err.print(t)
        if as_json:
            out.print_json(json.dumps([{"image": str(f), "top": [{"class": c, "p": p} for c, p in top]} for f, top in zip(files, pred.top, strict=True)]))


def _image_files(paths: list[Path]) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in exts)
        elif p.is_file():
            files.append(p)
        else:
            raise PairscoutError(f"image {p} does not exist.", fix="pass image files or folders.")
    if not files:
        raise PairscoutError("no images given.", fix="pass image files or folders holding .jpg/.png files.")
    return files
