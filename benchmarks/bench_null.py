"""Cost of calibrated scores: the demo rank's metrics phase before / after, and the null for 36 pairs.

1. Demo metrics phase (same machine, same run, embeddings from the cache the demo filled): "before" is the
   code at ``--base`` (default: the commit this branch started from, exported with ``git archive`` and run in a
   subprocess): jackknife intervals of every metric + 20 permutations of the primary metric. "after" is this
   tree: jackknife intervals + calibrated null of every metric (closed-form CKA moments, 999 / 199
   Monte-Carlo permutations for mutual k-NN / CKNNA) + the verdict's jackknife replicates and duplicate check.
2. Null alone, 6 x 6 synthetic models with the demo's dimensions (vision 1280, 1280, 1280, 768, 512, 384;
   text 384, 384, 384, 50, 256, 384) at n = 1,000 and 10,000, per metric.

``python benchmarks/bench_null.py`` -> ``benchmarks/results/null_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _common import machine, write_results  # noqa: E402

PHASE = r'''
import json, sys, time, dataclasses
from pairscout.data import load_dataset
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.runner import EncodeSettings, encode_zoo
from pairscout.ranking import RankSettings, compute
from pairscout.zoo.registry import resolve_zoo
ds = load_dataset("generated")
vz, tz = resolve_zoo("offline", "vision"), resolve_zoo("offline", "text")
venc = [e for e in vz.encoders if not IDS or e.id in IDS]  # the "before" run's encoders (the zoo may have grown)
tenc = [e for e in tz.encoders if not IDS or e.id in IDS]
cache = EmbeddingCache(None)
v = encode_zoo(venc, ds, cache=cache, settings=EncodeSettings(device="cpu"))
t = encode_zoo(tenc, ds, cache=cache, settings=EncodeSettings(device="cpu"))
vn = [s.name for s in venc if s.name in v.embeddings]
tn = [s.name for s in tenc if s.name in t.embeddings]
xs = [v.embeddings[k].pooled for k in vn]
ys = [t.embeddings[k].per_row(len(ds), "first") for k in tn]
st = RankSettings()
primary = "cka_linear_debiased"
metrics = list(dict.fromkeys([primary, *st.metrics]))
t0 = time.perf_counter()
if MODE == "before":
    vals = compute.pair_metrics(xs, ys, metrics, dataclasses.replace(st, permutations=20), primary)
else:
    import pandas as pd
    from pairscout.ranking import calibrated
    used, _ = calibrated.adapt_to_size(st, len(ds), metrics)
    from pairscout.estimation import estimate
    est = estimate(xs, ys, metrics, groups=used.ci_groups, seed=used.seed, permutations=used.permutations,
                   options={m: used.metric_options(m) for m in metrics})  # what rank() runs: one pass
    t_cal = time.perf_counter() - sum(v for k, v in est.timings.items() if k.startswith("null"))
    vals, reps = est.columns(), est.replicates[primary].numpy()
    rows = [{"vision": a, "text": b, primary: float(vals[primary][i, j])} for i, a in enumerate(vn) for j, b in enumerate(tn)]
    pairs = pd.DataFrame(rows).sort_values(primary, ascending=False).reset_index(drop=True)
    for c in (f"{primary}_p_holm", f"{primary}_z"):
        pairs[c] = [float(vals[c][vn.index(a), tn.index(b)]) for a, b in zip(pairs.vision, pairs.text)]
    t_ver = time.perf_counter()
    ver = calibrated.rank_verdict(pairs, xs, ys, vn, tn, used, primary, vals, reps)
    t_end = time.perf_counter()
print(json.dumps({"seconds": time.perf_counter() - t0, "n": len(ds), "pairs": len(vn) * len(tn),
                  "ids": [e.id for e in (*venc, *tenc)],
                  **({} if MODE == "before" else {"calibration_s": t_ver - t_cal, "verdict_s": t_end - t_ver,
                                                   "verdict": ver.to_dict()["pair"], "tied": ver.to_dict()["tied"],
                                                   "duplicates": ver.to_dict()["duplicates"]})}))
'''


def run_phase(mode: str, path: Path, ids: list[str] | None = None) -> dict:
    code = f"MODE = {mode!r}\nIDS = {ids!r}\n" + PHASE
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=path)
    return json.loads(out.stdout.strip().splitlines()[-1])


def null_timings(n: int, seed: int = 0) -> dict:
    from pairscout.metrics.calibration import calibrate

    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 32, generator=g)

    def model(d: int) -> torch.Tensor:
        return 0.5 * shared @ torch.randn(32, d, generator=g) / 32**0.5 + torch.randn(n, d, generator=g)

    xs = [model(d) for d in (1280, 1280, 1280, 768, 512, 384)]
    ys = [model(d) for d in (384, 384, 384, 50, 256, 384)]
    from pairscout.metrics import pair_metric

    out = {}
    for m in ("cka_linear", "cka_linear_debiased", "cka_rbf", "mutual_knn", "cknna"):
        kw = {"k": 10} if m in ("mutual_knn", "cknna") else {}
        obs = pair_metric(m, xs, ys, **kw)
        t0 = time.perf_counter()
        c = calibrate(xs, ys, m, obs, **kw)
        out[m] = {"seconds": round(time.perf_counter() - t0, 2), "method": c.method}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="4eb0483", help="commit of the 'before' measurement")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    payload: dict = {"machine": machine(), "base": args.base, "load_average_at_start": os.getloadavg()}
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            arch = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
            before = run_phase("before", Path(tmp))
        after = run_phase("after", ROOT, before["ids"])
        payload["demo_metrics_phase"] = {"before": before, "after": after}
        print("demo metrics phase:", json.dumps(payload["demo_metrics_phase"]), flush=True)
    payload["null_36_pairs"] = {}
    for n in (int(s) for s in args.sizes.split(",") if s):
        payload["null_36_pairs"][n] = null_timings(n)
        print(n, json.dumps(payload["null_36_pairs"][n]), flush=True)
    payload["load_average_at_end"] = os.getloadavg()
    lines = ["# Calibrated null: cost", "", f"Machine: {payload['machine']}", "",
             f"Load average (1, 5, 15 min) at start {payload['load_average_at_start']}, at end {payload['load_average_at_end']}: "
             "the 2 cores were shared with other jobs, so absolute seconds are inflated; before and after ran back to back.", ""]
    if "demo_metrics_phase" in payload:
        b, a = payload["demo_metrics_phase"]["before"], payload["demo_metrics_phase"]["after"]
        lines += ["## Demo rank, metrics phase (1,000 rows, 36 pairs, cached embeddings)", "",
                  "| | seconds | what |", "|---|---:|---|",
                  f"| before ({args.base}) | {b['seconds']:.1f} | jackknife CIs of 5 metrics + 20 permutations of the primary |",
                  f"| after | {a['seconds']:.1f} | jackknife CIs + calibrated null of all 5 metrics ({a['calibration_s']:.1f} s) + verdict ({a['verdict_s']:.1f} s) |",
                  "", f"Verdict: {a['verdict']}, tied {a['tied']}, duplicates {a['duplicates']}", ""]
    lines += ["## Null alone, 36 pairs (6 x 6 models, demo dimensions)", "", "| n | metric | seconds | method |", "|---:|---|---:|---|"]
    for n, res in payload["null_36_pairs"].items():
        for m, r in res.items():
            lines.append(f"| {n:,} | {m} | {r['seconds']:.2f} | {r['method']} |")
    j, md = write_results("null_cpu", payload, "\n".join(lines))
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
