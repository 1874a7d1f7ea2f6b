"""The sigmoid loss across torch.distributed ranks (2 gloo processes on CPU) vs one process, same global batch.

One step = L2-normalise the image and caption embeddings (leaf tensors standing in for head outputs), the
loss, backward to the embeddings and to the learnable scale / bias. Cases, at global batch B and d = 1,024:

* ``1 proc``: ``SigmoidLoss`` on the whole batch in one process (2 torch threads: the machine's 2 cores);
* ``2 procs``: :func:`pairscout.align.dist_loss.sigmoid_across_ranks` in 2 gloo processes (1 thread each), each
  holding B / 2 images and captions; its captions' features go round the ring (one hop for 2 ranks) and the
  gradient of the received block comes back the same way.

Each with ``chunk=None`` (a (B_r, B'_s) logit block per pair of ranks) and ``chunk=512`` (a (B_r, 512) block at a
time, recomputed in backward). Time: median of ``--steps`` steps after one warm-up, the slowest rank's. Memory:
each process's peak resident set (``ru_maxrss``) during the steps minus its peak after the inputs and gradient
buffers were allocated and a tiny warm-up step loaded the libraries (the method of ``bench_sigmoid_loss.py``;
``MALLOC_MMAP_THRESHOLD_=131072``); every case runs in fresh processes. The loss values are compared: the
2-process loss (mean of the ranks' shares) equals the 1-process loss.

On a CPU the point is the memory per rank and the correctness; the speed-up of data parallelism needs one
device per rank (GPUs): here both cases share the same 2 cores. Command (2 min 45 s on 2 cores at load average 8):
``python benchmarks/bench_ddp_loss.py`` -> ``benchmarks/results/ddp_loss_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed blocks leave the RSS at once (inherited by spawned ranks)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from pairscout.align.dist_loss import sigmoid_across_ranks  # noqa: E402
from pairscout.align.losses import SigmoidLoss  # noqa: E402

MiB = 2**20


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _data(b: int, d: int, rank: int, world: int):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, d, generator=g)
    txt = img + torch.randn(b, d, generator=g)
    lo, hi = rank * b // world, (rank + 1) * b // world
    return img[lo:hi].clone().requires_grad_(True), txt[lo:hi].clone().requires_grad_(True), torch.arange(lo, hi)


def _step(loss_fn, x, y, ids, world) -> float:
    for t in (x, y, *loss_fn.parameters()):
        t.grad = None
    if world == 1:
        loss = loss_fn(x, y)
    else:
        loss = sigmoid_across_ranks(loss_fn, x, y, ids, ids, lambda i, c: i[:, None] == c[None, :])
    loss.backward()
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def _worker(rank: int, world: int, b: int, d: int, chunk: int | None, steps: int, tmp: str) -> None:
    torch.set_num_threads(2 // world)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        loss_fn = SigmoidLoss(init_scale=10.0, init_bias=-10.0, chunk=chunk)
        _step(loss_fn, *_data(256, d, rank, world), world)  # libraries and thread pools in before the baseline
        x, y, ids = _data(b, d, rank, world)
        x.grad, y.grad = torch.zeros_like(x), torch.zeros_like(y)
        base = _rss()
        times, value = [], float("nan")
        for _ in range(steps + 1):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            value = _step(loss_fn, x, y, ids, world)
            times.append(time.perf_counter() - t0)
        rec = {"rank": rank, "step_s": statistics.median(times[1:]), "mem_mib": (_rss() - base) / MiB, "loss": value}
        Path(f"{tmp}/r{rank}.json").write_text(json.dumps(rec))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_case(world: int, b: int, d: int, chunk: int | None, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, b, d, chunk, steps, tmp), nprocs=world, join=True)
        recs = [json.loads(Path(f"{tmp}/r{r}.json").read_text()) for r in range(world)]
    return {"world": world, "B": b, "chunk": chunk, "step_s": max(r["step_s"] for r in recs),
            "mem_mib_per_rank": max(r["mem_mib"] for r in recs), "loss": recs[0]["loss"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,4096", help="global batches B")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    for b in map(int, args.sizes.split(",")):
        for chunk in (None, args.chunk):
            for world in (1, 2):
                rows.append(run_case(world, b, args.dim, chunk, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    load1 = os.getloadavg()[0]
    info = machine()
    lines = [
        "# Sigmoid loss across 2 processes (gloo, CPU) vs 1 process, same global batch", "",
        "Command: `python benchmarks/bench_ddp_loss.py" + (f" --sizes {args.sizes}" if args.sizes != "2048,4096" else "") + "`", "",
        f"One step = normalise + sigmoid loss + backward, global batch B images x B captions, d = {args.dim}, float32, norm='batch'; "
        f"median of {args.steps} steps after one warm-up, the slowest rank's. 1 proc: 2 torch threads; 2 procs: 1 thread each "
        f"(the same 2 cores). Machine: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']}; "
        f"load average at start/end {load0:.1f}/{load1:.1f} (a CPU shared with other jobs: times are indicative).",
        "Memory: peak RSS delta per process (ru_maxrss, fresh processes per case, MALLOC_MMAP_THRESHOLD_=131072, baseline after "
        "a tiny warm-up step and after allocating the inputs and their gradients): the loss's own working memory on that rank.", "",
        "| B | chunk | processes | step (s) | loss memory per process (MiB) | loss | abs diff vs 1 proc |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        ref = next(x for x in rows if x["B"] == r["B"] and x["chunk"] == r["chunk"] and x["world"] == 1)
        lines.append(f"| {r['B']} | {r['chunk'] or 'none (full block)'} | {r['world']} | {r['step_s']:.3f} | {r['mem_mib_per_rank']:.0f} | "
                     f"{r['loss']:.6f} | {abs(r['loss'] - ref['loss']):.1e} |")  # fmt: skip
    sizes = ", ".join(f"B={b}: {b * b * 4 / MiB:.0f} MiB in 1 proc, {b // 2 * b // 2 * 4 / MiB:.0f} MiB per block on 2"
                      for b in map(int, args.sizes.split(",")))  # fmt: skip
    lines += ["", f"Analytic float32 logits: {sizes} (each rank computes 2 such blocks one after the other: its own captions, "
              "then the other rank's)."]  # fmt: skip
    _, md = write_results("ddp_loss_cpu", {"machine": info, "load": [load0, load1], "args": vars(args), "rows": rows}, "\n".join(lines))
    print(md.read_text())


if __name__ == "__main__":
    main()
