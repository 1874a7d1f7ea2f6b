"""GPU checks: the CUDA paths compute what the CPU paths compute (skipped without a CUDA device).

Run by ``bash benchmarks/gpu.sh`` on a GPU machine; CI has none, so these skip there.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
F64 = torch.float64


def _models(n: int, dims: list[int], seed: int, offset: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 16, generator=g)
    return [shared @ torch.randn(16, d, generator=g) * (0.5 + i) + torch.randn(n, d, generator=g) + offset
            for i, d in enumerate(dims)]


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_all_pairs_cka_precisions_on_cuda(kernel, debiased):
    """float64 on the GPU equals the CPU to rounding; float32 within 1e-5; TF32 within 2e-3 (its documented bound)."""
    from pairscout.metrics import all_pairs_cka

    zs = _models(3000 if kernel == "linear" else 1500, [64, 768, 4096, 384, 1024], seed=1)
    xs, ys = zs[:3], zs[3:]
    cpu = all_pairs_cka(xs, ys, kernel, debiased, precision="float64")
    gx, gy = [x.cuda() for x in xs], [y.cuda() for y in ys]
    g64 = all_pairs_cka(gx, gy, kernel, debiased, precision="float64")
    g32 = all_pairs_cka(gx, gy, kernel, debiased, precision="float32")
    gtf = all_pairs_cka(gx, gy, kernel, debiased, precision="tf32")
    assert g64.device.type == "cpu" and g64.dtype == F64
    torch.testing.assert_close(g64, cpu, atol=1e-9, rtol=0)
    assert float((g32 - cpu).abs().max()) <= 1e-5
    assert float((gtf - cpu).abs().max()) <= 2e-3
    assert float(cpu.abs().max()) > 0.05


def test_tf32_switch_is_restored():
    from pairscout.metrics import all_pairs_cka

    before = torch.backends.cuda.matmul.allow_tf32
    x = torch.randn(256, 32, device="cuda")
    all_pairs_cka([x], [x * 2], precision="tf32")
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_sigmoid_loss_cuda_matches_plain_and_cpu(recompute):
    from pairscout.align.losses import SigmoidLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(2048, 256, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(2048, 256, generator=g), dim=-1)
    out = {}
    for dev, chunk in (("cpu", None), ("cuda", None), ("cuda", 256)):
        loss_fn = SigmoidLoss(chunk=chunk, recompute=recompute).to(dev)
        a, b = img.to(dev).requires_grad_(), txt.to(dev).requires_grad_()
        val = loss_fn(a, b)
        val.backward()
        out[(dev, chunk)] = (val.detach().cpu(), a.grad.cpu(), b.grad.cpu(), loss_fn.logit_scale.grad.cpu())
    ref = out[("cpu", None)]
    for key in (("cuda", None), ("cuda", 256)):
        for got, want in zip(out[key], ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_train_on_cuda_learns_with_bf16_autocast():
    """The trainer on pre-encoded embeddings runs on the GPU (bf16 autocast) and learns a planted alignment."""
    from pairscout.align import TrainConfig
    from pairscout.align.train import train

    g = torch.Generator().manual_seed(0)
    n, d = 2048, 64
    x = torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    y = x @ q + 0.1 * torch.randn(n, d, generator=g)
    cfg = TrainConfig(head="linear", out_dim=64, steps=60, batch_size=512, device="cuda")
    res = train(x, y, config=cfg)
    assert res.device.startswith("cuda")
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
