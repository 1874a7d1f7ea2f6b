"""Data-parallel align under torch.distributed (2 gloo processes on CPU, as torchrun would start them): the
cross-rank losses and a few training steps equal one process on the same global batch."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pairscout import distributed
from pairscout.align.dist_loss import infonce_across_ranks, sigmoid_across_ranks
from pairscout.align.losses import InfoNCELoss, SigmoidLoss
from pairscout.align.train import TrainConfig, train
from pairscout.errors import TrainError

WORLD = 2


def _batch(seed: int = 0):
    """12 images, 20 captions (1-3 per image, so the ranks hold different numbers of captions), keys with
    identical captions across ranks (captions 0 and 19 share key 0: images 0 and 11 are both their positives)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(12, 6, generator=g)
    row = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7, 7, 8, 9, 9, 9, 10, 11, 11])
    txt = img[row] + 0.5 * torch.randn(len(row), 6, generator=g)
    keys = torch.arange(len(row))
    keys[-1] = 0
    return img, txt, row, keys


def _positives(keys, row):
    inc = torch.zeros(12, int(keys.max()) + 1, dtype=torch.bool)
    inc[row, keys] = True
    return inc


LOSSES = {
    "sigmoid": lambda: SigmoidLoss(init_scale=3.0, init_bias=-2.0),
    "sigmoid_pairs_chunk": lambda: SigmoidLoss(init_scale=3.0, init_bias=-2.0, norm="pairs", chunk=2),
    "sigmoid_chunk_kept": lambda: SigmoidLoss(init_scale=3.0, init_bias=-2.0, chunk=3, recompute=False),
    "infonce": lambda: InfoNCELoss(init_temperature=0.3),
}


def _loss_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        img, txt, row, keys = _batch()
        inc = _positives(keys, row)
        b = 12 // world
        mine = (row >= b * rank) & (row < b * (rank + 1))
        out = {}
        for name, make in LOSSES.items():
            for keyed in (False, True):
                loss_fn = make()
                x = img[b * rank : b * (rank + 1)].clone().requires_grad_(True)
                y = txt[mine].clone().requires_grad_(True)
                img_ids = torch.arange(b * rank, b * (rank + 1))
                cap_ids = keys[mine] if keyed else row[mine]
                pos = (lambda i, c: inc[i][:, c]) if keyed else (lambda i, c: i[:, None] == c[None, :])
                fn = infonce_across_ranks if name == "infonce" else sigmoid_across_ranks
                loss = fn(loss_fn, x, y, img_ids, cap_ids, pos)
                loss.backward()
                out[name, keyed] = {"loss": loss.detach(), "gx": x.grad, "gy": y.grad,
                                    "gp": torch.stack([p.grad for p in loss_fn.parameters()])}
        torch.save(out, f"{tmp}/loss{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])  # 2: one one-way hop; 3: one round both ways; 4: a round and a hop
def test_cross_rank_losses_equal_one_process_in_value_and_gradients(tmp_path, world):
    mp.spawn(_loss_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"loss{r}.pt") for r in range(world)]
    img, txt, row, keys = _batch()
    inc = _positives(keys, row)
    b = 12 // world
    order = torch.cat([torch.nonzero((row >= b * r) & (row < b * (r + 1))).flatten() for r in range(world)])
    assert len({len(p[("sigmoid", False)]["gy"]) for p in parts}) > 1  # the ranks hold different numbers of captions
    for (name, keyed), _ in parts[0].items():
        loss_fn = LOSSES[name]()
        x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        kw = {"pos_mask": inc[:, keys]} if keyed else {}
        ref = loss_fn(x, y, row, **kw)
        ref.backward()
        got = sum(p[name, keyed]["loss"] for p in parts) / world  # what the trainer logs: the mean of the shares
        assert got.item() == pytest.approx(ref.item(), rel=1e-6), (name, keyed)
        gx = torch.cat([p[name, keyed]["gx"] for p in parts])
        gy = torch.empty_like(y.grad)
        gy[order] = torch.cat([p[name, keyed]["gy"] for p in parts])
        # DDP averages over ranks; the heads' inputs receive the SUM over ranks' losses / W = the global gradient
        torch.testing.assert_close(gx / world, x.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gy / world, y.grad, atol=1e-6, rtol=1e-5)
        gp = sum(p[name, keyed]["gp"] for p in parts) / world
        torch.testing.assert_close(gp, torch.stack([p.grad for p in loss_fn.parameters()]), atol=1e-6, rtol=1e-5)
        if keyed:  # the shared caption changes the loss: the ids really travel between the ranks
            assert abs(ref.item() - loss_fn(img, txt, row).item()) > 1e-4


# --- the trainer ------------------------------------------------------------------------------------
def _data(captions: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 12, generator=g)
    rot = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    y = torch.cat([x @ rot + 0.5 * torch.randn(48, 12, generator=g) for _ in range(captions)])
    idx = torch.arange(48).repeat(captions)
    keys = torch.arange(len(idx))
    keys[idx == 5] = keys[idx == 30][0]  # image 5's captions read like one of image 30's
    return x, y, idx, keys


RUNS = {
    "glu_sigmoid_sample": dict(head="glu", hidden_mult=2, captions="sample"),
    "linear_sigmoid_all_chunk_keys": dict(head="linear", captions="all", chunk=5, loss_norm="pairs"),
    "mlp_infonce_all": dict(head="mlp", loss="infonce", captions="all"),
    "local_global_sigmoid_tokens": dict(head="local_global", captions="sample"),
}


def _extra(name, x, y, keys):
    """caption keys and token features for the runs that name them."""
    kw = {"caption_keys": keys} if "keys" in name else {}
    if "tokens" in name:
        g = torch.Generator().manual_seed(2)
        mask = torch.ones(len(y), 4, dtype=torch.bool)
        mask[::3, 3] = False
        kw.update(vision_tokens=x[:, None] + 0.1 * torch.randn(len(x), 3, x.shape[1], generator=g),
                  text_tokens=y[:, None] + 0.1 * torch.randn(len(y), 4, y.shape[1], generator=g), text_token_mask=mask)
    return kw


def _config(kw) -> TrainConfig:
    return TrainConfig(out_dim=16, steps=6, batch_size=16, lr=3e-3, warmup=0.2, log_every=1, device="cpu", **kw)


def _train_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        x, y, idx, keys = _data()
        out = {}
        for name, kw in RUNS.items():
            res = train(x, y, idx, _config(kw), out_dir=f"{tmp}/{name}-{rank}", **_extra(name, x, y, keys))
            out[name] = {"losses": [h["loss"] for h in res.history if "loss" in h],
                         "state": {**res.vision_head.state_dict(), **{f"t.{k}": v for k, v in res.text_head.state_dict().items()},
                                   **{f"l.{k}": v for k, v in res.loss_fn.state_dict().items()}}}  # fmt: skip
        try:
            train(x, y, idx, TrainConfig(out_dim=8, steps=1, batch_size=15, device="cpu"))
        except TrainError as e:
            out["error"] = str(e)
        torch.save(out, f"{tmp}/train{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.slow
def test_two_process_training_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_train_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"train{r}.pt") for r in range(WORLD)]
    x, y, idx, keys = _data()
    for name, kw in RUNS.items():
        ref = train(x, y, idx, _config(kw), **_extra(name, x, y, keys))
        ref_losses = [h["loss"] for h in ref.history if "loss" in h]
        ref_state = {**ref.vision_head.state_dict(), **{f"t.{k}": v for k, v in ref.text_head.state_dict().items()},
                     **{f"l.{k}": v for k, v in ref.loss_fn.state_dict().items()}}  # fmt: skip
        for p in parts:
            assert p[name]["losses"] == pytest.approx(ref_losses, rel=1e-6, abs=1e-6), name
            for k, v in ref_state.items():
                torch.testing.assert_close(p[name]["state"][k], v, atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
        init = -10.0 if "sigmoid" in name else float(torch.log(torch.tensor(1 / 0.07)))  # it trained: not two untouched heads
        assert abs(float(ref_state["l.logit_bias" if "sigmoid" in name else "l.logit_scale"]) - init) > 1e-3
        assert len(set(ref_losses)) == len(ref_losses) == 6
        assert (tmp_path / f"{name}-0" / "train_log.json").is_file() and not (tmp_path / f"{name}-1").exists()  # rank 0 writes
    for p in parts:
        assert "batch of 15 images does not split over the 2 processes" in p["error"] and "\n" not in p["error"]



# --- probe: every pair's probe is data-parallel ----------------------------------------------------
def _probe(settings_kw=None):
    import pandas as pd

    from pairscout.align.evaluate import EvalSet
    from pairscout.align.pairdata import PairData, split_pair
    from pairscout.embeddings.cache import Embeddings
    from pairscout.evaluation.probe import ProbeSettings, probe_pairs
    from pairscout.zoo.spec import EncoderSpec

    g = torch.Generator().manual_seed(0)
    n, d = 120, 10
    x = torch.randn(n, d, generator=g)
    texts = {f"t{k}": x @ torch.linalg.qr(torch.randn(d, d, generator=g))[0] + s * torch.randn(n, d, generator=g)
             for k, s in enumerate([0.3, 1.0, 3.0])}  # fmt: skip
    train_rows, test_rows = torch.arange(96), torch.arange(96, n)
    vemb = Embeddings(pooled=x, row_index=torch.arange(n))

    def load(v, t):
        temb = Embeddings(pooled=texts[t], row_index=torch.arange(n))
        xv, xt, idx, _ = split_pair(vemb, temb, train_rows)
        ev, et, eidx, _ = split_pair(vemb, temb, test_rows)
        return PairData(EncoderSpec(id="emb:x.npy", modality="vision"), EncoderSpec(id=f"emb:{t}.npy", modality="text"),
                        xv, xt, idx, EvalSet(ev, et, eidx), train_rows, test_rows, "fp")  # fmt: skip

    ranked = pd.DataFrame({"vision": "x", "text": list(texts), "clean": [3.0, 2.0, 1.0]})
    res = probe_pairs(ranked, load, ["clean"], ProbeSettings(steps=8, batch_size=32, out_dim=8, device="cpu"))
    return res.pairs[["text", "mean_r1", "i2t_r1", "t2i_r1", "final_loss"]]


def _probe_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        _probe().to_pickle(f"{tmp}/probe{rank}.pkl")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.slow
def test_two_process_probe_equals_one_process(tmp_path):
    import pandas as pd

    mp.spawn(_probe_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ref = _probe()
    assert ref["mean_r1"].iloc[0] > ref["mean_r1"].iloc[-1]  # the probes measured something
    for r in range(WORLD):
        got = pd.read_pickle(tmp_path / f"probe{r}.pkl")
        assert got["text"].tolist() == ref["text"].tolist()
        for col in ("mean_r1", "i2t_r1", "t2i_r1", "final_loss"):
            assert got[col].tolist() == pytest.approx(ref[col].tolist(), rel=1e-6, abs=1e-6), col


# --- a checkpoint (written by one process) resumes under torchrun as in one process -------------------------------------
def _resume_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        x, y, idx, _ = _data()
        res = train(x, y, idx, _config({**RUNS["glu_sigmoid_sample"], "checkpoint_every": 3}), out_dir=f"{tmp}/resume", resume=True)
        torch.save({**res.vision_head.state_dict(), **{f"t.{k}": v for k, v in res.text_head.state_dict().items()}}, f"{tmp}/resumed{rank}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.slow
def test_a_checkpoint_resumes_on_two_processes_as_on_one(tmp_path):
    import json
    import shutil

    x, y, idx, _ = _data()
    cfg = _config({**RUNS["glu_sigmoid_sample"], "checkpoint_every": 3, "keep_checkpoints": 2})
    ref = train(x, y, idx, cfg, out_dir=tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "resume")
    ckpts = tmp_path / "resume" / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest["step"] == 6
    for f in ckpts.glob("step_00000006.*"):
        f.unlink()  # as if the run had stopped after its step-3 checkpoint
    (ckpts / "latest.json").write_text(json.dumps({**latest, "step": 3, "weights": "step_00000003.safetensors", "state": "step_00000003.pt"}))
    from safetensors.torch import load_file, save_file

    w = load_file(ckpts / "step_00000003.safetensors")  # marked: a fresh start could not reproduce what follows
    save_file({k: v * 1.5 if k.startswith("vision.") else v for k, v in w.items()}, ckpts / "step_00000003.safetensors")
    shutil.copytree(tmp_path / "resume", tmp_path / "resume1")
    one = train(x, y, idx, cfg, out_dir=tmp_path / "resume1", resume=True)
    mp.spawn(_resume_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    want = {**one.vision_head.state_dict(), **{f"t.{k}": v for k, v in one.text_head.state_dict().items()}}
    assert not torch.allclose(want["g.weight"], ref.vision_head.state_dict()["g.weight"], atol=1e-3)  # resumed, not restarted
    for r in range(WORLD):
        got = torch.load(tmp_path / f"resumed{r}.pt")
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
    log = json.loads((tmp_path / "resume" / "train_log.json").read_text())
    assert log["status"] == "finished" and log["step"] == 6 and (ckpts / "step_00000006.safetensors").is_file()  # rank 0 wrote
