"""Encoding under torch.distributed (gloo on CPU, as torchrun would start it): the rows are split
between the processes and the merged cache entry equals a single-process run."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pairscout import distributed
from pairscout.data import load_dataset
from pairscout.embeddings.cache import EmbeddingCache
from pairscout.embeddings.runner import EncodeSettings, encode
from pairscout.zoo.spec import EncoderSpec

SPEC = EncoderSpec(id="baseline:pixels", modality="vision", options={"size": 8})
TEXT = EncoderSpec(id="baseline:tfidf", modality="text")
DATA = "generated:n=37,seed=5,size=32"
SETTINGS = EncodeSettings(device="cpu", batch_size=4, num_workers=0, chunk_batches=1)


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        ds = load_dataset(DATA)
        done: dict[str, int] = {}
        for spec in (SPEC, TEXT):
            emb = encode(spec, ds, cache=EmbeddingCache(f"{tmp}/cache"), settings=SETTINGS,
                         progress=lambda name, d, n: done.__setitem__(name, d))
            torch.save({"pooled": emb.pooled, "done": done[spec.name]}, f"{tmp}/rank{rank}-{spec.name}.pt")
    finally:
        distributed.shutdown(clean=sys.exc_info()[0] is None)  # a barrier first: no peer torn down mid-transfer


@pytest.mark.slow
def test_two_processes_split_the_rows_and_agree_with_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ds = load_dataset(DATA)
    for spec, n_rows in ((SPEC, len(ds)), (TEXT, len(ds.flat_captions()[0]))):
        single = encode(spec, ds, cache=EmbeddingCache(tmp_path / "single"), settings=SETTINGS).pooled
        r0 = torch.load(tmp_path / f"rank0-{spec.name}.pt")
        r1 = torch.load(tmp_path / f"rank1-{spec.name}.pt")
        assert r0["done"] + r1["done"] == n_rows  # each row encoded exactly once across the two processes
        assert min(r0["done"], r1["done"]) >= n_rows // 2 - 4
        assert torch.allclose(r0["pooled"], single, atol=1e-5) and torch.equal(r0["pooled"], r1["pooled"])
        cache = EmbeddingCache(tmp_path / "cache")
        assert cache.load(spec, ds.fingerprint) is not None  # rank 0 wrote the merged entry
        assert not cache.parts_dir(spec, ds.fingerprint).exists()
