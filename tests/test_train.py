"""The trainer (pre-encoded embeddings -> two heads) and the evaluation metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pairscout.align import losses
from pairscout.align.evaluate import (
    EvalSet,
    class_embeddings,
    evaluate,
    retrieval_metrics,
    retrieval_ranks,
    zero_shot_metrics,
)
from pairscout.align.heads import HeadError
from pairscout.align.train import (
    DivergenceError,
    TrainConfig,
    TrainError,
    latest_checkpoint,
    lr_factor,
    train,
)


def _rotation_pairs(n: int, d: int, noise: float, captions: int = 1, seed: int = 0):
    """Images x; each caption = x R + noise (several noisy captions per image when captions > 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    ys = [x @ rot + noise * torch.randn(n, d, generator=g) for _ in range(captions)]
    y = torch.cat(ys)
    idx = torch.arange(n).repeat(captions)
    return x, y, idx


def _split(x, y, idx, n_train):
    keep = idx < n_train
    return (x[:n_train], y[keep], idx[keep]), (x[n_train:], y[~keep], idx[~keep] - n_train)


# --- training reaches a known-good answer ----------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "loss", "captions", "optimizer", "lr"),
    [("linear", "sigmoid", "sample", "lion", 1e-3), ("glu", "sigmoid", "all", "adamw", None), ("mlp", "infonce", "all", "adamw", None)],
)
def test_training_on_noisy_rotation_reaches_high_recall(head, loss, captions, optimizer, lr):
    x, y, idx = _rotation_pairs(1280, 32, noise=0.3, captions=2)
    (xt, yt, it), (xe, ye, ie) = _split(x, y, idx, 1024)
    before = evaluate(*_fresh_heads(32), EvalSet(xe, ye, ie))
    cfg = TrainConfig(head=head, out_dim=64, hidden_mult=4, loss=loss, captions=captions, optimizer=optimizer, lr=lr,
                      steps=250, batch_size=128, eval_every=100)  # fmt: skip
    res = train(xt, yt, it, cfg, eval_data=EvalSet(xe, ye, ie))
    assert res.metrics["i2t_r1"] > 0.9 and res.metrics["t2i_r1"] > 0.9, res.metrics
    assert before["mean_r1"] < 0.2  # it was the training, not the data, that aligned them
    losses_ = [h["loss"] for h in res.history if "loss" in h]
    assert losses_[-1] < losses_[0]
    assert sum("eval" in h for h in res.history) == 3  # steps 100, 200 and the final one
    assert res.samples_per_s > 0 and res.steps == 250


def _fresh_heads(d):
    class Id(nn.Module):
        def forward(self, x, tokens=None, mask=None):
            return x[:, :d]

    class Rand(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.randn(d, d, generator=torch.Generator().manual_seed(5))

        def forward(self, x, tokens=None, mask=None):
            return x @ self.w

    return Id(), Rand()


# --- resume ----------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.mark.parametrize(("optimizer", "steps"), [("adamw", 2000), ("lion", 600)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, optimizer, steps):
    x, y, idx = _rotation_pairs(256, 16, noise=0.5, captions=2, seed=1)
    cfg = TrainConfig(head="linear", out_dim=16, optimizer=optimizer, steps=steps, batch_size=64, checkpoint_every=steps // 4, log_every=50)
    whole = train(x, y, idx, cfg, out_dir=tmp_path / "whole")

    def stop_half_way(step, total, info):  # an interruption (Ctrl-C, a crash) right after a checkpoint
        if step == steps // 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(x, y, idx, cfg, out_dir=tmp_path / "parts", progress=stop_half_way)
    assert latest_checkpoint(tmp_path / "parts")["step"] == steps // 2
    resumed = train(x, y, idx, cfg, out_dir=tmp_path / "parts", resume=True)

    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5, abs=1e-6)
    for a, b in ((whole.vision_head, resumed.vision_head), (whole.text_head, resumed.text_head), (whole.loss_fn, resumed.loss_fn)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)
    assert [h["loss"] for h in resumed.history if "loss" in h] == pytest.approx([h["loss"] for h in whole.history if "loss" in h], rel=1e-5)
    logged = json.loads((tmp_path / "parts" / "train_log.json").read_text())
    assert logged["status"] == "finished" and logged["step"] == steps and logged["samples_per_s"] > 0


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    x, y, idx = _rotation_pairs(128, 8, noise=0.5)
    cfg = TrainConfig(head="linear", out_dim=8, steps=20, batch_size=32)
    train(x, y, idx, cfg, out_dir=tmp_path)
    with pytest.raises(TrainError, match=r"other settings \(lr: 0\.001 there, 0\.0003 now\)"):
        train(x, y, idx, TrainConfig(head="linear", out_dim=8, steps=20, batch_size=32, lr=3e-4), out_dir=tmp_path, resume=True)
    with pytest.raises(TrainError, match="the training embeddings"):
        train(x + 1, y, idx, cfg, out_dir=tmp_path, resume=True)
    with pytest.raises(TrainError, match="holds checkpoints of an earlier run") as e:
        train(x, y, idx, cfg, out_dir=tmp_path)
    assert "\n" not in str(e.value) and "--resume" in str(e.value)
    train(x, y, idx, TrainConfig(head="linear", out_dim=8, steps=20, batch_size=32, log_every=5), out_dir=tmp_path, resume=True)  # run-only settings may change
    train(x, y, idx, cfg, out_dir=tmp_path, force=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    x, y, idx = _rotation_pairs(128, 8, noise=0.5)
    real = losses.SigmoidLoss.forward
    calls = {"n": 0}

    def poisoned(self, img, txt, txt_image_index=None):
        calls["n"] += 1
        out = real(self, img, txt, txt_image_index)
        return out * float("nan") if calls["n"] == 35 else out

    monkeypatch.setattr(losses.SigmoidLoss, "forward", poisoned)
    cfg = TrainConfig(head="linear", out_dim=8, steps=100, batch_size=32, checkpoint_every=10)
    with pytest.raises(DivergenceError) as e:
        train(x, y, idx, cfg, out_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "step 35" in msg and "nan" in msg and "last good checkpoint (step 30) is kept" in msg
    latest = latest_checkpoint(tmp_path)
    assert latest["step"] == 30
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "checkpoints" / latest["weights"])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((tmp_path / "train_log.json").read_text())["status"] == "diverged"


def test_local_global_head_without_tokens_is_a_one_line_error():
    x, y, idx = _rotation_pairs(64, 8, noise=0.5)
    with pytest.raises(HeadError, match=r"needs token features.*--tokens"):
        train(x, y, idx, TrainConfig(head="local_global", out_dim=8, steps=2, batch_size=16))


def test_local_global_head_trains_with_tokens():
    x, y, idx = _rotation_pairs(96, 8, noise=0.3)
    xt, yt = x[:, None, :].repeat(1, 3, 1), y[:, None, :].repeat(1, 4, 1)
    mask = torch.ones(96, 4, dtype=torch.bool)
    mask[:, 3] = False
    res = train(x, y, idx, TrainConfig(head="local_global", out_dim=16, steps=5, batch_size=32),
                vision_tokens=xt, text_tokens=yt, text_token_mask=mask)  # fmt: skip
    assert torch.isfinite(torch.tensor(res.final_loss))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01


# --- evaluation ------------------------------------------------------------------------------------
def test_retrieval_recall_on_a_hand_made_similarity_matrix():
    # 3 images, 5 captions; caption -> image: [0, 0, 1, 2, 2]
    idx = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.0, 0.0],   # image 0: its best caption (c1, 0.9) is first      -> i2t rank 0
        [0.8, 0.0, 0.7, 0.0, 0.0],   # image 1: c0 (0.8) beats its caption c2 (0.7)        -> rank 1
        [0.3, 0.2, 0.6, 0.4, 0.1],   # image 2: c2 (0.6) beats its best caption c3 (0.4)  -> rank 1
    ])  # fmt: skip
    # text -> image: c0 own 0.1 < 0.8, 0.3 -> rank 2; c1 0.9 -> 0; c2 own 0.7 < ... 0.5? no: 0.5, 0.6 < 0.7 -> 0;
    # c3 own 0.4, others 0.0 -> 0; c4 own 0.1, others 0.0 -> 0
    i2t, t2i = retrieval_ranks(torch.eye(3), sim.T.contiguous(), idx)
    assert i2t.tolist() == [0, 1, 1] and t2i.tolist() == [2, 0, 0, 0, 0]
    m = retrieval_metrics(sim, idx)
    assert m["i2t_r1"] == pytest.approx(1 / 3) and m["i2t_r5"] == 1.0
    assert m["t2i_r1"] == pytest.approx(4 / 5) and m["t2i_r5"] == 1.0
    assert m["mean_r1"] == pytest.approx((1 / 3 + 4 / 5) / 2)


def test_retrieval_counts_ties_against_the_query():
    idx = torch.arange(4)
    m = retrieval_metrics(torch.zeros(4, 4), idx)  # collapsed embeddings: all scores equal
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    emb = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    assert retrieval_metrics(emb, idx.new_tensor(range(50)), txt=emb)["mean_r1"] == 1.0


def test_zero_shot_on_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    labels = torch.arange(6).repeat_interleave(10)
    img = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(60, 16, generator=g), dim=-1)
    prompts = centres[:, None, :] + 0.01 * torch.randn(6, 3, 16, generator=g)  # 3 prompts per class
    m = zero_shot_metrics(img, class_embeddings(prompts), labels)
    assert m["zs_top1"] == 1.0 and m["zs_top5"] == 1.0
    # swap the embeddings of classes 0 and 1: those 20 images are now wrong at top-1
    swapped = class_embeddings(prompts)[[1, 0, 2, 3, 4, 5]]
    m = zero_shot_metrics(img, swapped, labels, ks=(1, 2))
    assert m["zs_top1"] == pytest.approx(4 / 6) and m["zs_top1_micro"] == pytest.approx(40 / 60)
    # balanced accuracy: class sizes do not weigh in
    lab2 = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    img2 = torch.cat([centres[[1]].repeat(30, 1), centres[[1]].repeat(2, 1)])
    m = zero_shot_metrics(img2, centres[:2], lab2)
    assert m["zs_top1"] == pytest.approx(0.5) and m["zs_top1_micro"] == pytest.approx(2 / 32)


def test_evaluate_with_trained_heads_does_zero_shot_through_the_text_head():
    # text features of a class prompt = the class centre; image features = centre + noise
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 12, generator=g)
    labels = torch.arange(5).repeat(40)
    x = centres[labels] + 0.3 * torch.randn(200, 12, generator=g)
    y = centres[labels] + 0.3 * torch.randn(200, 12, generator=g)
    prompts = centres[:, None, :] + 0.05 * torch.randn(5, 2, 12, generator=g)
    res = train(x[:150], y[:150], torch.arange(150), TrainConfig(head="linear", out_dim=16, steps=150, batch_size=50))
    m = evaluate(res.vision_head, res.text_head, EvalSet(x[150:], y[150:], torch.arange(50), labels=labels[150:], class_prompts=prompts))
    assert m["zs_top1"] > 0.9 and "mean_r1" in m
