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
from pairscout.metrics import all_pairs_cka  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_models(n: int, m: int, min_dim: int, max_dim: int, seed: int, device: str) -> tuple[list, list]:
    """m vision + m text float32 embeddings sharing a rank-32 signal at model-specific signal-to-noise."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 32, generator=g)
    dims = [int(round(min_dim + (max_dim - min_dim) * i / max(m - 1, 1))) for i in range(m)]
    out = []
    for k, d in enumerate(dims + dims[::-1]):
        snr = 0.25 + 1.5 * ((k * 7) % (2 * m)) / (2 * m)
        z = snr * shared @ torch.randn(32, d, generator=g) / 32**0.5 + torch.randn(n, d, generator=g)
        out.append((z + 0.5 * torch.randn(1, d, generator=g)).to(device))  # a per-model offset, as real ones have
    return out[:m], out[m:]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,5000,10000", help="comma list of n")
    ap.add_argument("--peers", default="ckatorch,torch_cka", help="comma list from ckatorch,torch_cka, or 'none'")
    ap.add_argument("--kernels", default="linear,rbf")
    ap.add_argument("--models", type=int, default=6, help="m vision and m text models")
    ap.add_argument("--min-dim", type=int, default=384)
    ap.add_argument("--max-dim", type=int, default=1536)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
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
    stem = Path(args.out) if args.out else RESULTS / f"cka_{device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "device": device,
               "load_avg_at_start": os.getloadavg()}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    for mod in ("ckatorch", "torch_cka"):
        try:
            from importlib.metadata import version
            machine[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            machine[mod] = None
    rows = []
    # warm-up (allocator, BLAS threads)
    wx, wy = make_models(256, 2, 16, 32, 1, device)
    all_pairs_cka(wx, wy)
    all_pairs_cka(wx, wy, "rbf")
    for n in [int(s) for s in args.sizes.split(",")]:
        xs, ys = make_models(n, args.models, args.min_dim, args.max_dim, args.seed, device)
        for kernel in kernels:
            ours, t_ours = timed(all_pairs_cka, device, xs, ys, kernel)
            ref = ours
            if kernel == "rbf":  # same bandwidth convention as ckatorch for the value comparison (untimed)
                ref = all_pairs_cka(xs, ys, "rbf", sigmas=[ckatorch_sigma(z) for z in [*xs, *ys]])
            base = {"n": n, "kernel": kernel, "estimator": "biased", "ours_s": t_ours,
                    "cka_min": float(ours.min()), "cka_max": float(ours.max())}
            print(f"n={n} {kernel}: ours {t_ours:.2f} s (CKA range {base['cka_min']:.3f}..{base['cka_max']:.3f})",
                  flush=True)
            if "ckatorch" in peers:
                r = run_peer("ckatorch", peer_ckatorch(kernel), xs, ys, ref, args.peer_budget, args.seed, device)
                rows.append({**base, **r, "ratio": r["time_s"] / t_ours})
                print(f"   ckatorch {r['time_s']:.1f} s ({r['pairs_measured']}/36 pairs) diff {r['max_abs_diff']:.2e}",
                      flush=True)
            if kernel == "linear" and "torch_cka" in peers:
                deb, t_deb = timed(all_pairs_cka, device, xs, ys, "linear", debiased=True)
                r = run_peer("torch_cka", peer_torch_cka(device), xs, ys, deb, args.peer_budget, args.seed, device)
                rows.append({"n": n, "kernel": "linear", "estimator": "debiased", "ours_s": t_deb,
                             "cka_min": float(deb.min()), "cka_max": float(deb.max()), **r, "ratio": r["time_s"] / t_deb})
                print(f"   ours debiased {t_deb:.2f} s; torch_cka {r['time_s']:.1f} s ({r['pairs_measured']}/36 pairs)"
                      f" diff {r['max_abs_diff']:.2e}", flush=True)
            if not peers:
                rows.append({**base, "peer": None, "time_s": None, "ratio": None, "max_abs_diff": None,
                             "pairs_measured": 0, "pairs_total": args.models**2, "extrapolated": False})
    machine["load_avg_at_end"] = os.getloadavg()
    config = {k: getattr(args, k) for k in ("sizes", "peers", "kernels", "models", "min_dim", "max_dim",
                                            "peer_budget", "seed")}
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "config": config, "rows": rows}, indent=1))
    md = [f"# All-pairs CKA benchmark ({device})", "",
          f"{args.models} x {args.models} models, dims {args.min_dim}..{args.max_dim}, float32 embeddings. "
          f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), {machine['platform']}; load average at start/end "
          f"{machine['load_avg_at_start'][0]:.1f}/{machine['load_avg_at_end'][0]:.1f} (the CPU is shared). Peers: ckatorch {machine['ckatorch']}, "
          f"torch-cka {machine['torch_cka']}.", "",
          "| n | kernel | estimator | ours (s) | peer | peer (s) | speed-up | max abs diff | peer pairs timed |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer_t = "-" if r["time_s"] is None else f"{r['time_s']:.1f}" + (" (extrapolated)" if r["extrapolated"] else "")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.0f}x"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        md.append(f"| {r['n']} | {r['kernel']} | {r['estimator']} | {r['ours_s']:.2f} | {r['peer'] or '-'} | {peer_t} "
                  f"| {ratio} | {diff} | {r['pairs_measured']}/{r['pairs_total']} |")
    md += ["", "Peer times marked 'extrapolated' = (time of the k pairs timed) x 36 / k, pairs in a seeded random "
           "order; the value difference is over the timed pairs. RBF: our time includes our median-bandwidth "
           "computation; values are compared with ours re-run at ckatorch's bandwidth convention. torch-cka "
           "computes the debiased (HSIC_1) estimator in float32, so it is compared with our debiased values."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
