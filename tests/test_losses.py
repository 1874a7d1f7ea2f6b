"""Contrastive losses: the chunked sigmoid loss against the plain one and open_clip, InfoNCE against F.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pairscout.align import losses
from pairscout.align.losses import (
    InfoNCELoss,
    LossError,
    SigmoidLoss,
    build_loss,
    chunked_sigmoid_negatives,
    default_txt_image_index,
)
from pairscout.errors import PairscoutError


def _pair(n_img: int, n_txt: int, d: int = 16, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d, generator=g, dtype=dtype)
    # captions correlated with image j % n_img so positives and negatives differ
    idx = torch.arange(n_txt) % n_img
    txt = img[idx] + 0.8 * torch.randn(n_txt, d, generator=g, dtype=dtype)
    return img, txt


def _loss_and_grads(loss_fn: SigmoidLoss, img, txt, idx=None):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    loss_fn.zero_grad(set_to_none=True)
    loss = loss_fn(img, txt, idx)
    loss.backward()
    return loss.detach(), [img.grad, txt.grad, loss_fn.logit_scale.grad, loss_fn.logit_bias.grad]


def _perturbed(loss_fn: SigmoidLoss) -> SigmoidLoss:
    # move off the init so the scale / bias gradients are not at a special point
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(7.0))
        loss_fn.logit_bias.fill_(-2.5)
    return loss_fn


@pytest.mark.parametrize("norm", ["batch", "pairs"])
@pytest.mark.parametrize("captions_per_image", [1, 2])
@pytest.mark.parametrize("chunk", [1, 5, 12, 24, 1000])  # 1, non-divisor, divisor of B', = B', >= B'
@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_equals_plain(norm, captions_per_image, chunk, recompute):
    n = 12
    img, txt = _pair(n, captions_per_image * n, seed=captions_per_image)
    plain = _perturbed(SigmoidLoss(norm=norm))
    chunked = _perturbed(SigmoidLoss(norm=norm, chunk=chunk, recompute=recompute))
    ref, ref_grads = _loss_and_grads(plain, img, txt)
    out, grads = _loss_and_grads(chunked, img, txt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["img", "txt", "logit_scale", "logit_bias"], grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_chunked_equals_plain_with_explicit_index_and_orphan_captions():
    img, txt = _pair(6, 10, seed=3)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3, -1, -1])  # uneven positives, two captions with no image
    ref, ref_grads = _loss_and_grads(_perturbed(SigmoidLoss(norm="pairs")), img, txt, idx)
    out, grads = _loss_and_grads(_perturbed(SigmoidLoss(norm="pairs", chunk=3)), img, txt, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_plain_loss_matches_formula():
    img, txt = _pair(5, 10)
    loss_fn = SigmoidLoss(norm="pairs")
    x, y = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    z = 20.0 * x @ y.T - 10.0
    labels = -torch.ones(5, 10)
    labels[torch.arange(10) % 5, torch.arange(10)] = 1.0  # two blocks of diagonal positives
    expected = -F.logsigmoid(labels * z).sum() / 50
    torch.testing.assert_close(loss_fn(img, txt), expected)
    assert torch.isclose(loss_fn.logit_scale.exp(), torch.tensor(20.0))
    assert loss_fn.logit_bias.item() == -10.0


def test_matches_open_clip_siglip_single_positive():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = _pair(9, 9, seed=5)
    ours_plain = SigmoidLoss(norm="batch", init_scale=10.0, init_bias=-3.0)
    ours_chunked = SigmoidLoss(norm="batch", init_scale=10.0, init_bias=-3.0, chunk=4)
    # open_clip takes L2-normalised features and t itself (not log t); it divides by B, our norm="batch"
    peer = open_clip_loss.SigLipLoss()(
        F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0), torch.tensor(-3.0)
    )
    torch.testing.assert_close(ours_plain(img, txt), peer)
    torch.testing.assert_close(ours_chunked(img, txt), peer, rtol=1e-5, atol=1e-6)
    # SAIL's norm="pairs" is the same sum divided by B once more
    pairs = SigmoidLoss(norm="pairs", init_scale=10.0, init_bias=-3.0)(img, txt)
    torch.testing.assert_close(pairs, peer / 9)


def _double_inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    return img, txt, t, b


def test_gradcheck_chunked_function():
    assert torch.autograd.gradcheck(
        lambda *a: chunked_sigmoid_negatives(*a, chunk=2, recompute=True), _double_inputs()
    )


def test_fused_gradients_equal_autograd_reference_and_run_once():
    # gradcheck re-runs backward on one graph, which the fused mode (gradients kept from forward, scaled in
    # place) refuses; so compare it with autograd through the formula instead, in float64.
    inputs = _double_inputs()
    img, txt, t, b = inputs
    ref = F.softplus(t * img @ txt.T + b).sum()
    ref_grads = torch.autograd.grad(3.0 * ref, inputs)
    out = chunked_sigmoid_negatives(*inputs, chunk=2, recompute=False)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(3.0 * out, inputs, retain_graph=True)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="recompute=True"):
        torch.autograd.grad(out, inputs)


def test_gradcheck_full_chunked_loss_unnormalised_inputs():
    g = torch.Generator().manual_seed(8)
    img = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = SigmoidLoss(norm="pairs", chunk=4, init_scale=3.0, init_bias=-1.0)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b), (img, txt))


def test_float64_inputs_stay_float64_and_agree_tightly():
    img, txt = _pair(10, 20, dtype=torch.float64)
    plain, chunked = SigmoidLoss(), SigmoidLoss(chunk=3)
    a, b = plain(img, txt), chunked(img, txt)
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 4])
def test_aligned_pairs_score_lower_than_random(chunk):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(16, 32, generator=g)
    loss_fn = SigmoidLoss(chunk=chunk)
    aligned = loss_fn(img, img.clone())
    random = loss_fn(img, torch.randn(16, 32, generator=g))
    assert aligned < random
    assert InfoNCELoss()(img, img.clone()) < InfoNCELoss()(img, torch.randn(16, 32, generator=g))


def test_bf16_autocast_computes_in_float32():
    img, txt = _pair(8, 8)
    img16 = img.bfloat16().requires_grad_(True)
    txt16 = txt.bfloat16().requires_grad_(True)
    loss_fn = SigmoidLoss(chunk=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(img16, txt16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, SigmoidLoss()(img16.float(), txt16.float()), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert img16.grad.dtype == torch.bfloat16 and torch.isfinite(img16.grad.float()).all()


def test_chunked_without_grad_mode():
    img, txt = _pair(8, 8)
    loss_fn = SigmoidLoss(chunk=3, recompute=False)
    with torch.no_grad():
        value = loss_fn(img.requires_grad_(True), txt)
    torch.testing.assert_close(value, SigmoidLoss()(img, txt).detach(), rtol=1e-5, atol=1e-6)


def test_default_index_needs_blocks():
    assert default_txt_image_index(3, 6).tolist() == [0, 1, 2, 0, 1, 2]
    img, txt = _pair(4, 8)
    with pytest.raises(ValueError, match="txt_image_index"):
        SigmoidLoss()(img, txt[:7])
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        SigmoidLoss()(img, txt, torch.full((8,), 4))


def test_infonce_equals_cross_entropy_single_positive():
    img, txt = _pair(10, 10, seed=2)
    loss_fn = InfoNCELoss()
    logits = (1 / 0.07) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(10)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(loss_fn(img, txt), expected)


def test_infonce_multi_positive_averages_over_a_rows_positives():
    img, txt = _pair(5, 10, seed=4)
    loss_fn = InfoNCELoss(init_temperature=0.1)
    logits = 10.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (5, 10)
    idx = torch.arange(10) % 5
    logp = F.log_softmax(logits, dim=1)
    i2t = torch.stack([-logp[i, idx == i].mean() for i in range(5)]).mean()
    t2i = F.cross_entropy(logits.T, idx)
    torch.testing.assert_close(loss_fn(img, txt), (i2t + t2i) / 2)


def test_infonce_scale_is_clamped():
    loss_fn = InfoNCELoss(init_temperature=1e-4, max_scale=100.0)
    img, txt = _pair(4, 4)
    logits = 100.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(loss_fn(img, txt), expected)


def test_build_loss_and_errors():
    assert isinstance(build_loss("sigmoid", norm="pairs", chunk=8), SigmoidLoss)
    assert isinstance(build_loss("siglip"), SigmoidLoss)
    assert isinstance(build_loss("infonce", init_temperature=0.05), InfoNCELoss)
    for bad in (
        lambda: build_loss("triplet"),
        lambda: SigmoidLoss(norm="mean"),
        lambda: SigmoidLoss(chunk=0),
    ):
        with pytest.raises(LossError) as err:
            bad()
        assert (
            isinstance(err.value, PairscoutError) and "\n" not in str(err.value) and "Fix:" in str(err.value)
        )
    with pytest.raises(LossError, match="bad argument"):
        build_loss("sigmoid", temperature=0.1)


def test_loss_parameters_are_learnable_or_frozen():
    assert {n for n, _ in SigmoidLoss().named_parameters()} == {"logit_scale", "logit_bias"}
    assert list(SigmoidLoss(learnable=False).parameters()) == []
    assert {n for n, _ in InfoNCELoss().named_parameters()} == {"logit_scale"}


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("multi", [False, True])
def test_tiled_infonce_equals_plain(chunk, multi):
    """Issue 13: tiled InfoNCE (LSE tiles recomputed in backward) = the plain loss, value and gradients."""
    g = torch.Generator().manual_seed(chunk)
    b, d = 40, 16
    img = torch.randn(b, d, generator=g, dtype=torch.float64)
    if multi:  # 2 captions for most images, one image with none, one caption with no image
        idx = torch.cat([torch.arange(b), torch.arange(b)])
        idx[idx == 3] = 5
        idx[-1] = -1
    else:
        idx = torch.arange(b)
    txt = img[idx.clamp_min(0)] + 0.7 * torch.randn(len(idx), d, generator=g, dtype=torch.float64)
    out = []
    for c in (None, chunk):
        loss_fn = losses.InfoNCELoss(chunk=c).double()
        with torch.no_grad():
            loss_fn.logit_scale.fill_(2.5)
        a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        val = loss_fn(a, t, idx)
        val.backward()
        out.append((val.detach(), a.grad, t.grad, loss_fn.logit_scale.grad))
    for got, want in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tiled_infonce_bad_chunk():
    with pytest.raises(losses.LossError, match="chunk"):
        losses.InfoNCELoss(chunk=0)
