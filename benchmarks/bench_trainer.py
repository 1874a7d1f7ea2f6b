"""Trainer throughput: ``pairscout.align.train.train`` vs a plain hand-written PyTorch loop, in ONE run.

Both train the same two GLU heads (SAIL's star layer, d = 1,024 in, hidden 8 x d, 1,024 out) on the same
random pre-encoded embeddings (N x 1,024 per side, one caption per image) with the same sigmoid loss
(``SigmoidLoss``, t = 20, b = -10, norm "batch"), AdamW (lr 1e-3, wd 1e-4) and the same batch size.

* ``plain``: the minimum loop: random batch indices, forward both heads, loss, ``zero_grad``, ``backward``,
  ``step``. No schedule, no clipping, no checks, no logging.
* ``pairscout``: ``train()`` with its defaults: per-epoch permutation batches + per-step caption sampling,
  warm-up + cosine lr set every step, gradient-norm clipping, a NaN/inf check (one host sync) per step,
  history every 10 steps, the progress callback.

On CUDA both use bf16 autocast and keep the embeddings on the GPU. Throughput = images per second over the
timed steps (the first ``--warmup`` steps of each are excluded). Ratio = pairscout / plain (target >= 0.95).

CPU (this session): ``python benchmarks/bench_trainer.py`` (N = 20,000, batch 256, 4 warm-up + 30 timed
steps each; about 1 min on 2 shared cores). GPU (NOT run yet): ``python benchmarks/bench_trainer.py --device cuda
--batch-size 8192 --steps 50``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from pairscout.align.heads import HeadConfig, build_head  # noqa: E402
from pairscout.align.losses import SigmoidLoss  # noqa: E402
from pairscout.align.train import TrainConfig, train  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(x: torch.Tensor, y: torch.Tensor, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = HeadConfig(kind="glu", in_dim=x.shape[1], out_dim=args.out_dim, hidden_mult=args.hidden_mult)
    vh, th = build_head(cfg).to(device), build_head(cfg).to(device)
    loss_fn = SigmoidLoss(init_scale=20.0, init_bias=-10.0, norm="batch").to(device)
    params = [*vh.parameters(), *th.parameters(), *loss_fn.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    xd, yd = x.to(device), y.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    amp = device.type == "cuda"
    t_start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t_start = time.perf_counter()
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=g).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(vh(xd[idx]), th(yd[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    secs = time.perf_counter() - t_start
    return {"images_per_s": args.steps * args.batch_size / secs, "timed_s": secs, "final_loss": float(loss.detach())}


def pairscout_loop(x: torch.Tensor, y: torch.Tensor, args, device: torch.device) -> dict:
    stamps: dict[int, float] = {}

    def progress(step: int, total: int, info: dict) -> None:
        if step in (args.warmup, total):
            _sync(device)
            stamps[step] = time.perf_counter()

    cfg = TrainConfig(head="glu", out_dim=args.out_dim, hidden_mult=args.hidden_mult, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
                      batch_size=args.batch_size, steps=args.warmup + args.steps, device=str(device))  # fmt: skip
    t0 = time.perf_counter()
    res = train(x, y, torch.arange(x.shape[0]), cfg, progress=progress)
    wall = time.perf_counter() - t0
    secs = stamps[args.warmup + args.steps] - stamps[args.warmup]
    return {"images_per_s": args.steps * args.batch_size / secs, "timed_s": secs, "final_loss": res.final_loss, "wall_s_incl_setup": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--n", type=int, default=20_000, help="rows per side")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--hidden-mult", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--tag", default="", help="suffix of the results file (trainer_<device>[_<tag>])")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.n, args.dim, generator=g), torch.randn(args.n, args.dim, generator=g)

    results = {}
    for name, fn in (("plain", plain_loop), ("pairscout", pairscout_loop)):
        results[name] = fn(x, y, args, device)
        print(f"{name:10s} {results[name]['images_per_s']:10.1f} images/s  ({results[name]['timed_s']:.1f} s timed)", flush=True)
    ratio = results["pairscout"]["images_per_s"] / results["plain"]["images_per_s"]
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    info = machine()
    params = sum(p.numel() for p in build_head(HeadConfig(kind="glu", in_dim=args.dim, out_dim=args.out_dim, hidden_mult=args.hidden_mult)).parameters())
    payload = {"command": cmd, "machine": info, "settings": vars(args), "head_params_per_side": params, "results": results, "ratio": ratio}
    md = [
        f"# Trainer throughput ({args.device})",
        "",
        f"`{cmd}`",
        "",
        f"GLU heads {args.dim} -> {args.hidden_mult} x {args.dim} -> {args.out_dim} ({params / 1e6:.1f} M params per side), sigmoid loss, "
        f"AdamW, batch {args.batch_size}, {args.n:,} x {args.dim} random embeddings per side; {args.warmup} warm-up + {args.steps} timed steps each.",
        "",
        "| loop | images/s | timed s | final loss |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {v['images_per_s']:.1f} | {v['timed_s']:.2f} | {v['final_loss']:.4f} |" for k, v in results.items()],
        "",
        f"Ratio pairscout / plain: **{ratio:.3f}** (target >= 0.95). The final losses differ by design: the trainer warms the lr up "
        "and decays it (cosine) and draws batches per epoch; the plain loop runs at a constant lr. Random embeddings have nothing to learn.",
        "",
        f"Machine: {info}",
    ]
    stem = f"trainer_{args.device.split(':')[0]}" + (f"_{args.tag}" if args.tag else "")
    j, m = write_results(stem, payload, "\n".join(md))
    print(f"ratio pairscout / plain: {ratio:.3f}; written {j} and {m}")


if __name__ == "__main__":
    main()
