"""Sigmoid (SigLIP) loss step: pairscout's chunked loss vs open_clip's ``SigLipLoss``, time and peak memory.

One step = L2-normalise B x d image and B x d caption embeddings (leaf tensors standing in for head
outputs), loss, backward to the embeddings and to the learnable scale / bias. Implementations:

* ``open_clip``: ``open_clip.loss.SigLipLoss`` (pip ``open-clip-torch``) on ``F.normalize``-d features; it
  materialises the B x B logits and the B x B label matrix.
* ``ours_plain``: ``SigmoidLoss(chunk=None)``, the reference path (B x B logits).
* ``ours_chunk``: ``SigmoidLoss(chunk=C)``, custom autograd function, logits recomputed in backward.
* ``ours_chunk_fused``: ``SigmoidLoss(chunk=C, recompute=False)``, gradients computed in the forward pass.

All use norm="batch" (open_clip's 1/B), t = 10, b = -10, float32; the loss values are compared with
open_clip's. Every (implementation, B) runs in a FRESH subprocess so one case's memory cannot hide another's.

Memory: CPU - peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during warm-up + timed steps
minus the peak after the inputs and their gradient buffers were allocated and touched (so it is the
loss's own working memory: logits, labels, temporaries, normalised copies; library code and thread pools
are loaded by a tiny B = 256 step first, before the baseline; glibc ``MALLOC_MMAP_THRESHOLD_=131072`` so
freed blocks leave the RSS at once). CUDA -
``torch.cuda.max_memory_allocated()`` during the steps minus the allocated bytes before them.

CPU (this session): ``python benchmarks/bench_sigmoid_loss.py`` (B = 1024, 2048, 4096; d = 1024; ~2-4 min
on 2 shared cores). GPU (later; NOT run yet): ``python benchmarks/bench_sigmoid_loss.py --device cuda``
(B = 4096 .. 32768). GPU targets: at B = 32,768, d = 1,024 the chunked loss needs < 1 GB (plain: ~8 GB+)
and its step is no slower than open_clip's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from pairscout.align.losses import InfoNCELoss, SigmoidLoss  # noqa: E402

IMPLS = ("open_clip", "ours_plain", "ours_chunk", "ours_chunk_fused")
MiB = 2**20


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_infonce_step(impl: str, chunk: int, device: str):
    """InfoNCE family: open_clip's ``ClipLoss`` against ours, plain (B x B logits) and tiled."""
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        peer = ClipLoss()
        scale = torch.nn.Parameter(torch.tensor(1 / 0.07, device=device).log())

        def step(img, txt):
            loss = peer(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale.exp())
            loss.backward()
            return loss.detach()

        return step
    if impl == "ours_chunk_fused":
        raise SystemExit("ours_chunk_fused exists for the sigmoid loss only")
    ours = InfoNCELoss(chunk=chunk if impl == "ours_chunk" else None).to(device)

    def step(img, txt):
        loss = ours(img, txt)
        loss.backward()
        return loss.detach()

    return step


def make_step(impl: str, chunk: int, device: str, loss: str = "sigmoid"):
    """A closure (img, txt) -> loss value doing one forward + backward, and the modules it owns."""
    if loss == "infonce":
        return make_infonce_step(impl, chunk, device)
    if impl == "open_clip":
        from open_clip.loss import SigLipLoss

        peer = SigLipLoss()
        scale = torch.nn.Parameter(torch.tensor(10.0, device=device).log())
        bias = torch.nn.Parameter(torch.tensor(-10.0, device=device))

        def step(img, txt):
            loss = peer(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale.exp(), bias)
            loss.backward()
            return loss.detach()

        return step
    kwargs = {
        "ours_plain": {},
        "ours_chunk": {"chunk": chunk},
        "ours_chunk_fused": {"chunk": chunk, "recompute": False},
    }
    ours = SigmoidLoss(init_scale=10.0, init_bias=-10.0, norm="batch", **kwargs[impl]).to(device)

    def step(img, txt):
        loss = ours(img, txt)
        loss.backward()
        return loss.detach()

    return step


def worker(impl: str, n: int, d: int, chunk: int, device: str, repeats: int, seed: int, threads: int,
           loss: str = "sigmoid") -> dict:
    """Run one case in this (fresh) process and return its figures."""
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    step = make_step(impl, chunk, device, loss)
    # load / initialise library code (GEMM kernels, thread pools) on a tiny case, so it is not counted
    small = [torch.randn(256, d, device=device, requires_grad=True) for _ in range(2)]
    step(*small)
    del small
    g = torch.Generator().manual_seed(seed)
    img0 = torch.randn(n, d, generator=g)
    txt0 = img0 + torch.randn(n, d, generator=g)  # captions correlated with their images
    img = img0.to(device).requires_grad_(True)
    txt = txt0.to(device).requires_grad_(True)
    del img0, txt0
    img.grad, txt.grad = torch.ones_like(img), torch.ones_like(txt)  # touched, like after a first step
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak_bytes()
    times, value = [], None
    for i in range(repeats + 1):  # the first is warm-up
        img.grad.zero_()
        txt.grad.zero_()
        _sync(device)
        t0 = time.perf_counter()
        value = step(img, txt)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_peak_bytes()) - base
    return {
        "impl": impl,
        "B": n,
        "d": d,
        "chunk": chunk if impl.startswith("ours_chunk") else None,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_mem_MiB": peak / MiB,
        "loss": float(value),
        "grad_img_norm": float(img.grad.norm()),
        "threads": torch.get_num_threads(),
    }


def run_case(args, impl: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--sizes", str(n), "--dim", str(args.dim),
           "--chunk", str(args.chunk), "--device", args.device, "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--threads", str(args.threads), "--loss", args.loss]  # fmt: skip
    # large blocks always mmap-ed, so freed memory leaves the RSS at once (glibc's default threshold grows
    # after the first frees and then keeps freed blocks resident, inflating the peak with fragmentation)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout, env=env)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"impl": impl, "B": n, "d": args.dim, "error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_at_start": os.getloadavg(),
    }
    for pkg in ("open-clip-torch",):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        from _common import gpu_driver

        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = gpu_driver()
        info["cuda_runtime"] = torch.version.cuda
    return info


def to_markdown(payload: dict) -> str:
    m, cfg = payload["machine"], payload["config"]
    mem = (
        "peak RSS delta (getrusage ru_maxrss, fresh subprocess per case, MALLOC_MMAP_THRESHOLD_=131072, "
        "baseline after a tiny warm-up step and after allocating the inputs and their gradients); it includes "
        "the O(B d) normalised copies and gradient temporaries every implementation needs"
        if cfg["device"] == "cpu"
        else "torch.cuda.max_memory_allocated() minus the allocated bytes before the steps (fresh subprocess per case)"
    )
    lines = [
        f"# {cfg.get('loss', 'sigmoid').capitalize()} loss step benchmark ({cfg['device']})",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"One step = normalise + loss + backward of B x B captions/images, d = {cfg['dim']}, float32, "
        f"norm='batch'; median of {cfg['repeats']} steps after one warm-up; chunk = {cfg['chunk']} columns. "
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} ({cfg['threads']} threads), "
        f"{m.get('gpu') or 'no GPU'}, {m['platform']}; open-clip-torch {m['open-clip-torch']}; load average "
        f"at start/end {m['load_avg_at_start'][0]:.1f}/{m['load_avg_at_end'][0]:.1f} (shared CPU).",
        f"Memory: {mem}.",
        "",
        "Peer: open_clip's " + ("`ClipLoss`" if cfg.get("loss") == "infonce" else "`SigLipLoss`") + ".",
        "",
        "| B | impl | step (s) | speed-up vs open_clip | loss memory (MiB) | open_clip / ours memory | loss | abs diff vs open_clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in cfg["sizes"]:
        rows = [r for r in payload["rows"] if r["B"] == n]
        peer = next((r for r in rows if r["impl"] == "open_clip" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {n} | {r['impl']} | error: {r['error']} | | | | | |")
                continue
            sp = f"{peer['step_s_median'] / r['step_s_median']:.2f}x" if peer else "-"
            mm = f"{peer['peak_mem_MiB'] / max(r['peak_mem_MiB'], 1e-9):.1f}x" if peer else "-"
            diff = f"{abs(r['loss'] - peer['loss']):.1e}" if peer else "-"
            lines.append(
                f"| {n} | {r['impl']} | {r['step_s_median']:.3f} | {sp} | {r['peak_mem_MiB']:.0f} | {mm} | "
                f"{r['loss']:.4f} | {diff} |"
            )
    lines += [
        "",
        "Analytic size of one B x B float32 logit matrix: "
        + ", ".join(f"B={n}: {n * n * 4 / MiB:.0f} MiB" for n in cfg["sizes"])
        + "; one (B, chunk) block: "
        + ", ".join(f"B={n}: {n * cfg['chunk'] * 4 / MiB:.0f} MiB" for n in cfg["sizes"])
        + ".",
    ]
    if cfg["device"] == "cpu":
        lines.append(
            "GPU figures (B = 4k..131k) come from `bash benchmarks/gpu.sh` on a GPU machine "
            "(results/*_cuda.md); none has been lent to this project yet."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--sizes", default=None, help="comma-separated B (default cpu: 1024,2048,4096; cuda: 4096..32768)"
    )
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument(
        "--chunk", type=int, default=None, help="columns per chunk (default cpu: 512, cuda: 1024)"
    )
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--case-timeout", type=float, default=300.0)
    ap.add_argument("--loss", default="sigmoid", choices=["sigmoid", "infonce"],
                    help="sigmoid (vs open_clip SigLipLoss) or infonce (vs open_clip ClipLoss; ours plain / tiled)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    cuda = args.device.startswith("cuda")
    sizes = [
        int(s) for s in (args.sizes or ("4096,16384,32768,65536,131072" if cuda else "1024,2048,4096")).split(",")
    ]
    args.chunk = args.chunk or (1024 if cuda else 512)
    if args.worker:
        out = worker(
            args.worker, sizes[0], args.dim, args.chunk, args.device, args.repeats, args.seed, args.threads,
            args.loss,
        )
        print(json.dumps(out))
        return
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    info = machine_info(args.device)
    rows = []
    for n in sizes:
        for impl in args.impls.split(","):
            row = run_case(args, impl, n)
            rows.append(row)
            if "error" in row:
                print(f"B={n:>6} {impl:<17} error: {row['error']}", flush=True)
            else:
                print(f"B={n:>6} {impl:<17} step {row['step_s_median']:8.3f} s   loss memory "
                      f"{row['peak_mem_MiB']:8.1f} MiB   loss {row['loss']:.6f}", flush=True)  # fmt: skip
    info["load_avg_at_end"] = os.getloadavg()
    config = {"device": args.device, "loss": args.loss, "sizes": sizes, "dim": args.dim, "chunk": args.chunk,
              "repeats": args.repeats, "seed": args.seed, "threads": args.threads, "impls": args.impls.split(",")}  # fmt: skip
    payload = {"command": command, "machine": info, "config": config, "rows": rows}
    md = to_markdown(payload)
    print("\n" + md)
    stem = f"{args.loss}_loss_" + ("cuda" if cuda else "cpu")
    j, m = write_results(stem, payload, md)
    print(f"\nwrote {j.relative_to(ROOT)} and {m.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
