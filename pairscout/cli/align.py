"""``pairscout probe``, ``pairscout align`` and ``pairscout zero-shot``.

They parse, call the core (:mod:`pairscout.evaluation.probe`, :mod:`pairscout.align.model`) and print. Defaults
come from :class:`~pairscout.evaluation.result.ProbeSettings` and :class:`~pairscout.align.train_config.TrainConfig`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated

import typer

from pairscout.align.train_config import DEFAULT_STEPS, TrainConfig
from pairscout.cli import _ui as ui
from pairscout.cli._options import (
    CacheOpt,
    CaptionColOpt,
    DeviceOpt,
    ForceOpt,
    ImageColOpt,
    JsonOpt,
    LabelColOpt,
    ReportOpt,
    RunAlias,
    RunArg,
    TrustOpt,
    VerboseOpt,
    data_with_columns,
    pick_run,
)
from pairscout.cli._ui import Table, num
from pairscout.cli._ui import literal as L
from pairscout.evaluation.result import ProbeSettings

PROBE = ProbeSettings()
TRAIN = TrainConfig()

VisionOpt = Annotated[str | None, typer.Option("--vision-zoo", help="Without RUN: vision zoo (name, TOML or comma list of ids).")]
TextOpt = Annotated[str | None, typer.Option("--text-zoo", help="Without RUN: text zoo.")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="Without RUN: the dataset (default: generated); with RUN: where the run's data lives now.")]
NOpt = Annotated[int | None, typer.Option("--n", help="Without RUN: rows (generated) or a fixed-seed subset of N rows (files).")]


def _check_source(run: Path | None, vision_zoo: str | None, text_zoo: str | None) -> None:
    from pairscout.errors import PairscoutError

    if run is not None and (vision_zoo or text_zoo):
        raise PairscoutError("got both --run and --vision-zoo/--text-zoo (a RUN folder and zoos).", fix="pass either a rank run (RUN) or zoos and --data.")


# --- probe ---------------------------------------------------------------------------------------
def probe(
    run: RunArg = None,
    run_alias: RunAlias = None,
    vision_zoo: VisionOpt = None,
    text_zoo: TextOpt = None,
    data: DataOpt = None,
    n: NOpt = None,
    image_column: ImageColOpt = None,
    caption_column: CaptionColOpt = None,
    label_column: LabelColOpt = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Probe the K best-ranked pairs (default: as many pairs as --budget allows).", show_default=False)] = PROBE.top_k,
    bottom_k: Annotated[int | None, typer.Option("--bottom-k", help="... and the K worst-ranked ones.", show_default=False)] = PROBE.bottom_k,
    middle_k: Annotated[int | None, typer.Option("--middle-k", help="... and K pairs evenly spaced between them.", show_default=False)] = PROBE.middle_k,
    pairs: Annotated[str | None, typer.Option("--pairs", help="'all': every pair of the run; or these pairs: 'v1,t1;v2,t2'.")] = None,
    budget: Annotated[int, typer.Option(help="Pair-steps (pairs x steps) the default selection may spend; all pairs when they fit.")] = PROBE.budget,
    steps: Annotated[int, typer.Option(help="Optimiser steps per probe (the same for every pair).")] = PROBE.steps,
    batch_size: Annotated[int, typer.Option(help="Images per step, the global batch: under torchrun each of the W processes takes batch / W (a multiple of W).")] = PROBE.batch_size,
    out_dim: Annotated[int, typer.Option(help="Probe output dimension (SAIL: 2048).")] = PROBE.out_dim,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = PROBE.lr,
    optimizer: Annotated[str, typer.Option(help="adamw or lion.")] = PROBE.optimizer,
    test_fraction: Annotated[float, typer.Option(help="Held-out share of the images.")] = PROBE.test_fraction,
    seed: Annotated[int, typer.Option(help="Seed of the split and the probes.")] = PROBE.seed,
    target: Annotated[str | None, typer.Option(help="Read-out to correlate with: zs_top1, class_map, mean_r1, heldout_loss, loss_auc, ... (default: the one that separates the pairs most clearly).", show_default=False)] = None,
    class_level: Annotated[bool, typer.Option("--class-level", help="Train with same-class captions as positives (identical captions always are).")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for probe.json / probe.csv (default: the RUN folder).", show_default=False)] = None,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    wide: Annotated[bool, typer.Option("--wide", help="Print every measure, R@5, loss and time, and every p-value.")] = False,
    as_json: JsonOpt = False,
    with_report: ReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Short linear probes on the top, middle and bottom pairs of a ranking: did the metrics predict alignment?"""
    ui.setup_logging(verbose)
    from pairscout.encoders.hf_source import allow_remote_code
    from pairscout.errors import PairscoutError
    from pairscout.evaluation.probe import probe as run_probe
    from pairscout.evaluation.probe import verdict

    with ui.user_errors():
        run = pick_run(run, run_alias)
        _check_source(run, vision_zoo, text_zoo)
        chosen = None
        every = bool(pairs) and pairs.strip().lower() == "all"
        if pairs and not every:
            chosen = [tuple(p.split(",", 1)) for p in pairs.split(";") if p.strip()]
            if any(len(p) != 2 for p in chosen):
                raise PairscoutError(f"--pairs {pairs!r} is malformed.", fix="write it as 'all' or 'vision1,text1;vision2,text2'.")
        if budget < 1:
            raise PairscoutError(f"--budget {budget} probes no pair.", fix="pass a positive number of pair-steps, or --pairs all.")
        settings = ProbeSettings(top_k=top_k, bottom_k=bottom_k, middle_k=middle_k, all_pairs=every, budget=budget, steps=steps,
                                 batch_size=batch_size, out_dim=out_dim, lr=lr, optimizer=optimizer, test_fraction=test_fraction, seed=seed,
                                 device=device or PROBE.device, target=target, class_level=class_level)  # fmt: skip
        from pairscout.files import check_out_folder

        check_out_folder(out_dir if out_dir is not None else run)
        with ui.progress() as rep, allow_remote_code(trust_remote_code):
            data = data_with_columns(data, image_column, caption_column, label_column)
            res = run_probe(run, vision_zoo=vision_zoo, text_zoo=text_zoo, data=data, n=n, settings=settings, pairs=chosen,
                            cache_dir=cache_dir, out=out_dir, progress=rep.phases(), command=ui.command_line())  # fmt: skip
        if res.meta.get("selection"):
            ui.say(res.meta["selection"])
        tables = [probe_table(res, wide), corr_table(res, wide)]
        if res.regret is not None:
            tables.append(regret_table(res))
        for table in tables:
            ui.print_table(table, wide)
        primary = res.meta.get("primary")
        if primary:
            ui.say(verdict(res.correlations, primary, res.meta, res.correlations_without_baselines))
        from pairscout.metrics.registry import readout_label

        chance = res.meta.get("chance")
        ui.say(f"read-out: {readout_label(res.meta['target'])} (--target {res.meta['target']}"
               + (f"; chance {chance:.3f}" if chance is not None else "") + f"): {res.meta['target_why']}")
        if res.regret is not None:
            ui.say(f"regret: {res.regret.sentence}")
        if res.meta.get("verdict"):
            ui.say(f"verdict: {res.meta['verdict']['reason']}")
        if res.meta.get("out"):
            ui.say(f"results in {res.meta['out']}/ (probe.json, probe.csv, probe.parquet, probe_correlations.csv)")
            if with_report:
                from pairscout.report import build_report

                ui.say(f"report: {build_report([res.meta['out']])}")
        if as_json:
            from pairscout.files import records

            payload = {"pairs": records(res.pairs), "correlations": records(res.correlations), "meta": res.meta,
                       "correlations_without_baselines": None if res.correlations_without_baselines is None else records(res.correlations_without_baselines)}
            ui.print_json(payload)


def probe_table(res, wide: bool = False) -> Table:
    """Rank, full model names, the primary measure ± its interval, the read-out and R@1 both ways (fits 100
    columns for names up to ~25 characters; longer names fold, never cut); with ``wide`` every measure of the rank run,
    the group, R@5, the final loss and the time (the measures the probe computed are in ``probe.csv``)."""
    from pairscout.metrics.registry import MEASURES, label, readout_label

    primary = res.meta.get("primary") or next((m for m in res.metrics if m in MEASURES), None)
    ranked = res.meta.get("measures_from_rank") or [m for m in res.metrics if m in MEASURES]
    measures = ranked if wide else [m for m in (primary,) if m]
    tgt = res.meta.get("target", "mean_r1")
    n_items, chance = int(res.meta.get("n_test_items") or 0), res.meta.get("chance")
    caption = "R@1 i2t: image -> its captions; t2i: caption -> its image"
    if n_items and res.meta.get("target_direction", "higher") == "higher":  # a proportion: its binomial half-width
        caption += f"; read-out ± 95 % half-width (binomial, {n_items} held-out images)"
        caption += f", chance {chance:.3f}" if chance is not None and chance == chance else ""
    if not wide:
        caption += "; --wide (or probe.csv) for every measure, R@5, loss and time"
    t = Table(title=L(f"linear probes ({res.meta['settings']['steps']} steps each), held-out read-out: {readout_label(tgt)} ({tgt})"),
              caption=L(caption))
    t.add_column("#", justify="right", no_wrap=True)
    if wide:
        t.add_column("group", no_wrap=True)
    for side in ("vision", "text"):
        t.add_column(side, overflow="fold", min_width=max(map(len, res.pairs[side].astype(str))) if wide else None)
    for m in measures:  # a long label takes two header lines, not the names' width
        t.add_column(L(textwrap.fill(label(m), 10 if wide else 14)), justify="right", no_wrap=True)
    cols = ["read-out", "R@1\ni2t", "R@1\nt2i"] + (["R@5\nmean", "loss", "s"] if wide else [])
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for _, r in res.pairs.iterrows():
        cells = [ui.with_interval(r, m) if not wide else num(r.get(m)) for m in measures]
        loss = res.meta.get("target_direction") == "lower"  # a loss has no binomial half-width
        tail = [num(r.get(tgt)) if loss else _readout(r.get(tgt), n_items), num(r.get("i2t_r1")), num(r.get("t2i_r1"))]
        if wide:
            tail += [num(r.get("mean_r5")), num(r.get("final_loss")), f"{r['train_s']:.1f}"]
        head = [str(r.get("rank", ""))] + ([L(r.get("group", ""))] if wide else [])
        names = [str(r[k]) + (f" @{r[f'{k}_layer']}" if f"{k}_layer" in r and isinstance(r[f"{k}_layer"], str) else "")
                 for k in ("vision", "text")]  # a layer sweep's chosen layers, as rank shows them
        t.add_row(*head, L(names[0]), L(names[1]), *cells, *tail)
    return t


def _readout(x, n_items: int) -> str:
    """A proportion read on ``n_items`` held-out items with its 95 % half-width (binomial): ``0.96 ± 0.04``."""
    from pairscout.statistics import binomial_se

    if x is None or x != x:
        return ""
    return f"{x:.2f} ± {1.96 * binomial_se(float(x), n_items):.2f}" if n_items else num(x)


def _signed(x) -> str:
    return "" if x is None or x != x else f"{x:+.2f}"


def _p(x) -> str:
    return "" if x is None or x != x else ("<1e-3" if x < 1e-3 else f"{x:.3f}")


def corr_table(res, wide: bool = False) -> Table:
    """Which measure predicts the probe: every predictor, sorted by Holm-corrected strength (fits 100 columns);
    with ``wide`` the kind, who computed it, and the uncorrected and Kendall p-values too."""
    from pairscout.metrics.registry import readout_label

    tgt = res.meta.get("target", "mean_r1")
    fam = res.meta.get("family_size")
    neg = " (negated: lower loss = higher)" if res.meta.get("target_direction") == "lower" else ""
    t = Table(title=L(f"did the metric predict the probe? every measure and unimodal score against {readout_label(tgt)}{neg}, "
                      f"sorted by Holm-corrected p"),
              caption=L(f"rho: Spearman, its 95 % interval (Fisher z); p (Holm): corrected over {fam or 'the'} predictors; "
                        "every predictor oriented higher = more similar; a one-encoder score counts encoders, not pairs; "
                        "--wide for uncorrected p and Kendall p"))  # fmt: skip
    t.add_column("predictor", overflow="fold")
    if wide:
        t.add_column("kind", overflow="fold")
        t.add_column("computed by", no_wrap=True)
    t.add_column("pairs", justify="right", no_wrap=True)
    t.add_column("rho [95 % interval]", justify="right", no_wrap=True)
    if wide:
        t.add_column("p", justify="right", no_wrap=True)
    t.add_column("p\n(Holm)", justify="right", no_wrap=True)
    t.add_column("Kendall\ntau", justify="right", no_wrap=True)
    if wide:
        t.add_column("p", justify="right", no_wrap=True)
        t.add_column("p\n(Holm)", justify="right", no_wrap=True)
    t.add_column("predicts?", overflow="fold")
    for _, r in res.correlations.iterrows():
        ci = f" [{_signed(r.get('spearman_lo'))}, {_signed(r.get('spearman_hi'))}]" if r.get("spearman_lo") == r.get("spearman_lo") else ""
        lbl = r.get("label") if isinstance(r.get("label"), str) and r.get("label") else r["metric"]
        cells = [L(lbl)] + ([L(r.get("kind", "")), L(r.get("computed_by", ""))] if wide else []) + [str(int(r["n_pairs"])), _signed(r["spearman"]) + ci]
        cells += ([_p(r["spearman_p"])] if wide else []) + [_p(r.get("spearman_p_holm", r["spearman_p"])), _signed(r["kendall"])]
        cells += [_p(r["kendall_p"]), _p(r.get("kendall_p_holm"))] if wide else []
        t.add_row(*cells, L(r.get("answer", "")))
    return t


def regret_table(res) -> Table:
    """The verdict's regret against the rules researchers use: oracle pair, each rule's pair, its read-out and regret
    with the paired bootstrap interval (fits 100 columns)."""
    from pairscout.metrics.registry import readout_label

    rg = res.regret
    lab = readout_label(rg.target)
    worse = "lower" if rg.direction == "higher" else "higher"
    t = Table(title=L(f"had you followed each rule: regret against the best probed pair ({rg.oracle[0]} x {rg.oracle[1]}, {lab} "
                      f"{rg.oracle_value:.3f}), over the {rg.n_pairs} {rg.over}"),
              caption=L(f"regret: the oracle's {lab} minus the rule's pair's ({worse} read-out = positive regret); {rg.interval}, "
                        f"{rg.n_items} images" + ("" if rg.conclusive else "; the read-out does not separate the pairs: no evidence either way")))
    for col, just in (("rule", "left"), ("pair", "left"), ("#", "right"), ("read-out", "right"), ("regret [95 %]", "right")):
        # the rule's words wrap; the pair keeps room for two encoder names (at 100 columns it folded mid-name)
        t.add_column(col, justify=just, overflow="fold" if col == "pair" else None, no_wrap=col not in ("rule", "pair"),
                     min_width=22 if col == "pair" else None)
    for r in rg.rules:
        pair = f"{r.pair[0]} x {r.pair[1]}" if r.pair else r.why
        reg = "" if r.regret != r.regret else f"{r.regret:.3f} [{r.lo:.3f}, {r.hi:.3f}]"
        t.add_row(L(r.label), L(pair), "" if r.rank is None else str(r.rank), num(r.value), reg)
    return t


# --- align ---------------------------------------------------------------------------------------
def align(
    run: RunArg = None,
    run_alias: RunAlias = None,
    pair: Annotated[str | None, typer.Option("--pair", "-p", help="VISION,TEXT encoder names (default: the best pair of RUN).", show_default=False)] = None,
    vision_zoo: VisionOpt = None,
    text_zoo: TextOpt = None,
    data: DataOpt = None,
    n: NOpt = None,
    image_column: ImageColOpt = None,
    caption_column: CaptionColOpt = None,
    label_column: LabelColOpt = None,
    head: Annotated[str, typer.Option(help="linear, mlp, glu (SAIL) or local_global (freeze-align; needs `encode --tokens`).")] = TRAIN.head,
    out_dim: Annotated[int, typer.Option(help="Shared space dimension (SAIL: 1024).")] = TRAIN.out_dim,
    hidden_mult: Annotated[int, typer.Option(help="GLU hidden width / input dim (SAIL: 8).")] = TRAIN.hidden_mult,
    loss: Annotated[str, typer.Option(help="sigmoid (SigLIP/SAIL) or infonce (CLIP).")] = TRAIN.loss,
    loss_norm: Annotated[str, typer.Option(help="Sigmoid loss normaliser: batch (SigLIP) or pairs (SAIL).")] = TRAIN.loss_norm,
    chunk: Annotated[int | None, typer.Option(help="Sigmoid loss: captions per logit block (memory O(batch x chunk)).")] = TRAIN.chunk,
    optimizer: Annotated[str, typer.Option(help="adamw or lion.")] = TRAIN.optimizer,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 1e-3 AdamW, 3e-4 Lion).", show_default=False)] = TRAIN.lr,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on weight matrices.")] = TRAIN.weight_decay,
    batch_size: Annotated[int, typer.Option(help="Images per step, the global batch: under torchrun each of the W processes takes batch / W (a multiple of W).")] = TRAIN.batch_size,
    steps: Annotated[int | None, typer.Option(help=f"Optimiser steps (default: {DEFAULT_STEPS} unless --epochs; ~2 min for the default demo pair on 2 CPU cores).", show_default=False)] = TRAIN.steps,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training images (instead of --steps).")] = TRAIN.epochs,
    warmup: Annotated[float, typer.Option(help="Warm-up fraction of the steps.")] = TRAIN.warmup,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm (0: off).")] = TRAIN.grad_clip,
    captions: Annotated[str, typer.Option(help="sample one caption per image per step, or all as multi-positives.")] = TRAIN.captions,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = TRAIN.seed,
    test_fraction: Annotated[float, typer.Option(help="Held-out share of the images.")] = PROBE.test_fraction,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: at the end).")] = TRAIN.eval_every,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: at the end).")] = 100,
    zero_shot: Annotated[bool, typer.Option("--zero-shot/--no-zero-shot", help="Zero-shot classification read-out when the data has labels.")] = True,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the aligned model (default: the folder VISION__TEXT in RUN/align).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    force: ForceOpt = False,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint/--drop-checkpoint",
                                                  help="Keep the final checkpoint (heads + optimiser state, ~4x the model) to continue the run later.")] = False,
    cache_dir: CacheOpt = None,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    with_report: ReportOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train projector heads for one vision x text pair on its cached embeddings and save the aligned model."""
    ui.setup_logging(verbose)
    from pairscout.align.model import align as run_align
    from pairscout.align.model import default_out
    from pairscout.encoders.hf_source import allow_remote_code
    from pairscout.errors import PairscoutError

    with ui.user_errors():
        run = pick_run(run, run_alias)
        _check_source(run, vision_zoo, text_zoo)
        chosen = None
        if pair:
            parts = [p.strip() for p in pair.split(",")]
            if len(parts) != 2 or not all(parts):
                raise PairscoutError(f"--pair {pair!r} is malformed.", fix="write it as VISION,TEXT, e.g. --pair efficientnet-lite2,all-MiniLM-L6-v2.")
            chosen = (parts[0], parts[1])
        if chosen is None and run is None:
            raise PairscoutError("align needs a RUN folder or --pair.", fix="pass RUN (its best pair is aligned) or --pair VISION,TEXT.")
        config = TrainConfig(head=head, out_dim=out_dim, hidden_mult=hidden_mult, loss=loss, loss_norm=loss_norm, chunk=chunk,
                             optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size, steps=steps, epochs=epochs,
                             warmup=warmup, grad_clip=grad_clip or None, captions=captions, seed=seed, device=device or TRAIN.device,
                             eval_every=eval_every, checkpoint_every=checkpoint_every)  # fmt: skip
        if run is not None:
            from pairscout.runs import STORE

            line = which_pair_line(STORE.rank(run), run, chosen)
            if line:
                ui.say(line)
        if out_dir is None and run is not None:
            out_dir = default_out(run, chosen)
        from pairscout.files import check_out_folder

        check_out_folder(out_dir)
        with ui.progress() as rep, allow_remote_code(trust_remote_code):
            label = f"align {chosen[0]} x {chosen[1]}" if chosen else "align best pair"
            data = data_with_columns(data, image_column, caption_column, label_column)
            res = run_align(chosen, run=run, vision_zoo=vision_zoo, text_zoo=text_zoo, data=data, n=n, config=config,
                            test_fraction=test_fraction, split_seed=seed, zero_shot=zero_shot, cache_dir=cache_dir, out=out_dir,
                            resume=resume, force=force, keep_checkpoint=keep_checkpoint, progress=rep.training(label),
                            command=ui.command_line())  # fmt: skip
        ui.err.print(_align_table(res))
        if run is not None:
            line = against_probe_line(run, res)
            if line:
                ui.say(line)
        if res.out is not None:
            ui.say(f"aligned model in {res.out}/ (config.json, heads.safetensors, train/train_log.json); "
                   f"use it: pairscout zero-shot --model {res.out} IMAGE... --classes a,b,c")  # fmt: skip
            if with_report:
                from pairscout.report import build_report

                ui.say(f"report: {build_report([run, res.out] if run is not None else [res.out])}")
        else:
            ui.warn("no --out: the aligned model was not saved")
        if as_json:
            payload = {"model": str(res.out) if res.out else None, "vision": res.model.vision_spec.name, "text": res.model.text_spec.name,
                       "metrics": res.metrics, "train": res.train.summary()}  # fmt: skip
            ui.print_json(payload)


def _align_table(res) -> Table:
    m, tr = res.metrics, res.train
    t = Table(title=L(f"aligned {res.model.vision_spec.shown} x {res.model.text_spec.shown}: {tr.config.head} heads -> {tr.config.out_dim}-d, "
                      f"{tr.steps} steps, {tr.samples_per_s:.0f} images/s on {tr.device}"))  # fmt: skip
    for col in ("held-out read-out", "image -> text", "text -> image", "mean"):
        t.add_column(col, justify="right" if col != "held-out read-out" else "left")
    for k in (1, 5, 10):
        t.add_row(f"Recall@{k}", num(m.get(f"i2t_r{k}")), num(m.get(f"t2i_r{k}")), num(m.get(f"mean_r{k}")))
    # zero-shot and the loss are not image -> text / text -> image numbers: they go below, under their own names
    lp = tr.loss_parameters()
    words = [f"zero-shot over the classes: top-1 {num(m.get('zs_top1'))}, top-5 {num(m.get('zs_top5'))}"] if "zs_top1" in m else []
    words.append(f"final loss {num(tr.final_loss)}, scale t {lp['scale']:.2f}, bias b {lp.get('bias', float('nan')):.2f}")
    t.caption = L("; ".join(words))
    return t


# --- zero-shot -----------------------------------------------------------------------------------
def zero_shot(
    model: Annotated[Path, typer.Option("--model", "-m", help="Folder of an aligned model (`pairscout align --out`).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    classes: Annotated[str, typer.Option("--classes", "-c", help="Comma list of class names.")],
    templates: Annotated[str | None, typer.Option(help="'|'-separated prompt templates with {c} (default: 6 built-in ones).", show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes shown per image.")] = 3,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Classify images among class names with a saved aligned model."""
    from pairscout.align.model import AlignedModel, image_files
    from pairscout.encoders.hf_source import allow_remote_code

    with ui.user_errors():
        names = [c.strip() for c in classes.split(",") if c.strip()]
        files = image_files(images)
        tpl = [t for t in templates.split("|") if t.strip()] if templates else None
        from pairscout.runtime import pick_device

        with allow_remote_code(trust_remote_code):
            m = AlignedModel.load(model, device=pick_device(device))
            pred = m.zero_shot(files, names, tpl, top_k=top_k)
        t = Table(title=L(f"zero-shot with {m}"))
        t.add_column("image", overflow="fold")
        for i in range(min(top_k, len(names))):
            t.add_column(f"#{i + 1}")
        for f, top in zip(files, pred.top, strict=True):
            t.add_row(L(f), *[L(f"{c} ({p:.2f})") for c, p in top])
        ui.err.print(t)
        if as_json:
            ui.print_json([{"image": str(f), "top": [{"class": c, "p": p} for c, p in top]} for f, top in zip(files, pred.top, strict=True)])


# --- the lines align says beside its table: which pair it trains and why, and how it compares with the run's probe
def which_pair_line(rank, run: Path, chosen: tuple[str, str] | None) -> str:
    """One line on the pair align trains and why: the verdict's full reason was printed by rank (and is in the
    report), so repeating it here buried the one thing align adds, which pair; ties and a verdict no better than
    chance stay visible because they are reasons not to trust the choice."""
    verdict = rank.verdict.to_dict() if rank.verdict is not None else None  # the latest revision
    if chosen is not None and tuple(chosen) not in set(zip(rank.pairs["vision"], rank.pairs["text"], strict=True)):
        return ""  # not a pair of the run: align's own one-line error follows, nothing is aligned
    if chosen is not None:
        line = f"aligning {chosen[0]} x {chosen[1]} (--pair)"
        if verdict and tuple(verdict["pair"]) != chosen:
            line += f"; the verdict of {run} is {verdict['pair'][0]} x {verdict['pair'][1]}"
        return line
    if not verdict:
        v, t = rank.best()
        return f"aligning the best-ranked pair {v} x {t} ({run} has no verdict)"
    v, t = verdict["pair"]
    why = "the probe's best of the pairs the metrics tied" if verdict.get("source") == "probe" else "ranked first"
    if verdict.get("above_chance") is False:
        why += ", but no better than shuffled pairings"
    n = len(verdict.get("tied", []))
    if n:
        others = f"{n} other pair{'s' if n > 1 else ''}"
        why += f"; still tied with {others} after the probe" if len(rank.revisions) > 1 else f"; tied with {others} (`pairscout probe {run}` can separate them)"
    return f"aligning the verdict's pair {v} x {t} of {run}: {why}"


def against_probe_line(run: Path, res) -> str:
    """One line when the run's probe read this pair clearly higher than the aligned model does (a real head
    should not lose to the short linear probe; when it does, the budget or the head is the first suspect)."""
    from pairscout.evaluation.result import ProbeResult
    from pairscout.statistics import binomial_se

    try:
        probe = ProbeResult.load(run)
    except Exception:  # noqa: BLE001 - no probe in the run: nothing to compare with
        return ""
    target, n_items = probe.meta.get("target"), int(probe.meta.get("n_test_items") or 0)
    v, t = res.model.vision_spec.name, res.model.text_spec.name
    row = probe.pairs[(probe.pairs["vision"] == v) & (probe.pairs["text"] == t)]
    mine = res.metrics.get(target)
    if row.empty or mine is None or not n_items or target not in row:
        return ""
    theirs = float(row[target].iloc[0])
    se = (binomial_se(theirs, n_items) ** 2 + binomial_se(float(mine), n_items) ** 2) ** 0.5
    if theirs - float(mine) <= 2 * se:
        return ""
    steps = probe.meta.get("settings", {}).get("steps")
    from pairscout.metrics.registry import readout_label

    return (f"note: the probe's linear heads ({steps} steps) read {theirs:.3f} {readout_label(target)} on this pair, clearly above this "
            f"model's {float(mine):.3f}: more --steps, or --head linear, may align it better")
