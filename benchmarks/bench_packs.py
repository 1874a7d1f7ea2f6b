"""Encoding time of the offline packs: the new DINOv2-S, E5 and USE packs beside the demo's EfficientNet-Lite
and MiniLM, through pairscout's real ``encode()`` (fresh cache, workers 0: one process, so its CPU time is
all of the work).

    python benchmarks/bench_packs.py [--n 64] [--ids pack:efficientnet-lite0,pack:dinov2-s14-imgfocus,...]

Per encoder: wall and CPU milliseconds per row (an image, or a caption for text encoders: the generated
dataset has two captions per image), the ratio to the reference of its side (EfficientNet-Lite0 /
all-MiniLM-L6-v2, the demo's cheapest pretrained encoders) and what 1,000 rows (the demo's size) would take
at that rate. CPU time counts every thread of the process, so on a machine shared with other jobs it says
more than the wall time; the load average before and after is printed with the figures. Figures go to
benchmarks/results/packs_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from pairscout.data import load_dataset  # noqa: E402
from pairscout.embeddings.cache import EmbeddingCache  # noqa: E402
from pairscout.embeddings.runner import EncodeSettings, encode  # noqa: E402
from pairscout.zoo.registry import get_zoo  # noqa: E402

DEFAULT_IDS = ("efficientnet-lite0,efficientnet-lite2,open-nsfw-resnet50,dinov2-s-cls+mean,"
               "all-MiniLM-L6-v2,multilingual-e5-small,use-multilingual-v3")
REFERENCE = {"vision": "efficientnet-lite0", "text": "all-MiniLM-L6-v2"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="generated rows (images; two captions each)")
    ap.add_argument("--ids", default=DEFAULT_IDS, help="names of offline-large zoo entries, comma-separated")
    args = ap.parse_args()
    zoo = {e.name: e for e in get_zoo("offline-large").encoders}
    specs = [zoo[k.strip()] for k in args.ids.split(",") if k.strip()]
    ds = load_dataset(f"generated:n={args.n}")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp))
        settings = EncodeSettings(device="cpu", num_workers=0)
        for spec in specs:
            encode(spec, ds.select(list(range(min(4, len(ds))))), cache=cache, settings=settings)  # build + warm up (not timed)
            w, c = time.perf_counter(), cpu_seconds()
            emb = encode(spec, ds, cache=cache, settings=settings)
            w, c = time.perf_counter() - w, cpu_seconds() - c
            n = emb.pooled.shape[0] if spec.modality == "vision" else len(ds.flat_captions()[0])
            rows.append({"name": spec.name, "id": spec.id, "modality": spec.modality, "rows": n, "dim": emb.dim,
                         "wall_ms": 1000 * w / n, "cpu_ms": 1000 * c / n})  # fmt: skip
            print(f"{spec.name}: {rows[-1]['wall_ms']:.1f} ms/row wall, {rows[-1]['cpu_ms']:.1f} ms/row CPU", flush=True)
    load_after = os.getloadavg()
    ref = {r["modality"]: r for r in rows if r["name"] == REFERENCE[r["modality"]]}
    for r in rows:
        base = ref.get(r["modality"])
        r["cpu_ratio"] = r["cpu_ms"] / base["cpu_ms"] if base else None
        r["s_per_1000"] = r["wall_ms"]  # ms per row x 1,000 rows / 1,000 = s
    info = machine()
    lines = [
        "# Encoding time of the offline packs (cpu)",
        "",
        f"pairscout `encode()` on {args.n} generated images and their {len(ds.flat_captions()[0])} captions (a text row is a caption), "
        "fresh cache, workers 0, after a 4-row warm-up. CPU ms / row is also CPU seconds per 1,000 rows.",
        f"Command: `python benchmarks/bench_packs.py --n {args.n}`",
        "",
        "| encoder | modality | dim | wall ms / row | CPU ms / row | CPU vs reference | wall s per 1,000 rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "reference" if r["name"] == REFERENCE[r["modality"]] else (f"{r['cpu_ratio']:.1f}x" if r["cpu_ratio"] else "")
        lines.append(f"| {r['name']} | {r['modality']} | {r['dim']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {ratio} | {r['s_per_1000']:.0f} |")
    lines += ["", f"References: {REFERENCE['vision']} (vision), {REFERENCE['text']} (text). Load average (1 min) before "
              f"{load_before[0]:.1f}, after {load_after[0]:.1f} on {info['cpu_count']} CPUs: above the CPU count, other "
              "jobs shared the machine and the wall times are longer than on an idle one.", "", f"Machine: {info}"]
    payload = {"n": args.n, "rows": rows, "load_before": load_before, "load_after": load_after, "machine": info}
    j, m = write_results("packs_cpu", payload, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
