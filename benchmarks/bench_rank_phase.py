"""The metrics phase of ``rank`` (one estimation pass: every value, jackknife replicate and null of the default
metrics) against the bare products those metrics need, at growing n, for 4 x 4 and 10 x 10 models.

Bare products (float64 on CPU, the metrics' precision on a GPU): every cross and self product of linear CKA
(``Xc_i^T [Yc_1 .. Yc_t]``, ``Zc_k^T Zc_k``) and one n x n Gram per encoder (row tiles, never stored). The phase:
:func:`pairscout.estimation.estimate` with rank's defaults (primary debiased linear CKA, then linear CKA, RBF CKA,
mutual k-NN, CKNNA; 10 jackknife groups; closed-form nulls for CKA and mutual k-NN, 49 permutations for CKNNA's;
k = 10).

Every measurement runs in its own process (peak RSS = that process's maximum resident memory, CPU-seconds =
its user + system time after the data are made and the modules imported). Models: ``emb:``-style embeddings made from a shared latent
(seeded, float32), widths cycling through ``--dims``.

    python benchmarks/bench_rank_phase.py                       # n = 1,000 .. 16,000, 4x4 and 10x10
    python benchmarks/bench_rank_phase.py --sizes 50000 --zoos 10 --append   # the big size once, added to the table

Writes benchmarks/results/rank_phase.md / .json (``rank_phase_cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_results  # noqa: E402

TARGET_RATIO = 5.0
TARGET_GIB = 24.0


def make(n: int, models: int, dims: list[int], seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 32, generator=g)
    out = []
    for k in range(2 * models):
        d = dims[k % len(dims)]
        out.append((lat @ torch.randn(32, d, generator=g) * (0.2 + 0.1 * (k % 5)) + torch.randn(n, d, generator=g)).float())
    return out[:models], out[models:]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, n: int, models: int, dims: list[int], device: str, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    xs, ys = make(n, models, dims)
    dev = torch.device(device)
    xs, ys = [x.to(dev) for x in xs], [y.to(dev) for y in ys]
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    import scipy.stats  # noqa: F401 - imports (a one-off second per process, not arithmetic) stay off the clock

    from pairscout.estimation import Engine, estimate
    from pairscout.ranking.settings import RankSettings

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c0, t0 = cpu_s(), time.perf_counter()
    extra: dict = {}
    if mode == "bare":
        dt = torch.float32 if cuda else torch.float64
        zc = [(z.to(torch.float64) - z.to(torch.float64).mean(0)).to(dt) for z in [*xs, *ys]]
        ybuf = torch.cat(zc[models:], 1)
        for x in zc[:models]:
            (x.T @ ybuf).sum()
        for z in zc:
            (z.T @ z).sum()
        tile = 2048
        for z in zc:
            for s in range(0, n, tile):
                (z[s:s + tile] @ z.T).sum()
        sync()
    else:
        st = RankSettings()
        metrics = list(dict.fromkeys(["cka_linear_debiased", *st.metrics]))
        prec = "float32" if cuda else "float64"
        est = estimate(xs, ys, metrics, groups=st.ci_groups, seed=st.seed, permutations=st.permutations,
                       options={m: st.metric_options(m) for m in metrics}, engine=Engine(dev, prec, n, 0, n, 1))
        sync()
        extra = {"phases": est.timings, "recomputed_rows": sum(est.recomputed.values())}
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"mode": mode, "n": n, "models": models, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak,
           "base_rss_mb": base_rss, **extra}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(mode: str, n: int, models: int, dims: list[int], device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--sizes", str(n), "--zoos", str(models), "--dims",
           ",".join(map(str, dims)), "--device", device, "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if p.returncode != 0:
        return {"mode": mode, "n": n, "models": models, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(key) on log(n)."""
    pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if r.get(key, 0) > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def table(results: list[dict], dims: list[int], dev: str, threads: int) -> str:
    lines = [f"# Metrics phase of `rank` vs the bare products ({dev})", "",
             "`python benchmarks/bench_rank_phase.py` (sizes below; big sizes with `--append`). Phase: one "
             "`pairscout.estimation.estimate` pass with rank's defaults (debiased + biased linear CKA, RBF CKA, mutual "
             "k-NN, CKNNA; values, 10-group jackknife replicates, nulls: closed form for CKA and mutual k-NN, 49 "
             "permutations for CKNNA). Bare: every "
             "linear-CKA cross and self product and one n x n Gram per encoder, float64 on CPU. Each run in its own "
             f"process, {threads or 'default'} torch thread(s). Models: seeded float32 embeddings, widths cycling {dims}. Target: phase CPU-s within "
             f"{TARGET_RATIO:.0f}x bare; peak memory linear in n; n = 50,000 with 10 x 10 within {TARGET_GIB:.0f} GiB.", "",
             "| models | n | phase wall s | phase CPU s | bare wall s | bare CPU s | CPU ratio (target <= 5) | "
             "phase peak RSS MB (above start) | bare peak RSS MB | rows searched again |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for models in sorted({r["models"] for r in results}):
        rows = sorted([r for r in results if r["models"] == models and r["mode"] == "phase" and "error" not in r], key=lambda r: r["n"])
        bare = {r["n"]: r for r in results if r["models"] == models and r["mode"] == "bare" and "error" not in r}
        for r in rows:
            b = bare.get(r["n"], {})
            ratio = r["cpu_s"] / b["cpu_s"] if b.get("cpu_s") else float("nan")
            lines.append(f"| {models} x {models} | {r['n']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {b.get('wall_s', float('nan')):.1f} | "
                         f"{b.get('cpu_s', float('nan')):.1f} | {ratio:.2f} {'ok' if ratio <= TARGET_RATIO else 'over'} | "
                         f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['base_rss_mb']:.0f}) | {b.get('peak_rss_mb', float('nan')):.0f} | "
                         f"{r.get('recomputed_rows', '')} |")
        for r in results:
            if r["models"] == models and "error" in r:
                lines.append(f"| {models} x {models} | {r['n']:,} | {r['mode']} failed: {r['error']} | | | | | | | |")
        e_p, e_b = exponent(rows, "cpu_s"), exponent(list(bare.values()), "cpu_s")
        e_m = exponent([{"n": r["n"], "m": r["peak_rss_mb"] - r["base_rss_mb"]} for r in rows], "m")
        if e_p is not None:
            lines.append(f"| {models} x {models} | growth exponent (CPU-s ~ n^e; memory above start ~ n^e) | | {e_p:.2f} | | "
                         f"{e_b:.2f} | | {e_m:.2f} | | |" if e_b is not None and e_m is not None else "")
    lines += ["", "Where the phase's time goes (largest n of each zoo, seconds and share):", ""]
    for models in sorted({r["models"] for r in results}):
        rows = [r for r in results if r["models"] == models and r["mode"] == "phase" and "phases" in r]
        if not rows:
            continue
        r = max(rows, key=lambda r: r["n"])
        tot = r["phases"]["total"]
        parts = "; ".join(f"{k} {v:.1f} s ({100 * v / tot:.0f} %)" for k, v in r["phases"].items() if k != "total")
        lines.append(f"* {models} x {models}, n = {r['n']:,}: {parts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,4000,8000,16000")
    ap.add_argument("--zoos", default="4,10", help="models per side")
    ap.add_argument("--dims", default="64,96,128,192")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default); 1 on a shared machine")
    ap.add_argument("--append", action="store_true", help="add to the existing results instead of replacing them")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    zoos = [int(s) for s in a.zoos.split(",")]
    dims = [int(s) for s in a.dims.split(",")]
    if a.child:
        print(json.dumps(child(a.child, sizes[0], zoos[0], dims, a.device, a.threads)))
        return
    stem = "rank_phase_cuda" if a.device.startswith("cuda") else "rank_phase"
    old = json.loads((RESULTS / f"{stem}.json").read_text())["results"] if a.append and (RESULTS / f"{stem}.json").exists() else []
    results = [r for r in old if not (r["n"] in sizes and r["models"] in zoos)]
    md = ""
    for models in zoos:
        for n in sizes:
            for mode in ("bare", "phase"):
                r = run(mode, n, models, dims, a.device, a.threads)
                print(json.dumps(r), flush=True)
                results.append(r)
                md = table(results, dims, a.device, a.threads)  # written after every run: a long run keeps what it measured
                write_results(stem, {"machine": machine(), "dims": dims, "threads": a.threads, "results": results}, md)
    print(md)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
