"""All-pairs CKA: pairscout vs pip-installed CKA libraries on the same embeddings.

m vision x m text random-but-structured "models" (a shared low-rank signal seen through a random projection
per model, plus model-specific noise; dims spread over --min-dim..--max-dim), float32. For every size n:

* ours: ``all_pairs_cka(xs, ys, kernel)`` once for all m x m pairs (RBF: its default median bandwidth,
  included in the time).
* ckatorch ``cka_base(x, y, kernel)`` (biased linear / RBF, float64 Gram matrices) pair by pair.
* torch-cka ``CKA(...).compare(loader)`` (debiased linear HSIC_1, float32, n^3 products) pair by pair,
  through modules that return the stored embeddings; compared with our ``debiased=True`` values.

Values are compared pair by pair (max |ours - peer|; for RBF ours is re-run untimed with ckatorch's bandwidth
convention: median of all n^2 squared distances, zeros included). A peer gets --peer-budget seconds per
(size, kernel): pairs run in a seeded random order and, if the budget runs out after k pairs, its all-pairs
time is EXTRAPOLATED from those k pairs and labelled so.

CPU (this session): ``python benchmarks/bench_cka.py`` (sizes 2000,5000,10000; about 10-15 min on 2 cores).
GPU (later): ``python benchmarks/bench_cka.py --device cuda --models 10 --sizes 50000 --max-dim 4096
--peers none`` (targets: linear < 2 s, RBF must fit in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # torch-cka prints a progress bar per compare()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairscout.metrics import all_pairs_cka  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_models(n: int, m: int, min_dim: int, max_dim: int, seed: int, device: str) -> tuple[list, list]:
    """m vision + m text float32 embeddings sharing a rank-32 signal at model-specific signal-to-noise.

    Drawn on ``device`` with a generator of that device (so n = 50,000 x 20 models of width up to 4,096 are
    made in a second on a GPU); the same seed gives different numbers on CPU and GPU.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    shared = torch.randn(n, 32, generator=g, device=device)
    dims = [int(round(min_dim + (max_dim - min_dim) * i / max(m - 1, 1))) for i in range(m)]
    out = []
    for k, d in enumerate(dims + dims[::-1]):
        snr = 0.25 + 1.5 * ((k * 7) % (2 * m)) / (2 * m)
        z = snr * shared @ (torch.randn(32, d, generator=g, device=device) / 32**0.5)
        z += torch.randn(n, d, generator=g, device=device)
        z += 0.5 * torch.randn(1, d, generator=g, device=device)  # a per-model offset, as real ones have
        out.append(z)
    return out[:m], out[m:]


def bare_products(xs: list, ys: list, kernel: str, method: str, precision: str, device: str,
                  tile: int | None) -> float:
    """Seconds for only the large matrix products all_pairs_cka needs, on pre-centred buffers, same dtype.

    Feature form (linear): X_i^T [Y_1|...|Y_t] for every vision model and Z_k^T Z_k for every model, one
    product each over all n rows. Gram form (RBF, or linear with method='gram'): the upper-triangle tile
    products z_a z_b^T of every model at the tile size the kernel uses. This is the floor the kernel is
    measured against ("fraction of bare-GEMM time" = bare / ours).
    """
    from pairscout.metrics import cka as C

    dt = torch.float64 if precision == "float64" else torch.float32
    zs = [(z - z.mean(0)).to(dt) for z in [*xs, *ys]]
    sync(device)
    with C.matmul_precision(precision, torch.device(device)):
        t0 = time.perf_counter()
        if method == "feature":
            ybuf = torch.cat(zs[len(xs):], 1)
            for x in zs[:len(xs)]:
                (x.T @ ybuf)
            for z in zs:
                (z.T @ z)
        else:
            n = zs[0].shape[0]
            if tile is None:
                tile = max(256, int((C.TILE_BYTES / (8 * len(zs))) ** 0.5) // 128 * 128)
            tile = min(tile, n)
            starts = range(0, n, tile)
            for a in starts:
                for b in starts:
                    if b >= a:
                        for z in zs:
                            (z[a:a + tile] @ z[b:b + tile].T)
        sync(device)
        dt_s = time.perf_counter() - t0
    del zs
    return dt_s


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, *args, **kwargs):
    sync(device)
    t = time.perf_counter()
    v = fn(*args, **kwargs)
    sync(device)
    return v, time.perf_counter() - t


def ckatorch_sigma(z: torch.Tensor) -> float:
    """ckatorch / Kornblith bandwidth: sqrt(median of all n^2 squared distances incl. the zero diagonal)."""
    z = z.double()
    sq = z.square().sum(1)
    best = None
    d2 = -2 * z @ z.T + sq[:, None] + sq[None, :]
    best = float(torch.median(d2))
    del d2
    return best**0.5


def peer_ckatorch(kernel: str):
    import ckatorch

    def run(x, y):
        return float(ckatorch.cka_base(x, y, kernel=kernel))
    return run


def peer_torch_cka(device: str):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    class Rows(nn.Module):
        def __init__(self, z: torch.Tensor) -> None:
            super().__init__()
            self.z = z

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.z[idx]

    class Bank(nn.Module):
        def __init__(self, z: torch.Tensor) -> None:
            super().__init__()
            self.emb = Rows(z)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.emb(idx)

    def run(x, y):
        n = x.shape[0]
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=n)  # one full batch: full-data HSIC_1
        c = CKA(Bank(x), Bank(y), model1_name="x", model2_name="y", model1_layers=["emb"], model2_layers=["emb"],
                device=device)
        c.compare(loader, loader)
        return float(c.export()["CKA"][0, 0])
    return run


def run_peer(name: str, fn, xs, ys, ours: torch.Tensor, budget: float, seed: int, device: str) -> dict:
    pairs = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    spent, done, diff = 0.0, 0, 0.0
    for p in order:
        i, j = pairs[p]
        v, dt = timed(fn, device, xs[i], ys[j])
        spent += dt
        done += 1
        diff = max(diff, abs(v - float(ours[i, j])))
        if spent > budget and done < len(pairs):
            break
    total = spent * len(pairs) / done
    return {"peer": name, "time_s": total, "pairs_measured": done, "pairs_total": len(pairs),
            "extrapolated": done < len(pairs), "max_abs_diff": diff}


def median_time(fn, device: str, repeats: int):
    times, val = [], None
    for _ in range(repeats):
        val, dt = timed(fn, device)
        times.append(dt)
    return val, sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,10000", help="comma list of n")
    ap.add_argument("--peers", default="ckatorch,torch_cka", help="comma list from ckatorch,torch_cka, or 'none'")
    ap.add_argument("--peer-max-n", type=int, default=10000,
                    help="run peers only at n <= this (they build n x n float64 Gram matrices)")
    ap.add_argument("--kernels", default="linear,rbf")
    ap.add_argument("--precisions", default="float64,float32",
                    help="comma list from float64,float32,tf32 (tf32: CUDA tensor cores; float32 on CPU)")
    ap.add_argument("--models", type=int, default=6, help="m vision and m text models")
    ap.add_argument("--min-dim", type=int, default=384)
    ap.add_argument("--max-dim", type=int, default=1536)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (median); RBF above n=20,000: 1")
    ap.add_argument("--peer-budget", type=float, default=90.0, help="seconds per peer per (size, kernel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/cka_<device>)")
    args = ap.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    kernels = [k.strip() for k in args.kernels.split(",")]
    precisions = [p.strip() for p in args.precisions.split(",")]
    stem = Path(args.out) if args.out else RESULTS / f"cka_{device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "device": device,
               "load_avg_at_start": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
        from _common import gpu_driver
        machine["driver"] = gpu_driver()
    for mod in ("ckatorch", "torch_cka"):
        try:
            from importlib.metadata import version
            machine[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            machine[mod] = None
    rows, peer_rows = [], []
    # warm-up (allocator, BLAS handles, every precision)
    wx, wy = make_models(512, 2, 16, 32, 1, device)
    for prec in precisions:
        all_pairs_cka(wx, wy, precision=prec)
        all_pairs_cka(wx, wy, "rbf", precision=prec)
    for n in [int(s) for s in args.sizes.split(",")]:
        xs, ys = make_models(n, args.models, args.min_dim, args.max_dim, args.seed, device)
        for kernel in kernels:
            reps = 1 if (kernel == "rbf" and n > 20000) else args.repeats
            exact = None
            for prec in precisions:
                from pairscout.metrics.cka import _pick_method
                method = "gram" if kernel == "rbf" else _pick_method(n, [x.shape[1] for x in xs],
                                                                     [y.shape[1] for y in ys])
                try:
                    ours, t_ours = median_time(lambda prec=prec, xs=xs, ys=ys, kernel=kernel: all_pairs_cka(xs, ys, kernel, precision=prec),
                                               device, reps)
                    t_bare = min(bare_products(xs, ys, kernel, method, prec, device, None) for _ in range(reps))
                    status = "ok"
                except torch.cuda.OutOfMemoryError:
                    ours, t_ours, t_bare, status = None, float("nan"), float("nan"), "out of memory"
                    torch.cuda.empty_cache()
                if prec == "float64" and ours is not None:
                    exact = ours
                err = None if (exact is None or ours is None) else float((ours - exact).abs().max())
                row = {"n": n, "kernel": kernel, "precision": prec, "method": method, "models": args.models,
                       "ours_s": t_ours, "bare_gemm_s": t_bare, "fraction_of_bare": t_bare / t_ours,
                       "max_abs_err_vs_float64": err, "status": status,
                       "cka_min": None if ours is None else float(ours.min()),
                       "cka_max": None if ours is None else float(ours.max())}
                rows.append(row)
                print(f"n={n} {kernel} {prec}: ours {t_ours:.3f} s, bare products {t_bare:.3f} s "
                      f"(fraction {row['fraction_of_bare']:.2f}), err vs float64 {err}, {status}", flush=True)
            ref = exact
            if not peers or n > args.peer_max_n or ref is None:
                continue
            if kernel == "rbf":  # same bandwidth convention as ckatorch for the value comparison (untimed)
                ref = all_pairs_cka(xs, ys, "rbf", sigmas=[ckatorch_sigma(z) for z in [*xs, *ys]])
            t_ours = next(r["ours_s"] for r in rows if r["n"] == n and r["kernel"] == kernel
                          and r["precision"] == "float64")
            if "ckatorch" in peers:
                r = run_peer("ckatorch", peer_ckatorch(kernel), xs, ys, ref, args.peer_budget, args.seed, device)
                peer_rows.append({"n": n, "kernel": kernel, "estimator": "biased", "ours_s": t_ours, **r,
                                  "ratio": r["time_s"] / t_ours})
                print(f"   ckatorch {r['time_s']:.1f} s ({r['pairs_measured']}/{r['pairs_total']} pairs) "
                      f"diff {r['max_abs_diff']:.2e}", flush=True)
            if kernel == "linear" and "torch_cka" in peers:
                deb, t_deb = timed(all_pairs_cka, device, xs, ys, "linear", debiased=True)
                r = run_peer("torch_cka", peer_torch_cka(device), xs, ys, deb, args.peer_budget, args.seed, device)
                peer_rows.append({"n": n, "kernel": "linear", "estimator": "debiased", "ours_s": t_deb, **r,
                                  "ratio": r["time_s"] / t_deb})
                print(f"   ours debiased {t_deb:.2f} s; torch_cka {r['time_s']:.1f} s ({r['pairs_measured']}/"
                      f"{r['pairs_total']} pairs) diff {r['max_abs_diff']:.2e}", flush=True)
        del xs, ys
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    machine["load_avg_at_end"] = os.getloadavg()
    if device.startswith("cuda"):
        machine["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    config = {k: getattr(args, k) for k in ("sizes", "peers", "kernels", "precisions", "models", "min_dim",
                                            "max_dim", "peer_budget", "peer_max_n", "repeats", "seed")}
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "config": config, "rows": rows,
                                                     "peers": peer_rows}, indent=1))
    where = machine.get("gpu") or f"{machine['processor']}, {machine['cpu_count']} CPUs"
    md = [f"# All-pairs CKA benchmark ({device})", "",
          f"Command: `python benchmarks/{machine['command']}`", "",
          f"{args.models} x {args.models} models, dims {args.min_dim}..{args.max_dim}, float32 embeddings. "
          f"Machine: {where}, torch {machine['torch']} ({machine['torch_threads']} CPU threads), "
          f"{machine['platform']}; load average at start/end {machine['load_avg_at_start'][0]:.1f}/"
          f"{machine['load_avg_at_end'][0]:.1f}. Peers: ckatorch {machine['ckatorch']}, "
          f"torch-cka {machine['torch_cka']}.", "",
          "## pairscout against the bare matrix products it needs (same process)", "",
          "| n | kernel | precision | form | ours (s) | bare products (s) | fraction of bare | max abs err vs float64 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["max_abs_err_vs_float64"] is None else f"{r['max_abs_err_vs_float64']:.1e}"
        if r["status"] != "ok":
            md.append(f"| {r['n']} | {r['kernel']} | {r['precision']} | {r['method']} | {r['status']} | | | |")
            continue
        md.append(f"| {r['n']} | {r['kernel']} | {r['precision']} | {r['method']} | {r['ours_s']:.3f} | "
                  f"{r['bare_gemm_s']:.3f} | {r['fraction_of_bare']:.2f} | {err} |")
    md += ["", "fraction of bare = (time of only the large products, one GEMM per block on pre-centred copies in "
           "the same dtype) / (time of all_pairs_cka, centring and float64 reductions included); target >= 0.70. "
           "float32: products in float32, sums across row chunks and all final reductions in float64. "
           "tf32: float32 on CUDA's TF32 tensor cores. RBF times include the median bandwidth."]
    if peer_rows:
        md += ["", "## Peers (float64 products on our side)", "",
               "| n | kernel | estimator | ours (s) | peer | peer (s) | speed-up | max abs diff | peer pairs timed |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in peer_rows:
            peer_t = f"{r['time_s']:.1f}" + (" (extrapolated)" if r["extrapolated"] else "")
            md.append(f"| {r['n']} | {r['kernel']} | {r['estimator']} | {r['ours_s']:.2f} | {r['peer']} | {peer_t} "
                      f"| {r['ratio']:.0f}x | {r['max_abs_diff']:.1e} | {r['pairs_measured']}/{r['pairs_total']} |")
        md += ["", "Peer times marked 'extrapolated' = (time of the k pairs timed) x pairs / k, pairs in a seeded "
               "random order; the value difference is over the timed pairs. RBF values are compared with ours "
               "re-run at ckatorch's bandwidth convention. torch-cka computes the debiased estimator in float32, "
               "so it is compared with our debiased values."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
