"""The fused multi-pair probe trainer against probing the pairs one by one, and against its bare batched products.

In ONE run, on pre-encoded features of the demo's widths (read from a rank run's ``models.csv`` with ``--run``,
else the offline zoo's: vision 1280, 1280, 1280, 2048, 768, 384, 384; text 384, 384, 384, 300, 256, 384; random
values: the speed does not depend on them), N training images, batch B, linear heads to D, sigmoid loss, AdamW:

* ``one by one``: :func:`pairscout.align.train.train` per pair (today's probe), on ``--one-by-one-pairs`` pairs;
* ``fused``: :func:`pairscout.evaluation.fused.fused_train` on all P pairs at once;
* ``bare products``: only the batched matrix products of one fused step (per input width the forward ``baddbmm`` and
  the weight gradient ``bmm``, the loss's ``bmm`` forward and its two backward ``bmm``), on inputs already stacked;
  ``fraction`` = bare time / fused step time (target: at least 0.5, i.e. the step within 2x of its products).

Figures: pair-steps per second of each, and the wall time of the demo's default probe (all P pairs x ``--probe-steps``)
fused against today's 10 pairs x ``--probe-steps`` one by one, from the measured rates. First ``--warmup`` steps of each
are not timed.

CPU: ``python benchmarks/bench_probe.py --run runs/demo`` (a few minutes on 2 shared cores). CUDA:
``python benchmarks/bench_probe.py --device cuda``. Writes ``benchmarks/results/probe_fused[_cuda].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from pairscout.align.train import TrainConfig, train  # noqa: E402
from pairscout.evaluation.fused import FusedPair, fused_train  # noqa: E402
from pairscout.evaluation.result import ProbeSettings  # noqa: E402

VISION = [1280, 1280, 1280, 2048, 768, 384, 384]
TEXT = [384, 384, 384, 300, 256, 384]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def widths(run: str | None) -> tuple[list[int], list[int]]:
    if run is None:
        return VISION, TEXT
    import pandas as pd

    m = pd.read_csv(Path(run) / "models.csv")
    return [int(d) for d in m[m["modality"] == "vision"]["dim"]], [int(d) for d in m[m["modality"] == "text"]["dim"]]


def bare_products(pairs: list[FusedPair], b: int, d: int, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step of the fused step's batched products alone (forward + the backward products it needs)."""
    def groups(dims: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for w in sorted(set(dims)):
            k = dims.count(w)
            out.append((torch.randn(k, b, w, device=device), torch.randn(k, w, d, device=device) * 0.01))
        return out

    gv = groups([int(p.vision.shape[1]) for p in pairs])
    gt = groups([int(p.text.shape[1]) for p in pairs])
    n = len(pairs)
    bias = torch.zeros(n, 1, d, device=device)
    t0 = None
    for s in range(warmup + steps):
        if s == warmup:
            _sync(device)
            t0 = time.perf_counter()
        zi = torch.cat([torch.baddbmm(bias[: x.shape[0]], x, w) for x, w in gv])
        zt = torch.cat([torch.baddbmm(bias[: x.shape[0]], x, w) for x, w in gt])
        logits = torch.bmm(zi, zt.transpose(1, 2))
        gzi = torch.bmm(logits, zt)  # dL/dzi = G zt, dL/dzt = G^T zi (G shaped like the logits)
        gzt = torch.bmm(logits.transpose(1, 2), zi)
        k = 0
        for x, _ in gv:
            torch.bmm(x.transpose(1, 2), gzi[k : k + x.shape[0]])
            k += x.shape[0]
        k = 0
        for x, _ in gt:
            torch.bmm(x.transpose(1, 2), gzt[k : k + x.shape[0]])
            k += x.shape[0]
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="A rank run whose models.csv gives the widths (default: the offline zoo's).")
    ap.add_argument("--n", type=int, default=800, help="Training images per pair (the demo: 800).")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out-dim", type=int, default=ProbeSettings().out_dim, help="Probe output width (default: the probe's).")
    ap.add_argument("--today-out-dim", type=int, default=512, help="The output width of the probe before the fused trainer.")
    ap.add_argument("--steps", type=int, default=12, help="Timed steps of each variant (the median step time is used).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--one-by-one-pairs", type=int, default=3, help="Pairs trained one by one for the one-by-one rate.")
    ap.add_argument("--probe-steps", type=int, default=ProbeSettings().steps, help="Steps of the probe the wall-time comparison is for.")
    ap.add_argument("--today-pairs", type=int, default=10, help="Pairs the probe trained one by one before (5 top, 3 middle, 2 bottom).")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    vw, tw = widths(args.run)
    g = torch.Generator().manual_seed(0)
    feats_v = [torch.randn(args.n, w, generator=g) for w in vw]
    feats_t = [torch.randn(args.n, w, generator=g) for w in tw]
    pairs = [FusedPair(feats_v[i], feats_t[j], torch.arange(args.n), label=f"v{i}xt{j}") for i in range(len(vw)) for j in range(len(tw))]
    n_pairs = len(pairs)
    total = args.warmup + args.steps

    def config(out_dim: int) -> TrainConfig:
        return TrainConfig(head="linear", out_dim=out_dim, loss="sigmoid", batch_size=args.batch_size, steps=total, lr=1e-3,
                           weight_decay=1e-7, device=args.device, log_every=total)

    def timed(fn) -> float:
        """Median seconds per step of ``fn(progress)`` over the steps after the warm-up."""
        stamps: list[float] = []

        def tick(step: int, *_: object) -> None:
            if step >= args.warmup:
                _sync(device)
                stamps.append(time.perf_counter())

        fn(tick)
        return _median([b - a for a, b in zip(stamps, stamps[1:], strict=False)])

    picks = [pairs[k] for k in torch.linspace(0, n_pairs - 1, args.one_by_one_pairs).round().long().tolist()]

    def one_by_one(out_dim: int) -> float:
        return sum(timed(lambda cb, p=p: train(p.vision, p.text, p.text_image_index, config(out_dim), progress=lambda s, t, i: cb(s)))
                   for p in picks) / len(picks)

    today_step = one_by_one(args.today_out_dim)  # seconds per pair-step, the probe before
    one_step = one_by_one(args.out_dim)  # the same settings as the fused run
    fused_step = timed(lambda cb: fused_train(pairs, config(args.out_dim), progress=lambda s, t: cb(s)))
    bare = bare_products(pairs, min(args.batch_size, args.n), args.out_dim, args.steps, args.warmup, device)

    rate_today, rate_one, rate_fused = 1 / today_step, 1 / one_step, n_pairs / fused_step
    wall_fused = fused_step * args.probe_steps
    wall_today = today_step * args.probe_steps * args.today_pairs
    frac = bare / fused_step
    res = {"machine": machine(), "command": " ".join(shlex.quote(a) for a in sys.argv), "args": vars(args), "pairs": n_pairs,
           "vision_widths": vw, "text_widths": tw, "today_s_per_pair_step": today_step, "one_by_one_s_per_pair_step": one_step,
           "fused_s_per_step": fused_step, "bare_s_per_step": bare,
           "pair_steps_per_s": {"today": rate_today, "one_by_one": rate_one, "fused": rate_fused}, "speedup_same_settings": rate_fused / rate_one,
           "fraction_of_bare": frac, "wall_s": {"fused_all_pairs": wall_fused, "today": wall_today}}  # fmt: skip
    dev = "cuda" if device.type == "cuda" else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = f"""# Fused multi-pair probe trainer ({dev})

`{res['command']}` ({res['machine']['processor']}, {res['machine']['cpu_count']} CPUs, {res['machine']['torch_threads']} torch thread(s),
torch {res['machine']['torch']}, {res['machine']['date']}, load average {load:.1f}; GPU: {res['machine']['cuda'] or 'none'}).
{n_pairs} pairs (vision widths {vw} x text widths {tw}), {args.n} training images, batch {args.batch_size}, linear heads, sigmoid loss,
AdamW; median step time over {args.steps} timed steps after {args.warmup}.

| | out dim | pair-steps / s | s per step | note |
|---|---:|---:|---:|---|
| one by one, the probe before (`train`) | {args.today_out_dim} | {rate_today:.2f} | {today_step:.4f} per pair | mean of {len(picks)} pairs |
| one by one (`train`) | {args.out_dim} | {rate_one:.2f} | {one_step:.4f} per pair | mean of {len(picks)} pairs |
| fused (`fused_train`, all {n_pairs} pairs) | {args.out_dim} | {rate_fused:.2f} | {fused_step:.4f} per step | {rate_fused / rate_one:.2f}x one by one at the same settings |
| bare batched products of one fused step | {args.out_dim} | {n_pairs / bare:.2f} | {bare:.4f} per step | fraction of the fused step: **{frac:.2f}** (target >= 0.5: {'met' if frac >= 0.5 else 'NOT met'}) |

Wall time of a {args.probe_steps}-step probe, from the rates above: all {n_pairs} pairs fused at out dim {args.out_dim} **{wall_fused:.0f} s**
against the probe before, {args.today_pairs} pairs one by one at out dim {args.today_out_dim}, **{wall_today:.0f} s**
(target: all pairs in less wall time: {'met' if wall_fused < wall_today else 'NOT met'}).
"""
    stem = "probe_fused" + ("_cuda" if dev == "cuda" else "")
    j, m = write_results(stem, res, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
