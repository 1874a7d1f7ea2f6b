"""Sharded metrics on 2 CPU processes (torch.distributed, gloo) against one process on the same data.

Every default pair metric of ``pairscout rank`` (linear CKA biased / debiased, RBF CKA, mutual k-NN, CKNNA) for
all pairs of m vision x t text models on n rows: one process holding every row (with all the cores, and with
one thread), against ``--procs`` processes with one thread each, each holding a contiguous 1/procs of the rows
(:func:`pairscout.metrics.pair_metric` with this process's engine, :meth:`pairscout.estimation.Engine.for_run`,
which runs each measure's sharded form: all-reduced feature products for linear CKA, Gram-tile
sums for RBF CKA, gathered neighbour lists for the k-NN metrics). Prints the table and writes
``results/distributed_cpu.{md,json}``: seconds, whether the values agree, and the largest absolute difference.

    python benchmarks/bench_distributed.py                     # n = 3,000, 3 x 3 models
    python benchmarks/bench_distributed.py --n 6000 --models 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

from pairscout.estimation import Engine  # noqa: E402
from pairscout.metrics import Preprocess, pair_metric  # noqa: E402

METRICS = ("cka_linear", "cka_linear_debiased", "cka_rbf", "mutual_knn", "cknna")
DIMS = (384, 512, 768, 1024, 256, 640)


def data(n: int, models: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 embeddings with a shared 16-d signal of varying strength, offsets, widths from :data:`DIMS`."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 16, generator=g)

    def one(d: int, a: float) -> torch.Tensor:
        return a * s @ torch.randn(16, d, generator=g) + torch.randn(n, d, generator=g) + 0.5

    xs = [one(DIMS[i % len(DIMS)], 0.5 + 0.5 * i) for i in range(models)]
    ys = [one(DIMS[(i + 3) % len(DIMS)], 1.0 - 0.25 * i) for i in range(models)]
    return xs, ys


def kwargs(metric: str) -> dict:
    if metric in ("mutual_knn", "cknna"):
        return {"k": 10, "preprocess": Preprocess()}
    return {"precision": "float64"} if metric.startswith("cka") else {}


def _worker(rank: int, world: int, tmp: str, n: int, models: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        xs, ys = data(n, models)
        lo, hi = rank * n // world, (rank + 1) * n // world
        xl, yl = [x[lo:hi].clone() for x in xs], [y[lo:hi].clone() for y in ys]
        del xs, ys
        eng = Engine.for_run("cpu", "float64", n)
        out = {}
        for m in METRICS:
            pair_metric(m, [x[:32] for x in xl], [y[:32] for y in yl], engine=eng, **kwargs(m))  # warm-up, not timed
            dist.barrier()
            t0 = time.perf_counter()
            v = pair_metric(m, xl, yl, engine=eng, **kwargs(m))
            dist.barrier()
            out[m] = (time.perf_counter() - t0, v)
        if rank == 0:
            torch.save(out, f"{tmp}/sharded.pt")
    finally:
        dist.destroy_process_group()


def single(n: int, models: int, threads: int) -> dict[str, tuple[float, torch.Tensor]]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs, ys = data(n, models)
        out = {}
        for m in METRICS:
            pair_metric(m, [x[:64] for x in xs], [y[:64] for y in ys], **kwargs(m))  # warm-up, not timed
            t0 = time.perf_counter()
            v = pair_metric(m, xs, ys, **kwargs(m))
            out[m] = (time.perf_counter() - t0, v)
        return out
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--models", type=int, default=3, help="vision models = text models")
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    one_all = single(args.n, args.models, cores)
    one_1 = single(args.n, args.models, 1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.procs, tmp, args.n, args.models), nprocs=args.procs, join=True)
        shard = torch.load(f"{tmp}/sharded.pt")
    rows = []
    for m in METRICS:
        ref, got = one_all[m][1], shard[m][1]
        diff = float((ref - got).abs().max())
        rows.append({"metric": m, "one_process_all_cores_s": one_all[m][0], "one_process_1_thread_s": one_1[m][0],
                     "sharded_s": shard[m][0], "equal": bool(torch.equal(ref, got)), "max_abs_diff": diff,
                     "agrees": diff <= (1e-8 if m.startswith("cka") else 0.0)})
    head = (f"# Sharded metrics: {args.procs} CPU processes (gloo) vs one process\n\n"
            f"Machine: {machine()}\n\nLoad average at start: {load}. n = {args.n:,} rows, {args.models} vision x "
            f"{args.models} text models (widths {', '.join(str(DIMS[i % len(DIMS)]) for i in range(args.models))} / "
            f"{', '.join(str(DIMS[(i + 3) % len(DIMS)]) for i in range(args.models))}), float32 embeddings, CKA products in "
            f"float64, k = 10. Sharded: each process holds {args.n // args.procs:,} contiguous rows and runs one thread. "
            f"Command: `python benchmarks/bench_distributed.py --n {args.n} --models {args.models} --procs {args.procs}`.\n\n")
    table = (f"| metric | 1 process, {cores} threads (s) | 1 process, 1 thread (s) | {args.procs} processes x 1 thread (s) "
             "| values agree | max abs difference |\n|---|---:|---:|---:|---|---:|\n")
    for r in rows:
        table += (f"| {r['metric']} | {r['one_process_all_cores_s']:.2f} | {r['one_process_1_thread_s']:.2f} | {r['sharded_s']:.2f} "
                  f"| {'yes, bit for bit' if r['equal'] else ('yes (<= 1e-8)' if r['agrees'] else 'NO')} | {r['max_abs_diff']:.1e} |\n")
    notes = ("\nAgreement: CKA within 1e-8 (float64 sums in another order), the k-NN metrics bit for bit. The sharded RBF "
             "forms each block of two processes' rows once (the blocks divided evenly between the processes) and each "
             "process's own block whole; the neighbour search adds a pass over the blocks (the kept similarities "
             "recomputed exactly) and every block is broadcast to every process, so on one machine the gain is the memory per process (1/N of the rows), not the time; a time gain needs "
             "more cores or machines than one process can use.\n")
    if load and load[0] > cores:
        notes += (f"\nLoad average {load[0]:.1f} on {cores} cores at the start: other jobs shared the machine, so the times "
                  "are indicative only.\n")
    md = head + table + notes
    print(md)
    write_results("distributed_cpu", {"machine": machine(), "load": load, "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
    main()
